#!/bin/sh
# Regenerate the Sparkplug B protobuf module and its typed stub from edge/sparkplug_b.proto:
#   scripts/gen-proto.sh [OUT_DIR]    (default: edge, where both are committed; a relative
#                                     OUT_DIR is taken from the repository root)
# VENV_BIN (default .venv/bin) holds the python with grpcio-tools and protoc-gen-mypy;
# PROTO_PYTHON and PROTOC_GEN_MYPY override each one.
# protoc comes from grpcio-tools and the stub from mypy-protobuf (both in the dev extras),
# pinned so the output is byte-for-byte reproducible: tests/unit/test_sparkplug_codec.py
# regenerates into a temporary directory and compares.
set -eu
cd "$(dirname "$0")/.."
out="${1:-edge}"
venv_bin="${VENV_BIN:-.venv/bin}"
python="${PROTO_PYTHON:-$venv_bin/python}"
plugin="${PROTOC_GEN_MYPY:-$venv_bin/protoc-gen-mypy}"
mkdir -p "$out"
"$python" -m grpc_tools.protoc \
    --proto_path=edge \
    --plugin=protoc-gen-mypy="$plugin" \
    --python_out="$out" \
    --mypy_out="$out" \
    edge/sparkplug_b.proto
