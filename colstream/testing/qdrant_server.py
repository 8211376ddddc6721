"""A real Qdrant server for tests of the server path (local mode ignores quantization,
aliases, payload indexes and shard settings, so those are tested against a server).

No registry packages a Qdrant server binary. It is found, in order, at
``COLSTREAM_QDRANT_BINARY``, next to the checkout (``../shared/tools/qdrant-*/qdrant``)
or on ``PATH``; ``QDRANT_URL`` names a running server instead.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

QDRANT_VERSION_DIR = "qdrant-1.18.3"


def find_qdrant_binary(repo: Path) -> Path | None:
    explicit = os.environ.get("COLSTREAM_QDRANT_BINARY")
    candidates = [Path(explicit)] if explicit else []
    candidates.append(repo.parent / "shared" / "tools" / QDRANT_VERSION_DIR / "qdrant")
    on_path = shutil.which("qdrant")
    if on_path:
        candidates.append(Path(on_path))
    return next((c for c in candidates if c.is_file() and os.access(c, os.X_OK)), None)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def qdrant_server(binary: Path, home: Path, start_timeout_s: float = 30.0) -> Iterator[str]:
    """Start ``binary`` on loopback with its own storage under ``home``; yield its URL."""
    http, grpc = _free_port(), _free_port()
    env = {
        **os.environ,
        "QDRANT__SERVICE__HOST": "127.0.0.1",
        "QDRANT__SERVICE__HTTP_PORT": str(http),
        "QDRANT__SERVICE__GRPC_PORT": str(grpc),
        "QDRANT__STORAGE__STORAGE_PATH": str(home / "storage"),
        "QDRANT__STORAGE__SNAPSHOTS_PATH": str(home / "snapshots"),
        "QDRANT__TELEMETRY_DISABLED": "true",
    }
    url = f"http://127.0.0.1:{http}"
    with (home / "qdrant.log").open("wb") as log:
        proc = subprocess.Popen([str(binary)], env=env, cwd=home, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + start_timeout_s
            while True:
                try:
                    if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError(f"Qdrant server did not start; see {home / 'qdrant.log'}")
                time.sleep(0.2)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
