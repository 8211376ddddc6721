#!/usr/bin/env bash
# The main job on the embedded default: local Kafka, embedded Qdrant, local blobs,
# a tiny RANDOM-WEIGHT ColQwen2 (the model hub is not needed). Ingests samples/ and
# prints what was indexed.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/colstream demo "$@"
