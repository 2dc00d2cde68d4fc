#!/usr/bin/env bash
# A Kafka-API broker for the tests on 127.0.0.1:9092: tansu (crates.io),
# no JVM, no docker. Reuses a broker that already answers there; otherwise
# builds tansu once (about 12 minutes on 2 cores; the binary is cached in
# ~/.cargo/bin) and starts it with its SQLite storage engine in
# ~/.cache/idem/tansu. Idempotent. `scripts/kafka.sh stop` stops it.
set -euo pipefail
VERSION=0.6.0
HOST=127.0.0.1
PORT=9092
DATA="${IDEM_KAFKA_DATA:-$HOME/.cache/idem/tansu}"
BIN="${CARGO_HOME:-$HOME/.cargo}/bin/tansu"
PIDFILE="$DATA/tansu.pid"

# shellcheck source=scripts/server-lib.sh
. "$(dirname "$0")/server-lib.sh"

if [ "${1:-}" = stop ]; then
  stop_server tansu
  exit 0
fi

if listening; then
  exit 0
fi

if ! [ -x "$BIN" ] || ! "$BIN" --version 2>/dev/null | grep -q "$VERSION"; then
  # Its build runs bindgen (libclang) and may run cmake for C dependencies.
  if ! dpkg -s libclang-dev >/dev/null 2>&1 || ! command -v cmake >/dev/null; then
    [ "$(id -u)" = 0 ] || { echo "kafka.sh: tansu's build needs libclang-dev and cmake: sudo apt-get install libclang-dev cmake" >&2; exit 1; }
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libclang-dev cmake >/dev/null
  fi
  echo "kafka.sh: building tansu $VERSION from crates.io (once; about 12 minutes)" >&2
  cargo install "tansu@$VERSION" --locked --features dynostore,postgres,libsql --quiet
fi

mkdir -p "$DATA"
cd "$DATA"
# Its in-memory engine loses end offsets; SQLite keeps them (and restarts).
start_server tansu "$BIN" broker \
  --listener-url "tcp://$HOST:$PORT" \
  --advertised-listener-url "tcp://$HOST:$PORT" \
  --storage-engine "sqlite://tansu.db"
