#!/usr/bin/env python3
"""Read an Iceberg table with PyIceberg through its SqlCatalog: the reader
the tests check Idem's tables with, one Idem did not write. Prints one
JSON document: {"rows": [...], "properties": {...}, "snapshots": N}, the
rows of the current snapshot with values as PyArrow gives them
(timestamps and bytes as text).

usage: iceberg-read.py SQLALCHEMY_URL CATALOG WAREHOUSE NAMESPACE.TABLE [COLUMNS]
An s3:// warehouse is read at $IDEM_S3_ENDPOINT with the AWS_* variables.
"""
import json
import sys

from iceberg_catalog import open_catalog

url, name, warehouse, table = sys.argv[1:5]
columns = sys.argv[5].split(",") if len(sys.argv) > 5 else None
t = open_catalog(url, name, warehouse).load_table(table)
scan = t.scan(selected_fields=tuple(columns)) if columns else t.scan()
json.dump({
    "rows": scan.to_arrow().to_pylist(),
    "properties": dict(t.properties),
    "snapshots": len(t.metadata.snapshots),
}, sys.stdout, default=str)
