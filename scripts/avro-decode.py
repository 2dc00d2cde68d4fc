"""Decode Avro values with fastavro, for Idem's format tests.

    avro-decode.py SCHEMA.avsc < values.b64 > rows.jsonl

Each input line is one value in Avro's binary encoding (no container), in
base64; each output line is that record as JSON, logical types as text:
decimals as digit strings, dates as YYYY-MM-DD, timestamps in RFC 3339
(UTC, "Z"), UUIDs as text. A line that is not a value of the schema is
written as null.
"""

import base64
import datetime
import decimal
import io
import json
import sys
import uuid

import fastavro


def plain(value):
    if isinstance(value, datetime.datetime):
        text = value.astimezone(datetime.timezone.utc).isoformat()
        return text.replace("+00:00", "Z")
    if isinstance(value, (datetime.date, decimal.Decimal, uuid.UUID)):
        return str(value)
    raise TypeError(type(value))


def main():
    parsed = fastavro.parse_schema(json.load(open(sys.argv[1])))
    for line in sys.stdin:
        data = base64.b64decode(line)
        stream = io.BytesIO(data)
        try:
            record = fastavro.schemaless_reader(stream, parsed, None)
            if stream.tell() != len(data):
                record = None
        except Exception:
            record = None
        print(json.dumps(record, default=plain, ensure_ascii=False))


main()
