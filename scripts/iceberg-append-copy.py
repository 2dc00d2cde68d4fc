#!/usr/bin/env python3
"""Append a copy of a table's first row in a snapshot of its own, through
PyIceberg's SqlCatalog: what a second writer that duplicated a message
would leave, for the tests to check that `idem verify` finds it.

usage: iceberg-append-copy.py SQLALCHEMY_URL CATALOG WAREHOUSE NAMESPACE.TABLE
An s3:// warehouse is used at $IDEM_S3_ENDPOINT with the AWS_* variables.
"""
import sys

from iceberg_catalog import open_catalog

url, name, warehouse, table = sys.argv[1:5]
t = open_catalog(url, name, warehouse).load_table(table)
first = t.scan(limit=1).to_arrow()
t.append(first)
