#!/usr/bin/env bash
# Installs everything colstream needs on a fresh machine, idempotently:
# a Python 3.11 virtualenv with the project (torch comes in through colpali-engine's
# resolver, which picks a matched torch/torchvision pair) and kcat for the tests.
# Kafka (Maven) and Azurite (npm) are fetched on first use by colstream itself.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v uv >/dev/null 2>&1; then
  python3 -m pip install -q --disable-pip-version-check uv
fi
if [ ! -x .venv/bin/python ]; then
  uv venv -q .venv --python 3.11
fi
if ! .venv/bin/python -c "import colstream.infra.settings, colpali_engine, qdrant_edge, pytest, selenium, standardwebhooks" >/dev/null 2>&1; then
  echo "bootstrap: installing colstream and its dependencies into .venv (torch is large: a few minutes)"
  uv pip install -q --python .venv/bin/python -e ".[dev]"
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
