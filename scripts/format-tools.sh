#!/usr/bin/env bash
# Avro and Protobuf written and read by libraries Idem does not use, for
# the format tests: fastavro, and Google's protobuf runtime with protoc
# (grpcio-tools), from PyPI in a virtualenv at ~/.cache/idem/formats/venv;
# scripts/avro-*.py and scripts/proto-encode.py run with it. Installs
# once; idempotent.
set -euo pipefail
PACKAGES="fastavro==1.13.1 protobuf==7.36.2 grpcio-tools==1.85.1"
VENV="${IDEM_FORMATS_VENV:-$HOME/.cache/idem/formats/venv}"

installed() {
  "$VENV/bin/python" - "$@" 2>/dev/null <<'PY'
import importlib.metadata as m, sys
print(" ".join(f"{p.split('==')[0]}=={m.version(p.split('==')[0])}" for p in sys.argv[1:]))
PY
}
if [ "$(installed $PACKAGES)" != "$PACKAGES" ]; then
  echo "format-tools.sh: installing $PACKAGES from PyPI into $VENV" >&2
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check $PACKAGES
fi
