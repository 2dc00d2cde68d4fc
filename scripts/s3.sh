#!/usr/bin/env bash
# An S3-compatible server for the tests on 127.0.0.1:5000: moto's server
# (PyPI `moto[server]`), which honours conditional PUTs (If-None-Match: *,
# If-Match) atomically and lists multipart uploads. It keeps objects in
# memory: a restart of the server empties it, a restart of Idem does not.
# It serves AWS Glue's API on the same port, for the Iceberg sink's Glue
# catalog test.
# Reuses a server that already answers there; otherwise installs moto once
# into a virtualenv in ~/.cache/idem/moto and starts it. Idempotent.
# `scripts/s3.sh stop` stops it.
set -euo pipefail
VERSION=5.2.5
HOST=127.0.0.1
PORT=5000
DATA="${IDEM_S3_DATA:-$HOME/.cache/idem/moto}"
VENV="$DATA/venv"
PIDFILE="$DATA/moto.pid"

# shellcheck source=scripts/server-lib.sh
. "$(dirname "$0")/server-lib.sh"

if [ "${1:-}" = stop ]; then
  stop_server moto_server
  exit 0
fi

if listening; then
  exit 0
fi

mkdir -p "$DATA"
installed() { "$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("moto"))' 2>/dev/null; }
if ! [ -x "$VENV/bin/moto_server" ] || [ "$(installed)" != "$VERSION" ]; then
  echo "s3.sh: installing moto[server] $VERSION from PyPI into $VENV" >&2
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check "moto[server]==$VERSION"
fi

start_server moto_server "$VENV/bin/moto_server" -H "$HOST" -p "$PORT"
