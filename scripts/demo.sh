#!/usr/bin/env bash
# Tether's main job on its embedded default, from a fresh machine: set-up, build, then the
# seed's workloads through the built-in policy chain, as a table of who keeps which identity.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build --locked -q -p tetherd
T=target/debug/tetherd
[ -n "${CARGO_TARGET_DIR:-}" ] && T="$CARGO_TARGET_DIR/debug/tetherd"
W=tests/workloads
objects=(--object "$W/vm-cirros.yaml" --object "$W/statefulset.yaml")

row() { # step, pod file, extra args...
  local step=$1 pod=$2; shift 2
  "$T" policy test --pod "$W/$pod" "${objects[@]}" "$@" | python3 -c '
import json, sys
step = sys.argv[1]
d = json.load(sys.stdin)
dec = d.get("decision") or {}
ident = dec.get("identity", "-")
share = "yes" if dec.get("mayShare") else "no"
cols = (step, d["pod"], str(d.get("decidedBy")), dec.get("type", "error"), ident, share)
print("%-34s %-40s %-12s %-10s %-20s %s" % cols)
' "$step"
}

printf '%-34s %-40s %-12s %-10s %-20s %s\n' STEP POD POLICY DECISION IDENTITY MAY-SHARE
row "VM pod (virt-launcher)"            virt-launcher-pod.yaml
row "VM live-migration target pod"      virt-launcher-migration-target.yaml
row "StatefulSet replica"               statefulset-pod.yaml
row "Deployment pod"                    deployment-pod.yaml
row "VM pod, VM pinning switched off"   virt-launcher-pod.yaml --policy builtin:statefulset --policy builtin:stateless
