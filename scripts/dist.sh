#!/usr/bin/env bash
# Builds what is shipped into dist/: tetherd (release) and the `tether` CNI plugin, statically
# linked against musl so that it runs on any node whatever its libc, and starts in about a
# quarter of the CPU time a static glibc build needs (glibc probes the CPU at start-up, and
# each CPUID traps to the hypervisor on a VM).
#
#   scripts/dist.sh            -> dist/tetherd, dist/tether
set -euo pipefail
cd "$(dirname "$0")/.."
target=${CARGO_TARGET_DIR:-target}
cargo build --locked --release -p tetherd
cargo build --locked --release -p tether-cni --target x86_64-unknown-linux-musl
mkdir -p dist
cp "$target/release/tetherd" dist/tetherd
cp "$target/x86_64-unknown-linux-musl/release/tether" dist/tether
echo "dist/tetherd dist/tether"
