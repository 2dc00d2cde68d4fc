#!/usr/bin/env bash
# The test command: formatting, lints, then every test (unit, DuckDB
# integration, CLI, crash). Installs what it needs first; safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/deps.sh
bash scripts/duckdb-lib.sh

echo "== cargo fmt --check" >&2
cargo fmt --all -- --check
echo "== cargo clippy" >&2
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== cargo test" >&2
cargo test --workspace --locked
