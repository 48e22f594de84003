#!/usr/bin/env bash
# Tether's main job on its embedded default, from a fresh machine: set-up, build, then the
# seed's walkthrough (a KubeVirt VM keeps its IP across pod restart, VMI recreation and live
# migration; a StatefulSet pod keeps its IP; a Deployment pod gets a fresh one; the pool runs
# out with a clear error; VM pinning can be switched off), printed as a table.
# As root it wires real macvlan interfaces in network namespaces; otherwise the IPAM path alone.
set -euo pipefail
cd "$(dirname "$0")/.."
say() { printf '[demo] %s\n' "$*" >&2; }
bash scripts/setup.sh
say "building tetherd, the tether plugin and the walkthrough (first run takes several minutes)"
cargo build --locked --workspace --bins
say "running the walkthrough"
exec "${CARGO_TARGET_DIR:-target}/debug/tether-demo"
