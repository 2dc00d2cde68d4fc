#!/usr/bin/env python3
"""Read an Iceberg table with PyIceberg through its SqlCatalog: the reader
the tests check Idem's tables with, one Idem did not write. Prints one
JSON document: {"rows": [...], "properties": {...}, "snapshots": N,
"spec": ["day(at)", ...], "partitions": [...]}, the rows of the current
snapshot with values as PyArrow gives them (timestamps and bytes as text),
and the partitions PyIceberg finds in its manifests.

usage: iceberg-read.py [--filter EXPR] SQLALCHEMY_URL CATALOG WAREHOUSE NAMESPACE.TABLE
--filter scans with PyIceberg's row filter (e.g. "id in ('a', 'b')"),
which skips data files by the partition values Idem wrote for them.
An s3:// warehouse is read at $IDEM_S3_ENDPOINT with the AWS_* variables.
"""
import argparse
import json
import sys

from iceberg_catalog import open_catalog

ap = argparse.ArgumentParser()
ap.add_argument("--filter")
ap.add_argument("url")
ap.add_argument("catalog")
ap.add_argument("warehouse")
ap.add_argument("table")
a = ap.parse_args()
t = open_catalog(a.url, a.catalog, a.warehouse).load_table(a.table)
scan = t.scan(row_filter=a.filter) if a.filter else t.scan()
schema = t.schema()
json.dump({
    "rows": scan.to_arrow().to_pylist(),
    "properties": dict(t.properties),
    "snapshots": len(t.metadata.snapshots),
    "spec": [f"{f.transform}({schema.find_column_name(f.source_id)})" for f in t.spec().fields],
    "partitions": t.inspect.partitions().to_pylist() if t.spec().fields else [],
}, sys.stdout, default=str)
