#!/usr/bin/env bash
# The test suite, exactly as CI runs it. The pytest session starts a real Apache
# Kafka broker (KRaft, official jars via Maven) and Azurite (npm) unless
# KAFKA_BOOTSTRAP_SERVERS is set, and stops what it started.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
export COLSTREAM_STATE_DIR="${COLSTREAM_STATE_DIR:-$PWD/.colstream/test}"
echo "== ruff";  .venv/bin/ruff check .
echo "== mypy";  .venv/bin/mypy -p colstream; .venv/bin/mypy bench  # the benchmarks call the package too
echo "== deployment"; bash scripts/check-deploy.sh
echo "== pytest"; .venv/bin/python -m pytest -q -ra "$@"
