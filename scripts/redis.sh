#!/usr/bin/env bash
# Redis for the tests, on 127.0.0.1:6379 (the dedup store). Installs
# Debian's `redis-server` when missing; reuses a server that already answers
# there, else starts one in the background, loopback only, with its data in
# ~/.cache/idem/redis. Idempotent. `scripts/redis.sh stop` stops the one it
# started.
set -euo pipefail
HOST=127.0.0.1
PORT="${IDEM_REDIS_PORT:-6379}"
DATA="${IDEM_REDIS_DATA:-$HOME/.cache/idem/redis}"
PIDFILE="$DATA/redis.pid"

# shellcheck source=scripts/server-lib.sh
. "$(dirname "$0")/server-lib.sh"

if [ "${1:-}" = stop ]; then
  stop_server redis-server
  exit 0
fi

# The binary even when a server already answers: the TLS test starts a
# private one, and the benchmark runs redis-benchmark.
if ! command -v redis-server >/dev/null; then
  [ "$(id -u)" = 0 ] || { echo "redis.sh: Redis is not installed; run as root or: sudo apt-get install redis-server" >&2; exit 1; }
  echo "redis.sh: installing redis-server (Debian)" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
  # The package may have started its own service.
  for _ in $(seq 1 5); do listening && break; sleep 1; done
fi

if listening; then
  exit 0
fi

mkdir -p "$DATA"
start_server redis-server redis-server --bind "$HOST" --port "$PORT" \
  --dir "$DATA" --save "" --appendonly no --daemonize no
