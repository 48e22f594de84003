//! Security review of #11 (docs/reliability.md, "Security"): only root may call the daemon's
//! socket, checked with the peer's credentials (SO_PEERCRED) whatever the socket's mode; the
//! chart's RBAC grants exactly the Kubernetes API calls tetherd makes; a daemon logging at
//! `trace` (kube, hyper, rustls, tower included) never writes its credentials.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod as KPod};
use kube::api::{Api, DeleteParams, PostParams};
use serde_json::{Value, json};
use tether_e2e::cluster::{TestCluster, repo_root};
use tether_e2e::{CniOutcome, Daemon, Ipam, Pod, SEED_POOL, is_root, skip_or_fail};

/// The unprivileged user the refused caller runs as (`nobody`).
const NOBODY: u32 = 65534;

/// Runs the `tether` plugin at `plugin` as uid/gid `uid` (no supplementary groups: std drops
/// them when root sets a uid), as a runtime would; its outcome and its pid.
fn cni_as(ipam: &Ipam, plugin: &Path, command: &str, pod: &Pod, uid: u32) -> (CniOutcome, u32) {
    use std::io::Write;
    let mut child = Command::new(plugin)
        .env_clear()
        .env("CNI_COMMAND", command)
        .env("CNI_PATH", "")
        .env("CNI_CONTAINERID", &pod.container_id)
        .env("CNI_IFNAME", &pod.ifname)
        .env("CNI_NETNS", "/var/run/netns/none")
        .env("CNI_ARGS", pod.cni_args())
        .uid(uid)
        .gid(uid)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running the plugin as an unprivileged user");
    let pid = child.id();
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(ipam.conf.to_string().as_bytes())
        .expect("config on stdin");
    let o = child.wait_with_output().expect("plugin output");
    let text = String::from_utf8_lossy(&o.stdout).to_string();
    let out = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("plugin stdout is not JSON ({e}): {text:?}"));
    (
        CniOutcome {
            ok: o.status.success(),
            out,
            stderr: String::from_utf8_lossy(&o.stderr).to_string(),
        },
        pid,
    )
}

/// The value of an unlabelled counter in the daemon's metrics text.
fn counter(d: &Daemon, name: &str) -> f64 {
    let text = d.client().get_text("/metrics").expect("metrics");
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("{name} not in the metrics:\n{text}"))
}

/// The socket is made world-writable (and its directory world-searchable) on purpose: the
/// mode lets anyone in, so only the peer-credential check can refuse. The real plugin, run as
/// `nobody`, is answered 403 with code 106 before its request is read: nothing is allocated
/// or released, the refusal is logged with the caller's uid and pid and counted; root's ADD
/// then succeeds on the same socket.
#[test]
fn only_root_may_call_the_socket_whatever_its_mode() {
    let test = "only_root_may_call_the_socket_whatever_its_mode";
    if !is_root() {
        skip_or_fail(
            test,
            "needs root: it runs the plugin as another user (setuid)",
        );
        return;
    }
    let d = Daemon::start(SEED_POOL, &["--log-level", "info"]).expect("tetherd");
    // Widen everything on the way to the socket, and give nobody a plugin it may run.
    std::fs::set_permissions(d.dir.path(), std::fs::Permissions::from_mode(0o755))
        .expect("chmod dir");
    std::fs::set_permissions(&d.socket, std::fs::Permissions::from_mode(0o666))
        .expect("chmod socket");
    let plugin = d.dir.path().join("tether-plugin");
    std::fs::copy(
        tether_e2e::bin_dir().expect("bin dir").join("tether"),
        &plugin,
    )
    .expect("copy plugin");
    std::fs::set_permissions(&plugin, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let ipam = Ipam::new(&d.socket, "net", "1.0.0", &["test-ippool"]).expect("ipam");
    let pod = Pod::new("default", "web", 1);

    // Root's ADD first, so that a refused DEL has something it could have released.
    let rooted = Pod::new("default", "db", 2);
    let out = ipam.add(&rooted).expect("root add");
    assert!(out.ok, "root's ADD: {}", out.out);
    let held = out.ip().expect("ip");

    for (command, target) in [("ADD", &pod), ("DEL", &rooted)] {
        let (out, pid) = cni_as(&ipam, &plugin, command, target, NOBODY);
        assert!(!out.ok, "{command} as uid {NOBODY} succeeded: {}", out.out);
        assert_eq!(
            out.code(),
            Some(106),
            "{command} as uid {NOBODY}: {}",
            out.out
        );
        let msg = out.out["msg"].as_str().unwrap_or_default();
        assert!(
            msg.contains(&format!("uid {NOBODY}, pid {pid}")) && msg.contains("only uid 0"),
            "{command}: the refusal names the caller and who may call: {msg}"
        );
        let log = d.log();
        assert!(
            log.lines().any(|l| l.contains("refused an API connection")
                && l.contains(&format!("peer_uid={NOBODY}"))
                && l.contains(&format!("peer_pid={pid}"))),
            "{command}: no refusal logged with the peer's uid and pid:\n{log}"
        );
    }
    assert_eq!(counter(&d, "tether_api_refused_connections_total"), 2.0);
    // Nothing allocated for the refused ADD, nothing released by the refused DEL.
    let held_now: Vec<String> = d
        .allocations()
        .expect("allocations")
        .iter()
        .filter_map(|a| a["ip"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(
        held_now,
        std::slice::from_ref(&held),
        "allocations after the refused calls"
    );
    // The API never saw them: no CNI call was counted but root's ADD.
    let metrics = d.client().get_text("/metrics").expect("metrics");
    let calls: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("tether_cni_requests_total{"))
        .collect();
    assert_eq!(
        calls,
        [r#"tether_cni_requests_total{command="add",result="ok"} 1"#],
        "{metrics}"
    );

    // Root still works on the same, widened socket.
    let out = ipam.add(&pod).expect("root add");
    assert!(out.ok, "root's ADD after the refusals: {}", out.out);
    assert_ne!(out.ip(), Some(held));
    d.stop().expect("stop");
}

// ---------------------------------------------------------------------------------------
// RBAC: what the code calls, and what the chart grants.

/// Where a rule applies: cluster-wide (ClusterRole), the release namespace, or `default`.
const CLUSTER: &str = "cluster";
const RELEASE: &str = "release namespace";
const DEFAULT: &str = "namespace default";

/// Every Kubernetes API call tetherd makes, by (scope, API group, resource, verbs), with
/// the code that makes it. The audit of #11 (docs/reliability.md, "RBAC audit"): the chart's
/// ClusterRole and Roles must grant exactly this, nothing more, nothing less.
const CALLS: &[(&str, &str, &str, &[&str], &str)] = &[
    (
        CLUSTER,
        "ipam.tether.dev",
        "ipallocations",
        &[
            "get", "list", "watch", "create", "update", "patch", "delete",
        ],
        "host/kube/src/store.rs KubeStore (get_opt, create, replace, delete with preconditions, watcher, list); host/tetherd/src/daemon/pins.rs label_unlabelled (list by label, merge patch)",
    ),
    (
        CLUSTER,
        "ipam.tether.dev",
        "ippools",
        &["list", "watch"],
        "host/tetherd/src/daemon/kube.rs load_pools (list), watch_pools (watcher)",
    ),
    (
        CLUSTER,
        "ipam.tether.dev",
        "ippools/status",
        &["patch"],
        "host/tetherd/src/daemon/kube.rs write_pool_status (patch_status, elected daemon)",
    ),
    (
        CLUSTER,
        "ipam.tether.dev",
        "pinnedidentities",
        &["list", "watch", "create", "update", "delete"],
        "host/tetherd/src/daemon/pins.rs Pins::start (watcher, cluster-wide), apply (create, replace, delete)",
    ),
    (
        CLUSTER,
        "",
        "pods",
        &["get", "list", "watch"],
        "host/kube/src/workloads.rs watch (this node's pods, spec.nodeName selector), Shared::get (a pod's liveness), all_pods (list_metadata, paged, for GC)",
    ),
    (
        CLUSTER,
        "",
        "namespaces",
        &["get", "list", "watch"],
        "host/kube/src/workloads.rs watch (annotations, labels), namespace (get on a cache miss)",
    ),
    (
        CLUSTER,
        "",
        "nodes",
        &["get", "list", "watch"],
        "host/tetherd/src/daemon/kube.rs watch_node (watcher, metadata.name selector); host/kube/src/workloads.rs node_state (get, GC)",
    ),
    (
        CLUSTER,
        "apps",
        "statefulsets",
        &["get", "list", "watch"],
        "host/kube/src/workloads.rs watch (owner cache), owner and read_owner (get: owner chains, release rules)",
    ),
    (
        CLUSTER,
        "apps",
        "replicasets",
        &["get", "list", "watch"],
        "host/kube/src/workloads.rs watch, owner",
    ),
    (
        CLUSTER,
        "apps",
        "deployments",
        &["get", "list", "watch"],
        "host/kube/src/workloads.rs watch, owner",
    ),
    (
        CLUSTER,
        "kubevirt.io",
        "virtualmachines",
        &["get", "list", "watch"],
        "host/kube/src/workloads.rs watch (once the CRD is served), owner, read_owner",
    ),
    (
        CLUSTER,
        "kubevirt.io",
        "virtualmachineinstances",
        &["get", "list", "watch"],
        "host/kube/src/workloads.rs watch, owner, read_owner",
    ),
    (
        CLUSTER,
        "kubevirt.io",
        "virtualmachineinstancemigrations",
        &["get", "list", "watch"],
        "host/kube/src/workloads.rs watch; get through owner/read_owner when a reference or a policy's release rule names one (a policy kind: a refused read fails the ADD)",
    ),
    (
        CLUSTER,
        "k8s.cni.cncf.io",
        "ipamclaims",
        &["get"],
        "host/kube/src/workloads.rs claim (Shared::get); host/tetherd/src/daemon/kube.rs write_claim_status (get_opt)",
    ),
    (
        CLUSTER,
        "k8s.cni.cncf.io",
        "ipamclaims/status",
        &["update"],
        "host/tetherd/src/daemon/kube.rs write_claim_status (replace_status)",
    ),
    (
        RELEASE,
        "coordination.k8s.io",
        "leases",
        &["get", "create", "patch"],
        "host/tetherd/src/daemon/kube.rs cluster_duties via kube-lease-manager 0.13 (LeaseState: get, create, strategic and apply patches); holds_lease (get, every status round, to confirm the holder)",
    ),
    (
        RELEASE,
        "",
        "configmaps",
        &["list", "watch"],
        "host/kube/src/policies.rs PolicySource::run (watcher of the labelled ConfigMaps)",
    ),
    (
        RELEASE,
        "events.k8s.io",
        "events",
        &["create"],
        "host/kube/src/policies.rs post_refusal (a refused policy ConfigMap)",
    ),
    (
        DEFAULT,
        "",
        "events",
        &["create"],
        "host/tetherd/src/daemon/kube.rs post_event (garbage collection's releases, about cluster-scoped objects)",
    ),
];

/// (scope, group, resource, verb) of a table of calls.
type Grant = (String, String, String, String);

fn expand(calls: &[(&str, &str, &str, &[&str], &str)]) -> BTreeSet<Grant> {
    calls
        .iter()
        .flat_map(|(scope, group, resource, verbs, _)| {
            verbs.iter().map(move |v| {
                (
                    (*scope).to_owned(),
                    (*group).to_owned(),
                    (*resource).to_owned(),
                    (*v).to_owned(),
                )
            })
        })
        .collect()
}

/// The grants of the rendered ClusterRoles and Roles, each rule expanded.
fn granted(docs: &[Value], release_ns: &str) -> BTreeSet<Grant> {
    let mut out = BTreeSet::new();
    for d in docs {
        let scope = match (d["kind"].as_str(), d["metadata"]["namespace"].as_str()) {
            (Some("ClusterRole"), _) => CLUSTER.to_owned(),
            (Some("Role"), Some(ns)) if ns == release_ns => RELEASE.to_owned(),
            (Some("Role"), Some("default")) => DEFAULT.to_owned(),
            (Some("Role"), ns) => format!("namespace {ns:?}"),
            _ => continue,
        };
        for rule in d["rules"].as_array().into_iter().flatten() {
            let list = |k: &str| -> Vec<String> {
                rule[k]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|v| v.as_str().map(str::to_owned))
                    .collect()
            };
            assert!(
                rule.get("resourceNames").is_none() && rule.get("nonResourceURLs").is_none(),
                "a rule the audit does not model: {rule}"
            );
            for g in list("apiGroups") {
                for r in list("resources") {
                    for v in list("verbs") {
                        out.insert((scope.clone(), g.clone(), r.clone(), v));
                    }
                }
            }
        }
    }
    out
}

/// The chart's RBAC against the audit table: a grant the code does not use, or a call the
/// chart does not grant, is named. (That the calls the table lists are all the daemon makes
/// is checked live by helm_chart.rs: tetherd runs there with the chart's own token and must
/// be refused nothing.)
#[test]
fn the_chart_grants_exactly_the_calls_tetherd_makes() {
    let test = "the_chart_grants_exactly_the_calls_tetherd_makes";
    let helm = std::env::var_os("TETHER_HELM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/tether-testenv/bin/helm"));
    if !helm.is_file() {
        skip_or_fail(
            test,
            &format!(
                "{} is missing: run scripts/setup.sh (or set TETHER_HELM)",
                helm.display()
            ),
        );
        return;
    }
    let ns = "tether-system";
    let out = Command::new(&helm)
        .args(["template", "tether"])
        .arg(repo_root().join("charts/tether"))
        .args(["--namespace", ns])
        .output()
        .expect("running helm");
    assert!(
        out.status.success(),
        "helm template: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let docs: Vec<Value> =
        yaml_serde::Deserializer::from_str(&String::from_utf8_lossy(&out.stdout))
            .map(|d| <Value as serde::Deserialize>::deserialize(d).expect("a YAML document"))
            .filter(|v| !v.is_null())
            .collect();
    let granted = granted(&docs, ns);
    let needed = expand(CALLS);
    let extra: Vec<&Grant> = granted.difference(&needed).collect();
    let missing: Vec<&Grant> = needed.difference(&granted).collect();
    assert!(
        extra.is_empty() && missing.is_empty(),
        "the chart's RBAC differs from the calls tetherd makes:\n granted, never called: {extra:?}\n called, not granted: {missing:?}"
    );
    // The roles are bound to the daemon's ServiceAccount, and only to it.
    let mut bound = BTreeMap::new();
    for d in &docs {
        if matches!(
            d["kind"].as_str(),
            Some("ClusterRoleBinding" | "RoleBinding")
        ) {
            bound.insert(
                format!(
                    "{} {}/{}",
                    d["roleRef"]["kind"].as_str().unwrap_or_default(),
                    d["metadata"]["namespace"].as_str().unwrap_or("(cluster)"),
                    d["roleRef"]["name"].as_str().unwrap_or_default()
                ),
                d["subjects"].clone(),
            );
        }
    }
    assert_eq!(bound.len(), 3, "bindings: {bound:?}");
    for (role, subjects) in &bound {
        assert_eq!(
            subjects,
            &json!([{"kind": "ServiceAccount", "name": "tether", "namespace": ns}]),
            "{role}"
        );
    }
}

// ---------------------------------------------------------------------------------------
// No credentials in the logs.

/// A kubeconfig using both the test apiserver's static token and a client certificate signed
/// by its CA (user `tether-sec`, group system:masters), the key inline as a real node's
/// kubeconfig carries it. Returns its path, the token and the key's PEM.
fn credentials_kubeconfig(cluster_kubeconfig: &Path, out: &Path) -> (PathBuf, String, String) {
    let kc: Value = yaml_serde::from_str(
        &std::fs::read_to_string(cluster_kubeconfig).expect("read kubeconfig"),
    )
    .expect("kubeconfig yaml");
    let token = kc["users"][0]["user"]["token"]
        .as_str()
        .expect("the test kubeconfig authenticates with a token")
        .to_owned();
    let pki = cluster_kubeconfig.parent().expect("dir").join("pki");
    let run = |args: &[&str]| {
        let o = Command::new("openssl")
            .args(args)
            .current_dir(out)
            .output()
            .expect("openssl");
        assert!(
            o.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    };
    run(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/O=system:masters/CN=tether-sec",
        "-keyout",
        "client.key",
        "-out",
        "client.csr",
    ]);
    // A v3 certificate (rustls refuses v1 ones) for client authentication.
    std::fs::write(
        out.join("ext.cnf"),
        "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\n",
    )
    .expect("ext.cnf");
    let ca = pki.join("ca.crt").display().to_string();
    let ca_key = pki.join("ca.key").display().to_string();
    run(&[
        "x509",
        "-req",
        "-in",
        "client.csr",
        "-CA",
        &ca,
        "-CAkey",
        &ca_key,
        "-CAcreateserial",
        "-extfile",
        "ext.cnf",
        "-days",
        "1",
        "-out",
        "client.crt",
    ]);
    let key = std::fs::read_to_string(out.join("client.key")).expect("key");
    let cert = std::fs::read(out.join("client.crt")).expect("cert");
    let b64 = |b: &[u8]| {
        serde_json::to_value(ByteString(b.to_vec()))
            .expect("base64")
            .as_str()
            .expect("a string")
            .to_owned()
    };
    let mut kc = kc;
    kc["users"][0]["user"] = json!({
        "token": token,
        "client-certificate-data": b64(&cert),
        "client-key-data": b64(key.as_bytes()),
    });
    let path = out.join("kubeconfig");
    std::fs::write(&path, yaml_serde::to_string(&kc).expect("yaml")).expect("write");
    (path, token, key)
}

/// Waits up to 30 s for `f` to hold.
fn eventually(what: &str, mut f: impl FnMut() -> bool, log: impl Fn() -> String) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("{what}: not within 30s\n{}", log());
}

/// Every target at trace but the Wasm compiler's (hundreds of thousands of lines about
/// compiling the policies, which never see a credential).
const TRACE: &str = "trace,wasmtime=info,wasmtime_environ=info,cranelift_codegen=info,cranelift_frontend=info,wasmtime_cranelift=info";

/// tetherd in Kubernetes mode with every target at `trace` (kube, hyper, h2, rustls, tower
/// and its own), authenticated with a bearer token and a client key, drives an ADD, a DEL and
/// a policy ConfigMap load: its log never holds the token, nor the key (its PEM lines, or its
/// base64 form as the kubeconfig carries it).
#[test]
fn no_token_or_key_in_trace_logs() {
    let test = "no_token_or_key_in_trace_logs";
    let Some(TestCluster {
        cluster,
        rt,
        client,
    }) = TestCluster::with_pool(test, SEED_POOL)
    else {
        return;
    };
    let ns = "tether-system";
    let nsobj: Namespace = serde_json::from_value(json!({"metadata": {"name": ns}})).expect("ns");
    rt.block_on(Api::<Namespace>::all(client.clone()).create(&PostParams::default(), &nsobj))
        .expect("namespace");
    let policy = tether_builtins::builtin("kubevirt").expect("kubevirt").wasm;
    let cm = ConfigMap {
        metadata: kube::api::ObjectMeta {
            name: Some("custom".into()),
            labels: Some(BTreeMap::from([(
                tether_kube::policies::POLICY_LABEL.to_owned(),
                "custom".to_owned(),
            )])),
            ..Default::default()
        },
        binary_data: Some(BTreeMap::from([(
            "policy.wasm".to_owned(),
            ByteString(policy.to_vec()),
        )])),
        ..Default::default()
    };
    rt.block_on(
        Api::<ConfigMap>::namespaced(client.clone(), ns).create(&PostParams::default(), &cm),
    )
    .expect("policy ConfigMap");

    let dir = tempfile::tempdir().expect("tempdir");
    let (kubeconfig, token, key) = credentials_kubeconfig(&cluster.kubeconfig, dir.path());
    let kubeconfig = kubeconfig.display().to_string();
    let d = Daemon::start(
        "",
        &[
            "--kubernetes",
            "--node-name",
            "node-a",
            "--kubeconfig",
            &kubeconfig,
            "--lease-namespace",
            ns,
            "--policy-namespace",
            ns,
            "--chain",
            "configmap:custom,builtin:stateless",
            "--log-level",
            TRACE,
        ],
    )
    .expect("tetherd --kubernetes at trace");
    let ipam = Ipam::new(&d.socket, "net", "1.0.0", &["test-ippool"]).expect("ipam");
    let p: KPod = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "web", "namespace": "default"},
        "spec": {"nodeName": "node-a", "automountServiceAccountToken": false,
                 "containers": [{"name": "c", "image": "pause"}]}
    }))
    .expect("pod");
    let created = rt
        .block_on(
            Api::<KPod>::namespaced(client.clone(), "default").create(&PostParams::default(), &p),
        )
        .expect("create pod");
    let mut pod = Pod::new("default", "web", 0);
    pod.uid = created.metadata.uid.expect("uid");
    let out = ipam.add(&pod).expect("add");
    assert!(out.ok, "ADD: {}\n{}", out.out, d.log());
    assert!(ipam.del(&pod).expect("del").ok);
    rt.block_on(
        Api::<KPod>::namespaced(client.clone(), "default")
            .delete("web", &DeleteParams::default().grace_period(0)),
    )
    .expect("delete pod");
    // The policy ConfigMap loaded, and the Lease was taken (its requests are in the log too).
    eventually(
        "the releasers' Lease taken",
        || d.log().contains("tether-releaser"),
        || d.log(),
    );
    let log = d
        .stop()
        .map(|dir| std::fs::read_to_string(dir.path().join("tetherd.log")).expect("log"));
    let log = log.expect("stop");
    // The log really is at trace, with the HTTP client's and TLS's own lines in it.
    for target in ["kube_client", "hyper_util", "rustls"] {
        assert!(
            log.contains(target),
            "no {target} line in the trace log: the test would prove nothing"
        );
    }
    assert!(log.contains("policy"), "no policy load in the log");
    assert!(
        !log.contains(&token),
        "the bearer token is in the log:\n{}",
        log.lines()
            .filter(|l| l.contains(&token))
            .collect::<Vec<_>>()
            .join("\n")
    );
    // The key's PEM body lines (each 64 characters of base64), and the kubeconfig's form.
    let b64_key = serde_json::to_value(ByteString(key.as_bytes().to_vec()))
        .expect("base64")
        .as_str()
        .expect("string")
        .to_owned();
    let secrets: Vec<&str> = key
        .lines()
        .filter(|l| !l.starts_with("-----") && l.len() >= 32)
        .chain(
            b64_key
                .as_bytes()
                .chunks(64)
                .filter_map(|c| std::str::from_utf8(c).ok()),
        )
        .collect();
    assert!(secrets.len() > 20, "the key has its lines");
    for s in secrets {
        assert!(
            !log.contains(s),
            "a piece of the client key is in the log: {s}"
        );
    }
    eprintln!(
        "{test}: {} log lines, {} bytes, searched for the token and {} key fragments",
        log.lines().count(),
        log.len(),
        key.lines().count()
    );
}

// ---------------------------------------------------------------------------------------
// What a policy can do to addresses.

/// Starts tetherd with `hostile (mode=pin, settings), builtin:stateless`.
fn pinning_daemon(settings: &[&str]) -> (tempfile::TempDir, Daemon) {
    let dir = tempfile::tempdir().expect("tempdir");
    let policy = dir.path().join("hostile.wasm");
    std::fs::write(&policy, tether_builtins::fixtures::HOSTILE).expect("write");
    let chain = format!("{},builtin:stateless", policy.display());
    let mut flags = vec!["--chain".to_owned(), chain];
    for s in std::iter::once("mode=pin").chain(settings.iter().copied()) {
        flags.push("--policy-setting".into());
        flags.push(format!("hostile:{s}"));
    }
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let d = Daemon::start(SEED_POOL, &flags).expect("daemon");
    (dir, d)
}

/// (ip, holders' container ids) of every allocation.
fn held(d: &Daemon) -> Vec<(String, Vec<String>)> {
    d.allocations()
        .expect("allocations")
        .iter()
        .map(|a| {
            (
                a["ip"].as_str().unwrap_or_default().to_owned(),
                a["holders"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|h| h["attachment"]["containerId"].as_str().map(str::to_owned))
                    .collect(),
            )
        })
        .collect()
}

/// Two pods of namespace `a`, both live in the workload directory.
fn live_pods(d: &Daemon) -> (Pod, Pod) {
    let (p1, p2) = (Pod::new("a", "p1", 1), Pod::new("a", "p2", 2));
    for p in [&p1, &p2] {
        d.put_manifest(&p.name, &tether_e2e::manifests::deployment_pod(p))
            .expect("manifest");
    }
    (p1, p2)
}

/// A policy that pins every pod of a namespace under one identity (`a/x`, no sharing) cannot
/// make the engine hand that identity's address to a second live pod: the second ADD is
/// told to try again (code 11) while the first pod lives, its DEL releases nothing, and the
/// address moves only once the first pod's DEL has come.
#[test]
fn a_policy_pinning_two_live_pods_to_one_identity_gets_no_duplicate() {
    let (_dir, d) = pinning_daemon(&["identity=a/x", "kind=custom"]);
    let ipam = Ipam::new(&d.socket, "net", "1.0.0", &["test-ippool"]).expect("ipam");
    let (p1, p2) = live_pods(&d);
    let first = ipam.add(&p1).expect("add");
    assert!(first.ok, "{}", first.out);
    let ip = first.ip().expect("ip");
    let second = ipam.add(&p2).expect("add");
    assert!(
        !second.ok,
        "a second live pod got a/x's address: {}",
        second.out
    );
    assert_eq!(second.code(), Some(11), "{}", second.out);
    assert_eq!(held(&d), [(ip.clone(), vec![p1.container_id.clone()])]);
    // The refused pod's DEL (the runtime cleans up after a failed ADD) frees nothing.
    assert!(ipam.del(&p2).expect("del").ok);
    assert_eq!(held(&d), [(ip.clone(), vec![p1.container_id.clone()])]);
    // Once the first pod is gone, the identity's address moves to the next.
    assert!(ipam.del(&p1).expect("del").ok);
    let moved = ipam.add(&p2).expect("add");
    assert!(moved.ok, "{}", moved.out);
    assert_eq!(moved.ip(), Some(ip.clone()));
    assert_eq!(held(&d), [(ip, vec![p2.container_id.clone()])]);
}

/// What a policy is trusted with: `may-share` on a pin lets two live pods of the identity's
/// namespace hold its address at once (meant for a live migration's source and target). A
/// policy that sets it for unrelated pods of one namespace makes two of them share an
/// address: the engine cannot tell them from a migration. A third live pod is refused (code
/// 11: a migration has one source and one target), and so are pods of another namespace (and
/// another namespace's identity: tests/tests/pin_scope.rs). docs/reliability.md, "What a
/// policy can do", records it; this test goes red when the engine narrows `may-share`
/// further, and the document must then change with it.
#[test]
fn may_share_lets_a_policy_put_two_live_pods_of_a_namespace_on_one_address() {
    let (_dir, d) = pinning_daemon(&["identity=a/x", "kind=custom", "may-share=true"]);
    let ipam = Ipam::new(&d.socket, "net", "1.0.0", &["test-ippool"]).expect("ipam");
    let (p1, p2) = live_pods(&d);
    let first = ipam.add(&p1).expect("add");
    assert!(first.ok, "{}", first.out);
    let ip = first.ip().expect("ip");
    let second = ipam.add(&p2).expect("add");
    assert!(second.ok, "{}", second.out);
    assert_eq!(second.ip(), Some(ip.clone()));
    assert_eq!(
        held(&d),
        [(
            ip.clone(),
            vec![p1.container_id.clone(), p2.container_id.clone()]
        )]
    );
    let third = Pod::new("a", "p4", 4);
    d.put_manifest(&third.name, &tether_e2e::manifests::deployment_pod(&third))
        .expect("manifest");
    let refused = ipam.add(&third).expect("add");
    assert!(!refused.ok, "a third live pod joined a/x: {}", refused.out);
    assert_eq!(refused.code(), Some(11), "{}", refused.out);
    let other = ipam.add(&Pod::new("b", "p3", 3)).expect("add");
    assert!(!other.ok, "a pod of b joined a/x: {}", other.out);
    assert_eq!(other.code(), Some(101), "{}", other.out);
    assert_eq!(
        held(&d),
        [(ip, vec![p1.container_id.clone(), p2.container_id.clone()])]
    );
}

// ---------------------------------------------------------------------------------------
// The sandbox's flags reach the runtime.

/// A daemon whose chain is the hostile fixture in `mode`, with `flags`; or its start error.
fn hostile_daemon(mode: &str, flags: &[&str]) -> (tempfile::TempDir, anyhow::Result<Daemon>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let policy = dir.path().join("hostile.wasm");
    std::fs::write(&policy, tether_builtins::fixtures::HOSTILE).expect("write");
    let chain = format!("{},builtin:stateless", policy.display());
    let setting = format!("hostile:mode={mode}");
    let mut args = vec!["--chain", &chain, "--policy-setting", &setting];
    args.extend_from_slice(flags);
    let d = Daemon::start(SEED_POOL, &args);
    (dir, d)
}

/// `--policy-timeout-ms`, `--policy-memory-mib` and `--policy-max-kib` are the limits the
/// runtime enforces (host/policy/tests/runtime.rs proves the limits themselves): an endless
/// loop fails its ADD with code 101 naming the 50 ms limit, a memory hog names the 2 MiB
/// limit, and a 1 KiB component limit refuses the fixture at start-up, before
/// compiling it. The daemon serves the next pod after each failure.
#[test]
fn the_sandbox_flags_reach_the_runtime() {
    for (mode, flags, expect) in [
        ("loop", ["--policy-timeout-ms", "50"], "50ms time limit"),
        ("hog", ["--policy-memory-mib", "2"], "2097152 bytes"),
    ] {
        let (_dir, d) = hostile_daemon(mode, &flags);
        let d = d.expect("tetherd");
        let ipam = Ipam::new(&d.socket, "net", "1.0.0", &["test-ippool"]).expect("ipam");
        let out = ipam.add(&Pod::new("a", "p1", 1)).expect("add");
        assert!(!out.ok, "{mode}: {}", out.out);
        assert_eq!(out.code(), Some(101), "{mode}: {}", out.out);
        let msg = out.out["msg"].as_str().unwrap_or_default();
        assert!(msg.contains(expect), "{mode}: {msg}");
        assert!(d.allocations().expect("allocations").is_empty());
        assert!(
            d.client().get_text("/healthz").is_ok(),
            "{mode}: still serving"
        );
    }
    let (_dir, d) = hostile_daemon("", &["--policy-max-kib", "1"]);
    let e = d.err().expect("a 1 KiB limit refuses the fixture");
    let e = format!("{e:#}");
    assert!(
        e.contains("over the limit of 1024 bytes"),
        "the start error names the limit: {e}"
    );
}
