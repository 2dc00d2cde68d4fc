#!/usr/bin/env bash
# Avro written by a library Idem does not use, for the format tests:
# fastavro (PyPI) in a virtualenv at ~/.cache/idem/avro/venv, and
# scripts/avro-encode.py run with it. Installs once; idempotent.
set -euo pipefail
VERSION=1.13.1
VENV="${IDEM_AVRO_VENV:-$HOME/.cache/idem/avro/venv}"

installed() { "$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("fastavro"))' 2>/dev/null; }
if [ "$(installed)" != "$VERSION" ]; then
  echo "avro-tools.sh: installing fastavro $VERSION from PyPI into $VENV" >&2
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check "fastavro==$VERSION"
fi
