#!/usr/bin/env bash
# The test command: formatting, lints, then every test (unit, DuckDB
# integration, CLI, crash). Installs what it needs first; safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."

# Each install-and-start step says how long it took (seconds).
step() {
  local started=$SECONDS
  bash "scripts/$1"
  echo "== scripts/$1: $((SECONDS - started)) s" >&2
}
step deps.sh
step duckdb-lib.sh
step postgres.sh
step redis.sh
step kafka.sh
step connect.sh
step s3.sh
step s3s-fs.sh
step format-tools.sh
step iceberg-tools.sh
step iceberg-rest.sh

echo "== cargo fmt --check" >&2
cargo fmt --all -- --check
echo "== import cycles between files" >&2
python3 scripts/check-cycles.py
echo "== cargo clippy" >&2
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== cargo test" >&2
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
set +e
cargo test --workspace --lib --bins --tests --locked 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
# One closing line for the whole run, summed over every test binary.
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
exit "$status"
