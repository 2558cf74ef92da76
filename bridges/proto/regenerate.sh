#!/bin/sh
# Regenerates the Python code for grpc_predict_v2.proto (needs grpcio-tools); commit the result.
#
#   sh bridges/proto/regenerate.sh
#
# The generated messages are registered in a private descriptor pool instead of protobuf's
# default one: tritonclient registers the same `inference.*` names in the default pool, and a
# process holding both (tests, an application embedding the bridge) must not fail to import.
set -eu
cd "$(dirname "$0")/../.."
python -m grpc_tools.protoc -I . --python_out=. --grpc_python_out=. --pyi_out=. bridges/proto/grpc_predict_v2.proto
python - <<'PY'
from pathlib import Path

path = Path("bridges/proto/grpc_predict_v2_pb2.py")
text = path.read_text()
default = "DESCRIPTOR = _descriptor_pool.Default().AddSerializedFile("
assert default in text, "protoc's output changed; update regenerate.sh"
text = text.replace(default, "POOL = _descriptor_pool.DescriptorPool()\nDESCRIPTOR = POOL.AddSerializedFile(")
path.write_text(text)
stub = Path("bridges/proto/grpc_predict_v2_pb2.pyi")
stub.write_text(stub.read_text() + "\nfrom google.protobuf import descriptor_pool as _descriptor_pool\n"
                "POOL: _descriptor_pool.DescriptorPool\n")

# Generated code is not held to the project's lint and type rules.
for generated in Path("bridges/proto").glob("grpc_predict_v2_pb2*.py*"):
    generated.write_text("# ruff: noqa\n# mypy: ignore-errors\n" + generated.read_text())
PY
