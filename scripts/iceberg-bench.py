#!/usr/bin/env python3
"""The hand-written load the Iceberg benchmark compares Idem with, and its
row count, through PyIceberg's SqlCatalog (scripts/iceberg-tools.sh).

usage:
  iceberg-bench.py load  SQLALCHEMY_URL CATALOG WAREHOUSE NAMESPACE.TABLE EVENTS.jsonl
      read the events (`idem generate`'s 8 columns) with PyArrow's JSON
      reader, create the table, and append them in one commit
  iceberg-bench.py count SQLALCHEMY_URL CATALOG WAREHOUSE NAMESPACE.TABLE
      print {"rows", "distinct_event_ids", "snapshots", "data_files"}
An s3:// warehouse is used at $IDEM_S3_ENDPOINT with the AWS_* variables.
"""
import json
import sys

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pj
from iceberg_catalog import open_catalog

SCHEMA = pa.schema([
    ("event_id", pa.string()),
    ("user_id", pa.int64()),
    ("kind", pa.string()),
    ("amount", pa.float64()),
    ("currency", pa.string()),
    ("ok", pa.bool_()),
    ("at", pa.timestamp("us", tz="UTC")),
    ("note", pa.string()),
])


def main():
    command, url, name, warehouse, table = sys.argv[1:6]
    c = open_catalog(url, name, warehouse)
    if command == "load":
        events = pj.read_json(
            sys.argv[6],
            parse_options=pj.ParseOptions(explicit_schema=SCHEMA,
                                          unexpected_field_behavior="ignore"),
        )
        namespace = table.rsplit(".", 1)[0]
        c.create_namespace_if_not_exists(namespace)
        t = c.create_table(table, schema=events.schema)
        t.append(events)
        print(json.dumps({"rows": events.num_rows}))
    elif command == "count":
        t = c.load_table(table)
        ids = t.scan(selected_fields=("event_id",)).to_arrow()["event_id"]
        files = sum(1 for _ in t.scan().plan_files())
        print(json.dumps({
            "rows": len(ids),
            "distinct_event_ids": pc.count_distinct(ids).as_py(),
            "snapshots": len(t.metadata.snapshots),
            "data_files": files,
        }))
    else:
        sys.exit(f"unknown command {command!r}: load or count")


main()
