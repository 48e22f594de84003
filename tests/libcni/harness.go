// harness drives CNI plugins through libcni, the library containerd and cnitool use, so the
// tests see exactly what a container runtime does: conflist parsing, plugin lookup in
// CNI_PATH, result caching, CHECK with prevResult, DEL.
//
//	harness add|check|del CONFLIST NETNS CONTAINER_ID IFNAME CNI_ARGS
//
// CNI_PATH comes from the environment. ADD prints the result JSON on stdout; errors go to
// stderr as JSON with exit status 1.
package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/containernetworking/cni/libcni"
)

func fail(err error) {
	b, _ := json.Marshal(map[string]string{"error": err.Error()})
	fmt.Fprintln(os.Stderr, string(b))
	os.Exit(1)
}

func main() {
	if len(os.Args) != 7 {
		fail(fmt.Errorf("usage: harness add|check|del CONFLIST NETNS CONTAINER_ID IFNAME CNI_ARGS"))
	}
	cmd, confPath, netns, id, ifname, cniArgs := os.Args[1], os.Args[2], os.Args[3], os.Args[4], os.Args[5], os.Args[6]
	list, err := libcni.ConfListFromFile(confPath)
	if err != nil {
		fail(err)
	}
	var args [][2]string
	for _, kv := range strings.Split(cniArgs, ";") {
		if parts := strings.SplitN(kv, "=", 2); len(parts) == 2 {
			args = append(args, [2]string{parts[0], parts[1]})
		}
	}
	rt := &libcni.RuntimeConf{ContainerID: id, NetNS: netns, IfName: ifname, Args: args}
	cacheDir := filepath.Join(filepath.Dir(confPath), "cache")
	cni := libcni.NewCNIConfigWithCacheDir(filepath.SplitList(os.Getenv("CNI_PATH")), cacheDir, nil)
	ctx := context.Background()
	switch cmd {
	case "add":
		res, err := cni.AddNetworkList(ctx, list, rt)
		if err != nil {
			fail(err)
		}
		b, err := json.Marshal(res)
		if err != nil {
			fail(err)
		}
		fmt.Println(string(b))
	case "check":
		if err := cni.CheckNetworkList(ctx, list, rt); err != nil {
			fail(err)
		}
	case "del":
		if err := cni.DelNetworkList(ctx, list, rt); err != nil {
			fail(err)
		}
	default:
		fail(fmt.Errorf("unknown command %q", cmd))
	}
}
