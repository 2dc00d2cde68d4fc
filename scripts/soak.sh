#!/usr/bin/env bash
# Soak: the crash harness (testkit/src/crash.rs) run until the real binary has
# been killed N times per sink and mode (SIGKILL at random moments, aborts
# at the fail points after_write, mid_write and after_commit), then every
# source message is checked to be in the sink exactly once. Not part of CI:
# 1,000 kills take minutes per sink.
#
#   bash scripts/soak.sh [KILLS] [SINK ...]     KILLS default 1000; SINKs: duckdb postgres s3 http
#
# Prints one line per sink and mode: kills, fail points hit, messages, result.
set -euo pipefail
cd "$(dirname "$0")/.."

kills="${1:-1000}"
shift || true
sinks=("$@")
[ ${#sinks[@]} -gt 0 ] || sinks=(duckdb postgres)

bash scripts/deps.sh
bash scripts/duckdb-lib.sh
for s in "${sinks[@]}"; do
  case "$s" in
    postgres) bash scripts/postgres.sh ;;
    s3) bash scripts/s3.sh ;;
    http) bash scripts/redis.sh ;;
    duckdb) ;;
    *) echo "soak.sh: unknown sink $s (duckdb, postgres, s3, http)" >&2; exit 2 ;;
  esac
done

log="$(mktemp)"
bins="$(mktemp -d)"
trap 'rm -rf "$log" "$bins"' EXIT
# Build once and run copies: a build while the soak runs (it takes long)
# cannot replace the binaries underneath it.
tests=()
for s in "${sinks[@]}"; do tests+=(--test "crash_$s"); done
cargo build --locked -p idem --bin idem
cp target/debug/idem "$bins/idem"
cargo test --locked -p idem "${tests[@]}" --no-run --message-format=json 2>/dev/null \
  | python3 -c '
import json, sys, shutil
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"].startswith("crash_"):
        shutil.copy(m["executable"], sys.argv[1] + "/" + m["target"]["name"])
' "$bins"
status=0
for s in "${sinks[@]}"; do
  echo "== soak: $s, $kills kills per mode" >&2
  started=$(date +%s)
  echo "     Running crash_$s" >>"$log"
  if ! IDEM_BIN="$bins/idem" IDEM_CRASH_KILLS="$kills" "$bins/crash_$s" --nocapture --test-threads 1 2>&1 \
      | tee -a "$log" | grep -E "^SOAK|crash test seed|panicked|test result" >&2; then
    status=1
  fi
  echo "   ($(( $(date +%s) - started )) s)" >&2
done

echo
echo "sink/mode                kills  fail points hit                                              messages  result"
grep -E "^SOAK|^     Running|panicked" "$log" | awk '
  /Running/ { match($0, /crash_[a-z0-9]+/); sink = substr($0, RSTART + 6, RLENGTH - 6) }
  /^SOAK/ {
    for (i = 2; i <= NF; i++) { split($i, kv, "="); f[kv[1]] = kv[2] }
    fp = $0; sub(/.*failpoints=/, "", fp); sub(/ messages=.*/, "", fp)
    printf "%-24s %6s  %-60s %9s  %s\n", sink "/" f["mode"], f["kills"], fp, f["messages"], f["result"]
  }
  /panicked/ { printf "%-24s FAILED: %s\n", sink, $0 }'
grep -qE "panicked|FAILED" "$log" && status=1
exit $status
