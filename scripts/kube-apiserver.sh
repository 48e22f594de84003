#!/usr/bin/env bash
# Tether's own copy (it started from the workplace's testenv recipe; maintained here).
# A real Kubernetes control plane on loopback, for integration tests: etcd, kube-apiserver, and
# optionally kube-controller-manager (StatefulSet/ReplicaSet controllers, ownerReference garbage
# collection, ...) and kube-scheduler. There is no kubelet: a test plays the node (`node DIR NAME`
# registers a schedulable Node; the test then calls CNI for the pods the scheduler binds to it and
# patches their status, as a kubelet would).
#
# No registry ships these binaries, but Debian bookworm's `kubernetes` source package holds the full
# v1.20.2 tree with vendor/, which builds offline with Debian's Go 1.19. The binaries are cached, so
# only the first build on a machine pays (about 3-6 min on 2 cores). A build from Debian source
# revision R lands in $CACHE/R/; any complete cached build is used, PKG_VERSION's first (earlier
# versions of this script cached flat, in $CACHE itself: that build is LEGACY_REV's). Delete the
# cache to force a rebuild.
#
#   kube-apiserver.sh build                 build (once) and print the cache directory
#   kube-apiserver.sh start DIR [PORT]      start etcd + apiserver, state in DIR; writes DIR/kubeconfig
#   WITH_CONTROLLERS=1 kube-apiserver.sh start DIR [PORT]   also controller-manager and scheduler
#   kube-apiserver.sh node DIR NAME         register a schedulable Node NAME (Ready, no taints)
#   kube-apiserver.sh stop DIR              stop what `start DIR` started
#
# Outages (the control plane of `start DIR` keeps its port, its PKI and its etcd data):
#   kube-apiserver.sh apiserver-stop DIR [NAME]       stop only an apiserver (waits until it exited)
#   kube-apiserver.sh apiserver-start DIR [NAME PORT] start it again, on the same port and etcd;
#       with NAME and PORT a second apiserver NAME on PORT over the same etcd, its kubeconfig
#       DIR/kubeconfig-NAME (a test changes objects through it while the first one is down).
#       APISERVER_ARGS adds flags (`start` takes them too, and its restarts keep them).
#   kube-apiserver.sh etcd-stop DIR | etcd-start DIR  stop etcd / start it again on its data dir
#   kube-apiserver.sh etcd-put DIR KEY VALUE         write a key straight into etcd (v3 gateway):
#       moves etcd's revision on while no apiserver runs, so that every watch resumed from an
#       older resourceVersion after a restart expires (410 Gone) and its client re-lists
#   kube-apiserver.sh etcd-compact DIR               compact etcd at its current revision
#
# Limits of v1.20: no CRD validation rules (x-kubernetes-validations), no streaming lists;
# CRUD, resourceVersion conflicts (409), watch, ConfigMaps, Leases, RBAC, TokenRequest all work.
# Everything listens on 127.0.0.1 only. Auth: TLS + a static admin token (see DIR/kubeconfig).
set -euo pipefail

CACHE=${TETHER_TESTENV_CACHE:-/var/cache/tether-testenv}
# The source package's upstream version; any Debian revision of it will do (a point release
# replaces a revision and the mirror drops the old one), PKG_VERSION first when the mirror has it.
UPSTREAM=1.20.5+really1.20.2
PKG_VERSION=$UPSTREAM-1.1+deb12u1
LEGACY_REV=$UPSTREAM-1.1+deb12u1  # what the flat cache layout holds: never change this one
BIN= CM= SCHED=

die() { echo "kube-apiserver.sh: $*" >&2; exit 1; }

# complete DIR: does DIR hold all three binaries? use DIR: point BIN, CM and SCHED into it.
complete() { [ -x "$1/kube-apiserver-v1.20.2" ] && [ -x "$1/kube-controller-manager-v1.20.2" ] && [ -x "$1/kube-scheduler-v1.20.2" ]; }
use() { BIN="$1/kube-apiserver-v1.20.2"; CM="$1/kube-controller-manager-v1.20.2"; SCHED="$1/kube-scheduler-v1.20.2"; }

# Prints the directory of a complete cached build, without asking apt: PKG_VERSION's if there is
# one, else the newest revision's. Fails when there is none.
cached() {
  local d r best= best_r=
  for d in "$CACHE/$UPSTREAM"-*/ "$CACHE/"; do
    d=${d%/}; r=${d##*/}
    [ "$d" = "${CACHE%/}" ] && r=$LEGACY_REV
    complete "$d" || continue
    [ "$r" = "$PKG_VERSION" ] && { echo "$d"; return 0; }
    if [ -z "$best" ] || dpkg --compare-versions "$r" gt "$best_r"; then best=$d best_r=$r; fi
  done
  [ -n "$best" ] && echo "$best"
}

# scripts/setup.sh installs these; the fallback keeps the script usable on its own.
need() {
  command -v "$1" >/dev/null 2>&1 && return
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$2" >/dev/null 2>&1 \
    || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$2" >/dev/null; }
}

build() {
  local dir
  if dir=$(cached); then use "$dir"; echo "$dir"; return; fi
  { mkdir -p "$CACHE" && : >>"$CACHE/.build.lock"; } 2>/dev/null \
    || die "no build cached in $CACHE, and it is not writable: run scripts/setup.sh as root (or set TETHER_TESTENV_CACHE)"
  # One build at a time (tests start control planes in parallel): the others wait, then use it.
  exec 9>>"$CACHE/.build.lock"; flock 9
  if dir=$(cached); then exec 9>&-; use "$dir"; echo "$dir"; return; fi
  need go golang-go; need openssl openssl; need curl curl
  local W; W=$(mktemp -d "${TMPDIR:-/tmp}/kapi-build.XXXXXX"); chmod 755 "$W"
  # Private apt sources and lists (deb and deb-src), made from this machine's own Debian mirror
  # and refreshed here, so the downloads below never depend on the system's lists (often emptied
  # in container images) and /etc/apt, /var/lib/apt and /var/cache/apt stay untouched.
  local mirror
  mirror=$(awk '/^URIs:/ && !/security/{print $2; exit}' /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
  [ -n "$mirror" ] || mirror=$(awk '$1=="deb" && !/security/{for(i=2;i<=NF;i++) if ($i ~ /^https?:/) {print $i; exit}}' /etc/apt/sources.list 2>/dev/null || true)
  [ -n "$mirror" ] || die "no Debian mirror found in /etc/apt"
  mkdir -p "$W/apt/lists/partial" "$W/dl" "$W/gopath/src/k8s.io"
  printf 'Types: deb deb-src\nURIs: %s\nSuites: bookworm bookworm-updates\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' "$mirror" >"$W/apt/src.sources"
  local apt=(-o "Dir::Etc::sourcelist=$W/apt/src.sources" -o Dir::Etc::sourceparts=/nonexistent -o "Dir::State::Lists=$W/apt/lists"
             -o "Dir::Cache::pkgcache=$W/apt/pkgcache.bin" -o "Dir::Cache::srcpkgcache=$W/apt/srcpkgcache.bin"
             -o APT::Sandbox::User=root)  # root already downloads: $W is not the _apt user's to write
  apt-get "${apt[@]}" update -qq || die "apt-get update of the private lists for $mirror failed"
  # The source revision: PKG_VERSION if the mirror still has it, else the newest $UPSTREAM-*.
  local rev= v
  for v in $(apt-cache "${apt[@]}" showsrc --only-source kubernetes 2>/dev/null | sed -n 's/^Version: //p'); do
    case $v in "$UPSTREAM"-*) ;; *) continue ;; esac
    if [ "$v" = "$PKG_VERSION" ]; then rev=$v; break; fi
    if [ -z "$rev" ] || dpkg --compare-versions "$v" gt "$rev"; then rev=$v; fi
  done
  [ -n "$rev" ] || die "$mirror has no kubernetes $UPSTREAM-* source package (bookworm, bookworm-updates)"
  echo "building kube-apiserver, controller-manager and scheduler v1.20.2 from Debian's kubernetes $rev (a few minutes)" >&2
  (cd "$W/dl" && apt-get "${apt[@]}" source --download-only "kubernetes=$rev" >/dev/null \
     && apt-get "${apt[@]}" download golang-github-modern-go-reflect2-dev >/dev/null) \
    || die "downloading kubernetes $rev and golang-github-modern-go-reflect2-dev from $mirror failed"
  tar xzf "$W"/dl/kubernetes_*.orig.tar.gz -C "$W"
  local src; src=$(echo "$W"/kubernetes-1.20*)
  # The vendored reflect2 v1.0.1 crashes (SIGSEGV in mapiterinit) under Go >= 1.18: use Debian's 1.0.2.
  dpkg-deb -x "$W"/dl/golang-github-modern-go-reflect2-dev_*.deb "$W/r2"
  rm -rf "$src/vendor/github.com/modern-go/reflect2"
  cp -r "$W/r2/usr/share/gocode/src/github.com/modern-go/reflect2" "$src/vendor/github.com/modern-go/reflect2"
  rm -f "$src/vendor/github.com/modern-go/reflect2/go.mod"
  ln -sfn "$src" "$W/gopath/src/k8s.io/kubernetes"
  (
    cd "$W/gopath/src/k8s.io/kubernetes"
    export GOPATH="$W/gopath" GOCACHE="$W/gocache" GO111MODULE=off CGO_ENABLED=0 GOFLAGS=
    # pkg/generated/openapi is not in the tarball: generate it with the vendored openapi-gen.
    # (errexit is off in here: this subshell is the left side of an ||. Hence the explicit exits.)
    go build -o "$W/openapi-gen" ./vendor/k8s.io/kube-openapi/cmd/openapi-gen || exit 1
    dirs=$(set +o pipefail; find -L pkg cmd plugin vendor third_party -type f -name '*.go' \
      -not -path 'vendor/k8s.io/code-generator/*' -not -path 'vendor/k8s.io/sample-apiserver/*' -not -path '*/testdata/*' 2>/dev/null \
      | { xargs grep -l '^// *+k8s:openapi-gen=' || true; } | xargs -n1 dirname | sort -u | sed 's#^#k8s.io/kubernetes/#' | paste -sd,)
    "$W/openapi-gen" --logtostderr=false -i "$dirs" -p k8s.io/kubernetes/pkg/generated/openapi -O zz_generated.openapi \
      -h vendor/k8s.io/code-generator/hack/boilerplate.go.txt -r "$W/violations.report" || exit 1
    ld="-s -w"
    for v in k8s.io/kubernetes/vendor/k8s.io/component-base/version k8s.io/kubernetes/vendor/k8s.io/client-go/pkg/version; do
      ld="$ld -X $v.gitVersion=v1.20.2 -X $v.gitMajor=1 -X $v.gitMinor=20 -X $v.gitTreeState=clean -X $v.buildDate=2021-01-13T00:00:00Z"
    done
    mkdir -p "$W/out"
    go build -ldflags "$ld" -o "$W/out/" ./cmd/kube-apiserver ./cmd/kube-controller-manager ./cmd/kube-scheduler
  ) >"$W/build.log" 2>&1 || { tail -30 "$W/build.log" >&2; die "building from kubernetes $rev failed (full log: $W/build.log)"; }
  # Staged inside the cache, then renamed into place: a directory is either complete or absent.
  local stage="$CACHE/.incoming"
  rm -rf "$stage"; mkdir "$stage"
  for b in kube-apiserver kube-controller-manager kube-scheduler; do mv "$W/out/$b" "$stage/$b-v1.20.2"; done
  rm -rf "${CACHE:?}/$rev"; mv -T "$stage" "$CACHE/$rev"
  exec 9>&-
  rm -rf "$W"
  use "$CACHE/$rev"; echo "$CACHE/$rev"
}

# etcd of DIR on its ports and its data dir (kept: a restart finds its data).
start_etcd() {
  local dir=$1 port; port=$(cat "$1/port")
  local etcd_port=$((port + 1)) peer_port=$((port + 2))
  etcd --name t --data-dir "$dir/etcd-data" --unsafe-no-fsync \
    --listen-client-urls "http://127.0.0.1:$etcd_port" --advertise-client-urls "http://127.0.0.1:$etcd_port" \
    --listen-peer-urls "http://127.0.0.1:$peer_port" --initial-advertise-peer-urls "http://127.0.0.1:$peer_port" \
    --initial-cluster "t=http://127.0.0.1:$peer_port" >>"$dir/etcd.log" 2>&1 &
  echo $! >"$dir/etcd.pid"
}

# Waits until etcd of DIR answers its health check (30 s at most).
wait_etcd() {
  local dir=$1 port; port=$(cat "$1/port")
  for _ in $(seq 1 300); do
    curl -sf "http://127.0.0.1:$((port + 1))/health" 2>/dev/null | grep -q '"health":"true"' && return 0
    sleep 0.1
  done
  echo "etcd did not become healthy; see $dir/etcd.log" >&2; return 1
}

# An apiserver of DIR: NAME (empty: the main one) on PORT, with the flags `start` was given
# (DIR/apiserver.args) and APISERVER_ARGS. Writes its pid file and its kubeconfig.
start_apiserver() {
  local dir=$1 name=$2 port=$3 pki="$1/pki" suffix=${2:+-$2}
  local etcd_port=$(( $(cat "$1/port") + 1 ))
  local extra=()
  read -r -a extra <<<"$(cat "$dir/apiserver.args" 2>/dev/null) ${APISERVER_ARGS:-}"
  "$BIN" --etcd-servers="http://127.0.0.1:$etcd_port" \
    --bind-address=127.0.0.1 --advertise-address=127.0.0.1 --secure-port="$port" --insecure-port=0 \
    --tls-cert-file="$pki/apiserver.crt" --tls-private-key-file="$pki/apiserver.key" --client-ca-file="$pki/ca.crt" \
    --token-auth-file="$pki/tokens.csv" --authorization-mode=RBAC \
    --service-account-issuer=https://kubernetes.default.svc --service-account-key-file="$pki/sa.pub" \
    --service-account-signing-key-file="$pki/sa.key" --service-cluster-ip-range=10.96.0.0/16 \
    --endpoint-reconciler-type=none --cert-dir="$dir/cert$suffix" "${extra[@]}" >>"$dir/apiserver$suffix.log" 2>&1 &
  echo $! >"$dir/apiserver$suffix.pid"
  cat >"$dir/kubeconfig$suffix" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: test
  cluster: {server: "https://127.0.0.1:$port", certificate-authority: "$pki/ca.crt"}
users:
- name: admin
  user: {token: tether-admin-token}
contexts:
- name: test
  context: {cluster: test, user: admin}
current-context: test
EOF
}

# Waits until the apiserver on PORT of DIR is ready (120 s at most).
wait_apiserver() {
  local dir=$1 port=$2
  for _ in $(seq 1 240); do
    if [ "$(curl -s --cacert "$dir/pki/ca.crt" -H 'Authorization: Bearer tether-admin-token' "https://127.0.0.1:$port/readyz" 2>/dev/null)" = ok ]; then
      return 0
    fi
    sleep 0.5
  done
  return 1
}

# Stops the process of pid file DIR/NAME.pid and waits until it has exited (so that its port
# is free again); SIGKILL after 20 s.
stop_one() {
  local f="$1/$2.pid" pid
  [ -f "$f" ] || return 0
  pid=$(cat "$f"); rm -f "$f"
  kill "$pid" 2>/dev/null || return 0
  for _ in $(seq 1 200); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
  kill -KILL "$pid" 2>/dev/null || true
  for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
}

start() {
  local dir=${1:?usage: start DIR [PORT]} port=${2:-16443}
  build >/dev/null
  need etcd etcd-server
  mkdir -p "$dir/pki"; dir=$(cd "$dir" && pwd)
  local pki="$dir/pki"
  if [ ! -f "$pki/ca.crt" ]; then
    openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj /CN=tether-test-ca -keyout "$pki/ca.key" -out "$pki/ca.crt" 2>/dev/null
    openssl req -newkey rsa:2048 -nodes -subj /CN=kube-apiserver -keyout "$pki/apiserver.key" -out "$pki/apiserver.csr" 2>/dev/null
    printf 'subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes.default.svc\n' >"$pki/ext.cnf"
    openssl x509 -req -in "$pki/apiserver.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" -CAcreateserial -days 3650 \
      -extfile "$pki/ext.cnf" -out "$pki/apiserver.crt" 2>/dev/null
    openssl genrsa -out "$pki/sa.key" 2048 2>/dev/null
    openssl rsa -in "$pki/sa.key" -pubout -out "$pki/sa.pub" 2>/dev/null
    echo "tether-admin-token,admin,admin-uid,system:masters" >"$pki/tokens.csv"
  fi
  rm -rf "$dir/etcd-data"
  echo "$port" >"$dir/port"
  echo "${APISERVER_ARGS:-}" >"$dir/apiserver.args"
  start_etcd "$dir"
  APISERVER_ARGS= start_apiserver "$dir" "" "$port"
  if wait_apiserver "$dir" "$port"; then
    if [ -n "${WITH_CONTROLLERS:-}" ]; then
      "$CM" --kubeconfig="$dir/kubeconfig" --authentication-kubeconfig="$dir/kubeconfig" \
        --authorization-kubeconfig="$dir/kubeconfig" --bind-address=127.0.0.1 --secure-port=0 --port=0 \
        --service-account-private-key-file="$pki/sa.key" --root-ca-file="$pki/ca.crt" \
        --controllers='*,-nodeipam,-nodelifecycle,-cloud-node-lifecycle,-service,-route' \
        --leader-elect=false >"$dir/controller-manager.log" 2>&1 &
      echo $! >"$dir/controller-manager.pid"
      "$SCHED" --kubeconfig="$dir/kubeconfig" --authentication-kubeconfig="$dir/kubeconfig" \
        --authorization-kubeconfig="$dir/kubeconfig" --bind-address=127.0.0.1 --secure-port=0 --port=0 \
        --leader-elect=false >"$dir/scheduler.log" 2>&1 &
      echo $! >"$dir/scheduler.pid"
    fi
    echo "$dir/kubeconfig"; return 0
  fi
  echo "kube-apiserver did not become ready; see $dir/apiserver.log" >&2
  stop "$dir"; exit 1
}

# The directory of `start DIR`, checked and made absolute.
started() {
  local dir=${1:?a directory given to start}
  [ -f "$dir/port" ] || die "$dir holds no control plane made by \`start\`"
  (cd "$dir" && pwd)
}

apiserver_stop() {
  local dir; dir=$(started "${1:-}")
  stop_one "$dir" "apiserver${2:+-$2}"
}

apiserver_start() {
  local dir name=${2:-} port pid; dir=$(started "${1:-}")
  if [ -n "$name" ]; then port=${3:?usage: apiserver-start DIR [NAME PORT]}; else port=$(cat "$dir/port"); fi
  build >/dev/null
  pid="$dir/apiserver${name:+-$name}.pid"
  if [ -f "$pid" ] && kill -0 "$(cat "$pid")" 2>/dev/null; then die "apiserver ${name:-(main)} of $dir is running"; fi
  start_apiserver "$dir" "$name" "$port"
  wait_apiserver "$dir" "$port" || die "kube-apiserver ${name:-(main)} did not become ready; see $dir/apiserver${name:+-$name}.log"
  echo "$dir/kubeconfig${name:+-$name}"
}

etcd_stop() {
  local dir; dir=$(started "${1:-}")
  stop_one "$dir" etcd
}

etcd_start() {
  local dir; dir=$(started "${1:-}")
  if [ -f "$dir/etcd.pid" ] && kill -0 "$(cat "$dir/etcd.pid")" 2>/dev/null; then die "etcd of $dir is running"; fi
  start_etcd "$dir"
  wait_etcd "$dir" || exit 1
}

# A call to etcd's v3 JSON gateway (keys and values in base64).
etcd_call() {
  local port; port=$(cat "$1/port")
  curl -sf -X POST "http://127.0.0.1:$((port + 1))/v3/$2" -d "$3"
}

etcd_put() {
  local dir; dir=$(started "${1:-}")
  local key=${2:?usage: etcd-put DIR KEY VALUE} value=${3:?usage: etcd-put DIR KEY VALUE}
  etcd_call "$dir" kv/put "{\"key\":\"$(printf %s "$key" | base64 -w0)\",\"value\":\"$(printf %s "$value" | base64 -w0)\"}" >/dev/null \
    || die "etcd-put: etcd of $dir did not answer"
}

etcd_compact() {
  local dir rev; dir=$(started "${1:-}")
  rev=$(etcd_call "$dir" kv/range '{"key":"AA=="}' | grep -o '"revision":"[0-9]*"' | head -1 | grep -o '[0-9][0-9]*') \
    || die "etcd-compact: etcd of $dir did not answer"
  etcd_call "$dir" kv/compaction "{\"revision\":\"$rev\",\"physical\":true}" >/dev/null \
    || die "etcd-compact: compacting at revision $rev failed"
  echo "$rev"
}

node() {
  local dir=${1:?usage: node DIR NAME} name=${2:?usage: node DIR NAME}
  local url; url=$(grep -o 'https://127.0.0.1:[0-9]*' "$dir/kubeconfig" | head -1)
  local c=(curl -sf --cacert "$dir/pki/ca.crt" -H 'Authorization: Bearer tether-admin-token')
  "${c[@]}" -X POST -H 'Content-Type: application/json' "$url/api/v1/nodes" \
    -d "{\"apiVersion\":\"v1\",\"kind\":\"Node\",\"metadata\":{\"name\":\"$name\",\"labels\":{\"kubernetes.io/hostname\":\"$name\"}}}" >/dev/null
  local now; now=$(date -u +%Y-%m-%dT%H:%M:%SZ)
  "${c[@]}" -X PATCH -H 'Content-Type: application/merge-patch+json' "$url/api/v1/nodes/$name/status" \
    -d "{\"status\":{\"conditions\":[{\"type\":\"Ready\",\"status\":\"True\",\"reason\":\"KubeletReady\",\"lastHeartbeatTime\":\"$now\"}],\"allocatable\":{\"cpu\":\"64\",\"memory\":\"256Gi\",\"pods\":\"1000\"},\"capacity\":{\"cpu\":\"64\",\"memory\":\"256Gi\",\"pods\":\"1000\"}}}" >/dev/null
  # The apiserver taints new nodes not-ready; with no node lifecycle controller nothing re-adds it.
  "${c[@]}" -X PATCH -H 'Content-Type: application/merge-patch+json' "$url/api/v1/nodes/$name" -d '{"spec":{"taints":null}}' >/dev/null
  echo "$name"
}

stop() {
  local dir=${1:?usage: stop DIR}
  local f
  for p in scheduler controller-manager apiserver etcd; do
    for f in "$dir/$p.pid" "$dir/$p"-*.pid; do
      if [ -f "$f" ]; then kill "$(cat "$f")" 2>/dev/null || true; rm -f "$f"; fi
    done
  done
}

case "${1:-}" in
  build) build ;;
  start) shift; start "$@" ;;
  node) shift; node "$@" ;;
  stop) shift; stop "$@" ;;
  apiserver-stop) shift; apiserver_stop "$@" ;;
  apiserver-start) shift; apiserver_start "$@" ;;
  etcd-stop) shift; etcd_stop "$@" ;;
  etcd-start) shift; etcd_start "$@" ;;
  etcd-put) shift; etcd_put "$@" ;;
  etcd-compact) shift; etcd_compact "$@" ;;
  *) sed -n '2,/kube-apiserver.sh etcd-compact DIR/p' "$0"; exit 2 ;;
esac
