"""Encode JSON lines as Avro values with fastavro, for Idem's format tests.

    avro-encode.py SCHEMA.avsc < rows.jsonl > values.b64

Each input line is one record as JSON, with logical types written as
text: decimals as digit strings, dates as YYYY-MM-DD, timestamps in RFC
3339. Each output line is that record in Avro's binary encoding (one
value, no container), in base64.
"""

import base64
import datetime
import decimal
import io
import json
import sys

import fastavro


def typed(schema, value):
    """The Python value fastavro writes for `value` under `schema`."""
    if value is None:
        return None
    if isinstance(schema, list):
        branch = next(s for s in schema if s != "null")
        return typed(branch, value)
    if isinstance(schema, dict):
        logical = schema.get("logicalType")
        if logical == "decimal":
            return decimal.Decimal(value)
        if logical == "date":
            return datetime.date.fromisoformat(value)
        if logical in ("timestamp-millis", "timestamp-micros"):
            return datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
        if schema.get("type") == "record":
            fields = {f["name"]: f["type"] for f in schema["fields"]}
            return {k: typed(fields[k], v) for k, v in value.items()}
    return value


def main():
    schema = json.load(open(sys.argv[1]))
    parsed = fastavro.parse_schema(schema)
    for line in sys.stdin:
        out = io.BytesIO()
        fastavro.schemaless_writer(out, parsed, typed(schema, json.loads(line)))
        print(base64.b64encode(out.getvalue()).decode())


main()
