#!/usr/bin/env bash
# Fuzzing (libFuzzer through cargo-fuzz, stable Rust): the targets of fuzz/ over the CNI
# plugin's config and environment parsing, the daemon's socket API, IPPool and workload
# manifests, and policy component loading (docs/reliability.md, "Hostile input").
#
#   scripts/fuzz.sh install        installs cargo-fuzz $CARGO_FUZZ_VERSION (pinned) into
#                                  $TETHER_CARGO_BIN (/var/cache/tether/cargo-bin); setup.sh calls it
#   scripts/fuzz.sh ci             builds every target, runs each for $TETHER_FUZZ_CI_SECS (35) s
#   scripts/fuzz.sh long [SECONDS] the same, each target SECONDS (default 3600) s
#   scripts/fuzz.sh run TARGET [SECONDS] one target
#
# Stable toolchain only: `--sanitizer none` (every sanitizer needs nightly's -Zsanitizer; the
# code under test is safe Rust, whose checks, debug assertions and overflow checks on, stay).
# Builds go to $TETHER_FUZZ_TARGET (/var/cache/tether/target-fuzz), never another target
# directory; the corpus grown by each run is kept there too (corpus/TARGET), beside the
# committed seeds (fuzz/corpus/TARGET), which are only read. Each target's executions go to
# $TETHER_FUZZ_TARGET/summary.txt. Fails on any crash, hang (a single input over
# $TETHER_FUZZ_TIMEOUT, 20 s), out-of-memory, crash artifact left behind, or a target that did
# not run.
set -euo pipefail
cd "$(dirname "$0")/.."

CARGO_FUZZ_VERSION=0.13.2
TARGETS=(cni_parse cni_response api_request manifests policy_load)
bin_root=${TETHER_CARGO_BIN:-/var/cache/tether/cargo-bin}
export PATH="$bin_root/bin:$PATH"
export CARGO_TARGET_DIR=${TETHER_FUZZ_TARGET:-/var/cache/tether/target-fuzz}
# Flags shared by build and run (any difference rebuilds): no sanitizer (stable), 16 codegen
# units (cargo fuzz's default of 1 doubles the cold build on two cores).
FUZZ_FLAGS=(--sanitizer none --codegen-units 16 --fuzz-dir fuzz)

say() { printf '[fuzz] %s\n' "$*" >&2; }

install() {
  if cargo-fuzz --version 2>/dev/null | grep -qx "cargo-fuzz $CARGO_FUZZ_VERSION"; then
    return 0
  fi
  if ! mkdir -p "$bin_root" 2>/dev/null || [ ! -w "$bin_root" ]; then
    say "cannot write $bin_root: not installing cargo-fuzz (scripts/fuzz.sh install as root)"
    return 1
  fi
  say "installing cargo-fuzz $CARGO_FUZZ_VERSION into $bin_root"
  cargo install --quiet --locked cargo-fuzz --version "$CARGO_FUZZ_VERSION" --root "$bin_root"
}

# libfuzzer-sys compiles libFuzzer (C++) with the system's c++ (setup.sh installs g++),
# whether or not cargo-fuzz was just installed.
need_cxx() {
  command -v c++ >/dev/null && return 0
  say "no C++ compiler: install g++ (scripts/setup.sh does; libFuzzer is C++)"
  return 1
}

build() {
  need_cxx
  # The lock file is committed: refuse to change it (cargo fuzz has no --locked).
  cargo fetch --locked --quiet --manifest-path fuzz/Cargo.toml
  local t0=$SECONDS
  cargo fuzz build "${FUZZ_FLAGS[@]}"
  say "built every target in $((SECONDS - t0)) s"
}

# Seeds made from what the build produced: the built-in policies and the policy fixtures
# (hostile, WASI import, other contract version) as tether-builtins compiled them for this
# build, and a core module.
policy_seeds() {
  local dir=$CARGO_TARGET_DIR/seeds/policy_load out
  rm -rf "$dir"; mkdir -p "$dir"
  out=$(ls -td "$CARGO_TARGET_DIR"/*/release/build/tether-builtins-*/out 2>/dev/null | head -n1 || true)
  if [ -z "$out" ] || ! ls "$out"/*.wasm >/dev/null 2>&1; then
    say "no built policy components under $CARGO_TARGET_DIR/*/release/build/tether-builtins-*/out"
    return 1
  fi
  cp "$out"/*.wasm "$dir"/
  echo "$dir"
}

# run TARGET SECONDS: one bounded run; appends its line to the summary.
run_one() {
  local target=$1 secs=$2
  local work=$CARGO_TARGET_DIR/corpus/$target artifacts=$CARGO_TARGET_DIR/artifacts/$target/
  local log=$CARGO_TARGET_DIR/logs/$target.log
  # Artifacts of an earlier run are kept aside: only this run's count.
  if [ -d "$artifacts" ] && [ -n "$(ls -A "$artifacts")" ]; then
    mkdir -p "$CARGO_TARGET_DIR/artifacts-earlier/$target"
    mv "$artifacts"* "$CARGO_TARGET_DIR/artifacts-earlier/$target/"
  fi
  mkdir -p "$work" "$artifacts" "$(dirname "$log")"
  local seeds=(fuzz/corpus/"$target")
  if [ "$target" = policy_load ]; then seeds+=("$(policy_seeds)"); fi
  local max_len=16384
  [ "$target" = policy_load ] && max_len=131072
  say "$target: ${secs} s"
  local rc=0
  cargo fuzz run "${FUZZ_FLAGS[@]}" "$target" "$work" "${seeds[@]}" -- \
    -max_total_time="$secs" -timeout="${TETHER_FUZZ_TIMEOUT:-20}" -rss_limit_mb=4096 \
    -max_len="$max_len" -artifact_prefix="$artifacts" -print_final_stats=1 \
    >"$log" 2>&1 || rc=$?
  local execs cov
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n1)
  cov=$(grep -E '^#[0-9]+' "$log" | tail -n1 | sed -n 's/.*cov: \([0-9]*\).*/\1/p')
  local left
  left=$(find "$artifacts" -type f | head -n5)
  printf '%-12s executions=%-10s per_second=%-7s coverage=%-6s corpus=%-5s exit=%s\n' \
    "$target" "${execs:-none}" "$(( ${execs:-0} / (secs > 0 ? secs : 1) ))" "${cov:-?}" \
    "$(find "$work" -type f | wc -l)" "$rc" >>"$summary"
  if [ "$rc" != 0 ] || [ -z "$execs" ] || [ "$execs" = 0 ] || [ -n "$left" ]; then
    say "$target FAILED (exit $rc, executions ${execs:-none}); log: $log"
    [ -n "$left" ] && say "artifacts left: $left (reproduce: cargo fuzz run ${FUZZ_FLAGS[*]} $target FILE)"
    grep -E -A30 'panicked|ERROR: libFuzzer|==[0-9]+==' "$log" | head -n60 >&2 || tail -n30 "$log" >&2
    failed+=("$target")
  fi
}

run_all() {
  local secs=$1; shift
  local targets=("$@")
  [ ${#targets[@]} -gt 0 ] || targets=("${TARGETS[@]}")
  install
  build
  # The api_request target's store: on tmpfs when there is one, removed afterwards.
  TETHER_FUZZ_TMP=$(mktemp -d -p /dev/shm tether-fuzz.XXXXXX 2>/dev/null || mktemp -d -t tether-fuzz.XXXXXX)
  export TETHER_FUZZ_TMP
  trap 'rm -rf "$TETHER_FUZZ_TMP"' EXIT
  summary=$CARGO_TARGET_DIR/summary.txt
  : >"$summary"
  echo "# scripts/fuzz.sh, $(date -u +%FT%TZ), ${secs} s per target, $(git rev-parse --short HEAD 2>/dev/null || echo '?')" >>"$summary"
  failed=()
  for t in "${targets[@]}"; do run_one "$t" "$secs"; done
  cat "$summary"
  if [ ${#failed[@]} -gt 0 ]; then
    say "failed: ${failed[*]}"; exit 1
  fi
  say "every target ran, nothing crashed; summary in $summary"
}

case "${1:-ci}" in
  install) install ;;
  build) install; build ;;
  ci) run_all "${TETHER_FUZZ_CI_SECS:-35}" ;;
  long) run_all "${2:-3600}" ;;
  run) [ -n "${2:-}" ] || { say "usage: scripts/fuzz.sh run TARGET [SECONDS]"; exit 2; }
       run_all "${3:-60}" "$2" ;;
  *) say "usage: scripts/fuzz.sh install|build|ci|long [SECONDS]|run TARGET [SECONDS]"; exit 2 ;;
esac
