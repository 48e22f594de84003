#!/usr/bin/env bash
# The whole test suite, from a fresh machine: set-up, format and lint checks, then every test.
# CI (.ci/run) runs exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# cargo-nextest and cargo-fuzz, as setup.sh installed them.
export PATH="${TETHER_CARGO_BIN:-/var/cache/tether/cargo-bin}/bin:$PATH"

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== build (the end-to-end tests run the tetherd and tether binaries)"
cargo build --workspace --locked --bins
echo "== tests"
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --locked --no-fail-fast
elif [ "${CI:-}" = true ]; then
  echo "cargo-nextest is missing (scripts/setup.sh installs it)" >&2; exit 1
else
  echo "cargo-nextest is missing: running cargo test, without .config/nextest.toml's settings" >&2
  cargo test --workspace --locked --no-fail-fast
fi
echo "== fuzz (scripts/fuzz.sh ci: each target ${TETHER_FUZZ_CI_SECS:-35} s; a crash fails)"
bash scripts/fuzz.sh ci
