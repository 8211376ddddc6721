#!/usr/bin/env bash
# Regenerates the lock files from pyproject.toml, keeping every pin that still fits
# (uv prefers the versions already in an output file; pass --upgrade to move them):
#   requirements.lock      the runtime set, which both images install (hashes checked);
#   requirements-dev.lock  runtime plus the dev extra, which scripts/bootstrap.sh installs.
# Both target CPython 3.11 on x86-64 manylinux 2.28 whatever machine runs this.
set -euo pipefail
cd "$(dirname "$0")/.."
common=(--python-version 3.11 --python-platform x86_64-manylinux_2_28 --generate-hashes --quiet)
uv pip compile pyproject.toml -o requirements.lock "${common[@]}" "$@"
uv pip compile pyproject.toml --extra dev -o requirements-dev.lock "${common[@]}" "$@"
echo "lock: requirements.lock and requirements-dev.lock regenerated"
