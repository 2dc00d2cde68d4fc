#!/usr/bin/env bash
# A second S3-compatible server for the tests on 127.0.0.1:5001: s3s-fs
# (crates.io), which keeps objects on disk and, unlike moto, checks the
# request signature against one access key. The tests use it for wrong
# credentials and for a store restarted mid-run; its conditional writes are
# not atomic, so fencing races are tested against moto (scripts/s3.sh).
# Reuses a server that already answers there; otherwise builds s3s-fs once
# (about 2 minutes; cached in ~/.cargo/bin) and starts it with its data in
# ~/.cache/idem/s3s-fs. Idempotent. `scripts/s3s-fs.sh stop` stops it.
set -euo pipefail
VERSION=0.14.1
HOST=127.0.0.1
PORT=5001
# The tests sign with these (testkit/src/s3.rs).
ACCESS_KEY=idem-test
SECRET_KEY=idem-test-secret
DATA="${IDEM_S3S_DATA:-$HOME/.cache/idem/s3s-fs}"
BIN="${CARGO_HOME:-$HOME/.cargo}/bin/s3s-fs"
PIDFILE="$DATA/s3s-fs.pid"

# shellcheck source=scripts/server-lib.sh
. "$(dirname "$0")/server-lib.sh"

if [ "${1:-}" = stop ]; then
  stop_server s3s-fs
  exit 0
fi

if listening; then
  exit 0
fi

if ! [ -x "$BIN" ] || ! "$BIN" --version 2>/dev/null | grep -q "$VERSION"; then
  echo "s3s-fs.sh: building s3s-fs $VERSION from crates.io (once; about 2 minutes)" >&2
  cargo install "s3s-fs@$VERSION" --features binary --locked --quiet
fi

mkdir -p "$DATA/buckets"
start_server s3s-fs "$BIN" \
  --host "$HOST" --port "$PORT" \
  --access-key "$ACCESS_KEY" --secret-key "$SECRET_KEY" \
  "$DATA/buckets"
