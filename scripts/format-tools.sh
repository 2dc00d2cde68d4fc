#!/usr/bin/env bash
# Avro and Protobuf written and read by libraries Idem does not use, for
# the format tests: fastavro, and Google's protobuf runtime with protoc
# (grpcio-tools), from PyPI in a virtualenv at ~/.cache/idem/formats/venv;
# scripts/avro-*.py and scripts/proto-encode.py run with it. Installs
# once; idempotent.
set -euo pipefail
. "$(dirname "$0")/venv-lib.sh"
pip_venv format-tools.sh "${IDEM_FORMATS_VENV:-$HOME/.cache/idem/formats/venv}" \
  fastavro==1.13.1 protobuf==7.36.2 grpcio-tools==1.85.1
