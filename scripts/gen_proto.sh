#!/bin/sh
# Regenerates the committed NodeAgent gRPC code (needs the dev extra: grpcio-tools).
set -eu
cd "$(dirname "$0")/.."
python -m grpc_tools.protoc -I. --python_out=. --grpc_python_out=. crosslogic/agent/proto/nodeagent.proto
