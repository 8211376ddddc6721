#!/usr/bin/env bash
# Installs everything colstream needs on a fresh machine, idempotently:
# a Python 3.11 virtualenv with exactly the versions in requirements-dev.lock and the
# project itself, and kcat for the tests.
# Kafka (Maven) and Azurite (npm) are fetched on first use by colstream itself.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v uv >/dev/null 2>&1; then
  python3 -m pip install -q --disable-pip-version-check uv
fi
if [ ! -x .venv/bin/python ]; then
  uv venv -q .venv --python 3.11
fi
# Exactly the locked versions (hashes checked), then colstream itself without resolving
# anything: CI, a developer and the images get the same set. scripts/lock.sh refreshes it.
lock_stamp="$(cat requirements-dev.lock pyproject.toml | sha256sum | cut -c1-64)"
if [ "$(cat .venv/.colstream-lock 2>/dev/null)" != "$lock_stamp" ] \
   || ! .venv/bin/python -c "import colstream.infra.settings, colpali_engine, qdrant_edge, pytest, selenium, standardwebhooks" >/dev/null 2>&1; then
  echo "bootstrap: installing the locked dependencies into .venv (torch is large: a few minutes)"
  uv pip sync -q --python .venv/bin/python --require-hashes requirements-dev.lock
  uv pip install -q --python .venv/bin/python --no-deps -e .
  echo "$lock_stamp" > .venv/.colstream-lock
fi
# Python only reads bytecode it finds; where PYTHONDONTWRITEBYTECODE is set (the image, many
# shells) it never writes any, so every process (each test run, each stage a test starts)
# would compile torch and transformers from source again: about twice their import time.
# Compiled once per lock here. A few files in site-packages are not Python 3 (templates,
# test data), so compileall's exit status is not a failure of ours.
if [ "$(cat .venv/.colstream-bytecode 2>/dev/null)" != "$lock_stamp" ]; then
  echo "bootstrap: compiling the virtualenv's bytecode"
  site_packages="$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))')"
  .venv/bin/python -m compileall -q -j 0 "$site_packages" >/dev/null 2>&1 || true
  echo "$lock_stamp" > .venv/.colstream-bytecode
fi
if ! command -v kcat >/dev/null 2>&1; then
  echo "bootstrap: installing kcat (Debian package)"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get install -y -q kcat >/dev/null 2>&1 || { $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q kcat >/dev/null; }
fi
if ! command -v soffice >/dev/null 2>&1; then
  echo "bootstrap: installing LibreOffice headless (Debian packages) for Office conversion"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  LO_PACKAGES="libreoffice-core libreoffice-writer libreoffice-calc libreoffice-impress"
  # shellcheck disable=SC2086
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $LO_PACKAGES >/dev/null 2>&1 \
    || { $SUDO apt-get update -q >/dev/null \
         && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $LO_PACKAGES >/dev/null; }
fi
if ! command -v chromium >/dev/null 2>&1 || [ ! -x /usr/bin/chromedriver ]; then
  echo "bootstrap: installing Chromium and its driver (Debian packages) for the console's browser tests"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 \
    || { $SUDO apt-get update -q >/dev/null \
         && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver >/dev/null; }
fi
