#!/usr/bin/env bash
# Builds Tether's container image (images/tetherd/Containerfile): FROM scratch with two
# statically linked musl binaries, /usr/bin/tetherd and the /usr/bin/tether CNI plugin. Then
# proves the image runs: `tetherd --version`, the plugin's CNI VERSION call, the built-in
# policy chain evaluated for a pod (wasmtime's cranelift JIT in a static musl binary), and a
# standalone daemon that starts and turns ready, all inside a working container of the
# image, which is removed afterwards.
#
#   scripts/image.sh                   build, tag and smoke-test the image
#   scripts/image.sh --save FILE       also write it as an OCI archive to FILE, for
#                                      `ctr -n k8s.io images import FILE` or
#                                      `kind load image-archive FILE`
#   TETHER_IMAGE=REF scripts/image.sh  tag it REF instead of
#                                      localhost/tether/tetherd:<workspace version>
#
# Needs buildah (Debian: apt-get install -y buildah), musl-gcc (Debian: musl-tools; ring's C
# and assembly are compiled with it) and binutils (readelf, objcopy). Runs buildah with the
# vfs storage driver and chroot isolation, which work as root without overlayfs or user
# namespaces (STORAGE_DRIVER and BUILDAH_ISOLATION override them). The release build goes
# to $CARGO_TARGET_DIR (default target/) under x86_64-unknown-linux-musl/, like
# scripts/dist.sh's plugin build; the first one took 22 minutes on 2 cores shared with
# another release build (thin LTO, one codegen unit).
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '[image] %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

save=
while [ $# -gt 0 ]; do
  case $1 in
    --save) [ $# -ge 2 ] || die "--save needs a FILE"; save=$2; shift 2 ;;
    --save=*) save=${1#--save=}; shift ;;
    -h | --help) sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; exit 0 ;;
    *) die "unknown argument '$1' (usage: scripts/image.sh [--save FILE])" ;;
  esac
done
if [ -n "$save" ]; then
  case $save in /*) ;; *) save="$PWD/$save" ;; esac
  [ -d "$(dirname "$save")" ] || die "--save $save: directory $(dirname "$save") does not exist"
fi

command -v buildah >/dev/null ||
  die "buildah not found: install it first (Debian/Ubuntu: apt-get install -y buildah)"
for t in readelf objcopy; do
  command -v $t >/dev/null || die "$t not found (Debian: apt-get install -y binutils)"
done

triple=x86_64-unknown-linux-musl
# ring compiles C and assembly for the target: with musl's wrapper, not the host's glibc gcc.
export CC_x86_64_unknown_linux_musl=${CC_x86_64_unknown_linux_musl:-musl-gcc}
command -v "$CC_x86_64_unknown_linux_musl" >/dev/null ||
  die "$CC_x86_64_unknown_linux_musl not found: ring needs a C compiler for $triple (Debian: apt-get install -y musl-tools)"

version=$(awk '/^\[/ { s = ($0 == "[workspace.package]") }
  s && /^version *=/ { gsub(/^version *= *"|".*$/, ""); print; exit }' Cargo.toml)
[ -n "$version" ] || die "no version under [workspace.package] in Cargo.toml"
image=${TETHER_IMAGE:-localhost/tether/tetherd:$version}
driver=${STORAGE_DRIVER:-vfs}
bah() { buildah --storage-driver "$driver" "$@"; }
isolation=${BUILDAH_ISOLATION:-chroot}

target=${CARGO_TARGET_DIR:-target}
say "building tetherd and the tether plugin for $triple (release)"
cargo build --locked --release -p tetherd -p tether-cni --target "$triple"
bins="$target/$triple/release"

# Static means: no program interpreter (PT_INTERP) and no shared-library dependency (NEEDED).
# Rust's musl binaries are static-pie; their dynamic section only holds relocations.
for b in tetherd tether; do
  f="$bins/$b"
  [ -x "$f" ] || die "$f was not built"
  if readelf -lW "$f" | grep -q 'Requesting program interpreter'; then
    die "$f is dynamically linked: $(readelf -lW "$f" | grep -o 'interpreter: [^]]*')"
  fi
  if readelf -dW "$f" | grep -q '(NEEDED)'; then
    die "$f needs shared libraries: $(readelf -dW "$f" | grep '(NEEDED)' | grep -o '\[.*\]' | tr '\n' ' ')"
  fi
  say "$b: static, no NEEDED ($(file -b "$f" 2>/dev/null | grep -o 'static[-a-z]* linked' || echo ELF)), $(du -h "$f" | cut -f1)"
done

work=$(mktemp -d)
ctr=
daemon=
cleanup() {
  if [ -n "$daemon" ] && kill -0 "$daemon" 2>/dev/null; then
    kill "$daemon" 2>/dev/null || true
    wait "$daemon" 2>/dev/null || true
  fi
  if [ -n "$ctr" ]; then bah rm "$ctr" >/dev/null || say "could not remove working container $ctr"; fi
  rm -rf "$work"
}
trap cleanup EXIT

# The release profile keeps line tables (debug = "line-tables-only"), and the musl target's
# std adds its own debug info: about 105 of tetherd's 140 MB. The image gets copies without
# debug sections (objcopy --strip-debug keeps the symbol table, so a panic's backtrace still
# names functions); the unstripped binaries stay under $bins for symbolizing.
# TETHER_IMAGE_DEBUGINFO=1 ships them unstripped.
mkdir "$work/context"
for b in tetherd tether; do
  if [ "${TETHER_IMAGE_DEBUGINFO:-0}" = 1 ]; then
    cp "$bins/$b" "$work/context/$b"
  else
    objcopy --strip-debug "$bins/$b" "$work/context/$b"
  fi
done
say "building $image"
previous=$(bah images --quiet --no-trunc "$image" 2>/dev/null || true)
bah bud --isolation "$isolation" --pull=never --build-arg "VERSION=$version" \
  -f images/tetherd/Containerfile -t "$image" "$work/context"
# The image the tag named before is left nameless: remove it unless something still uses it
# (vfs keeps a full copy of every image).
current=$(bah images --quiet --no-trunc "$image")
if [ -n "$previous" ] && [ "$previous" != "$current" ]; then
  bah rmi "$previous" >/dev/null 2>&1 || true
fi

say "smoke test: a working container of $image"
ctr=$(bah from --pull=never --quiet "$image")
run() { bah run --isolation "$isolation" "$@"; }

echo "\$ tetherd --version"
run "$ctr" -- /usr/bin/tetherd --version
echo "\$ echo '{\"cniVersion\":\"1.1.0\"}' | CNI_COMMAND=VERSION tether"
out=$(printf '{"cniVersion":"1.1.0"}' | run --env CNI_COMMAND=VERSION "$ctr" -- /usr/bin/tether)
printf '%s\n' "$out"
case $out in *'"supportedVersions"'*) ;; *) die "the plugin's VERSION answer has no supportedVersions" ;; esac

# The built-in policy chain evaluated for a plain pod: cranelift compiles the components and
# the static musl binary runs the JIT code.
mkdir -p "$work/smoke/state" "$work/smoke/pools"
cat >"$work/smoke/pod.yaml" <<'EOF'
apiVersion: v1
kind: Pod
metadata: {name: smoke, namespace: default, uid: 00000000-0000-0000-0000-000000000001}
spec: {containers: [{name: c, image: x}]}
EOF
echo "\$ tetherd policy test --pod pod.yaml"
out=$(run --volume "$work/smoke:/smoke" "$ctr" -- /usr/bin/tetherd policy test --pod /smoke/pod.yaml)
printf '%s\n' "$out" | tr -d ' \n'; echo
case $out in *'"decidedBy": "stateless"'*) ;; *) die "the built-in chain did not decide 'stateless' for a plain pod" ;; esac

# Standalone mode with no pool: the daemon starts (compiling the built-in policies) and
# turns ready.
echo "\$ tetherd run --socket /smoke/t.sock --state-dir /smoke/state --pools /smoke/pools & tetherd wait --socket /smoke/t.sock"
# buildah itself goes to the background, not through a shell function: killing the function's
# subshell would leave buildah and the daemon running, while killing `buildah run` ends the
# process it runs.
buildah --storage-driver "$driver" run --isolation "$isolation" --volume "$work/smoke:/smoke" "$ctr" -- \
  /usr/bin/tetherd run --socket /smoke/t.sock --state-dir /smoke/state --pools /smoke/pools \
  >"$work/daemon.log" 2>&1 &
daemon=$!
if ! run --volume "$work/smoke:/smoke" "$ctr" -- /usr/bin/tetherd wait --socket /smoke/t.sock --timeout-secs 60; then
  sed 's/^/  tetherd: /' "$work/daemon.log" >&2
  die "the daemon in the image did not turn ready"
fi
kill "$daemon"
wait "$daemon" 2>/dev/null || true
daemon=

bah rm "$ctr" >/dev/null
ctr=

if [ -n "$save" ]; then
  rm -f "$save"
  bah push --quiet "$image" "oci-archive:$save:$image"
  say "wrote $save ($(du -h "$save" | cut -f1))"
fi
say "image $image: $(bah images --format '{{.Size}}' "$image" | head -n1)"
echo "$image"
