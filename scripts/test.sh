#!/usr/bin/env bash
# The test command: formatting, lints, then every test (unit, DuckDB
# integration, CLI, crash). Installs what it needs first; safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/deps.sh
bash scripts/duckdb-lib.sh
bash scripts/postgres.sh
bash scripts/redis.sh
bash scripts/kafka.sh
bash scripts/s3.sh
bash scripts/s3s-fs.sh

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
