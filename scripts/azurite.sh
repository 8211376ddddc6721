#!/usr/bin/env bash
# Start, stop or query the Azurite blob emulator used by tests and local runs.
#   scripts/azurite.sh start|stop|status [--state-dir DIR] [--port 10000]
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-$here/.venv/bin/python}"
exec "$python" -m colstream.infra.azurite "$@"
