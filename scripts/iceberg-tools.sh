#!/usr/bin/env bash
# PyIceberg, the reader the Iceberg tests check Idem's tables with: its
# SqlCatalog on the test PostgreSQL (its GlueCatalog, through boto3, on the
# test store's Glue), pyarrow for the data files. From PyPI
# in a virtualenv at ~/.cache/idem/iceberg/venv; scripts/iceberg-read.py
# runs with it. Installs once; idempotent.
set -euo pipefail
. "$(dirname "$0")/venv-lib.sh"
pip_venv iceberg-tools.sh "${IDEM_ICEBERG_VENV:-$HOME/.cache/idem/iceberg/venv}" \
  pyiceberg==0.12.0 pyarrow==26.0.1 SQLAlchemy==2.1.9 psycopg2-binary==2.9.13 boto3==1.44.8
