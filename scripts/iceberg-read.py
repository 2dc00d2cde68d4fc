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
import os
import sys

from pyiceberg.catalog.sql import SqlCatalog

url, name, warehouse, table = sys.argv[1:5]
columns = sys.argv[5].split(",") if len(sys.argv) > 5 else None
props = {"uri": url, "warehouse": warehouse, "init_catalog_tables": "false"}
if os.environ.get("IDEM_S3_ENDPOINT"):
    props.update({
        "s3.endpoint": os.environ["IDEM_S3_ENDPOINT"],
        "s3.access-key-id": os.environ.get("AWS_ACCESS_KEY_ID", ""),
        "s3.secret-access-key": os.environ.get("AWS_SECRET_ACCESS_KEY", ""),
        "s3.region": os.environ.get("AWS_REGION", "us-east-1"),
        "s3.path-style-access": "true",
    })
t = SqlCatalog(name, **props).load_table(table)
scan = t.scan(selected_fields=tuple(columns)) if columns else t.scan()
json.dump({
    "rows": scan.to_arrow().to_pylist(),
    "properties": dict(t.properties),
    "snapshots": len(t.metadata.snapshots),
}, sys.stdout, default=str)
