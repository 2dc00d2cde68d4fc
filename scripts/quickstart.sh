#!/usr/bin/env bash
# The quickstart: build idem, generate 10,000 sample events (with repeated
# event ids and a few malformed lines), load them into an embedded DuckDB
# file exactly once, and show what landed. No server needed.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/deps.sh
bash scripts/duckdb-lib.sh
cargo build --release --locked -p idem
# Where cargo put it: a CARGO_TARGET_DIR set in the environment moves it.
idem="${CARGO_TARGET_DIR:-target}/release/idem"

mkdir -p quickstart
rm -f quickstart/idem.duckdb quickstart/idem.duckdb.wal quickstart/deadletter.jsonl
"$idem" generate --count 10000 --duplicates 0.05 --malformed 5 --out quickstart/events.jsonl
"$idem" check config/examples/quickstart.toml
"$idem" run config/examples/quickstart.toml
echo
echo "Prove it: every line of the file took effect exactly once in the table:"
"$idem" verify config/examples/quickstart.toml
echo
echo "Run it again: every position is already committed, nothing changes:"
"$idem" run config/examples/quickstart.toml 2>/dev/null
echo
echo "First dead letter (quickstart/deadletter.jsonl):"
head -n 1 quickstart/deadletter.jsonl
