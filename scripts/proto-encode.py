"""Encode JSON lines as Protobuf messages with Google's protobuf runtime,
for Idem's format tests.

    proto-encode.py FILE.proto package.Message < rows.jsonl > values.b64

The .proto is compiled by protoc (grpcio-tools) into a temporary module;
each input line is one message in proto3's JSON mapping (json_format), and
each output line is that message serialized, in base64.
"""

import base64
import importlib
import os
import sys
import tempfile

from google.protobuf import json_format, symbol_database
from grpc_tools import protoc
import grpc_tools


def main():
    proto, name = sys.argv[1], sys.argv[2]
    out = tempfile.mkdtemp()
    include = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
    code = protoc.main([
        "protoc",
        f"-I{os.path.dirname(os.path.abspath(proto))}",
        f"-I{include}",
        f"--python_out={out}",
        os.path.basename(proto),
    ])
    if code != 0:
        sys.exit(f"protoc failed on {proto}")
    sys.path.insert(0, out)
    importlib.import_module(os.path.basename(proto)[: -len(".proto")] + "_pb2")
    message = symbol_database.Default().GetSymbol(name)
    for line in sys.stdin:
        m = json_format.Parse(line, message())
        print(base64.b64encode(m.SerializeToString()).decode())


main()
