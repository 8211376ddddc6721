"""Azurite (the Azure Storage emulator) for tests, CI and local development.

``ensure_azurite(state_dir)`` installs ``azurite@3`` from npm into
``state_dir/azurite`` once (about 35 s, then cached), starts ``azurite-blob`` in
the background unless something Azurite-shaped already answers on the port, and
waits until it answers. The returned handle stops only a process it started.

Command line (used by ``.ci/run``)::

    python -m colstream.infra.azurite start|stop|status [--state-dir DIR] [--port 10000]

``start`` leaves the emulator running after the command exits (its pid is kept in
``state_dir/azurite/azurite-<port>.pid``); ``stop`` ends that process.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Well-known development credentials, published by Microsoft for the emulator.
AZURITE_ACCOUNT = "devstoreaccount1"
AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
AZURITE_HOST = "127.0.0.1"
AZURITE_DEFAULT_PORT = 10000
AZURITE_NPM_SPEC = "azurite@3"


def azurite_blob_endpoint(port: int = AZURITE_DEFAULT_PORT) -> str:
    return f"http://{AZURITE_HOST}:{port}/{AZURITE_ACCOUNT}"


def azurite_connection_string(port: int = AZURITE_DEFAULT_PORT) -> str:
    return (
        f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};AccountKey={AZURITE_KEY};"
        f"BlobEndpoint={azurite_blob_endpoint(port)};"
    )


AZURITE_CONNECTION_STRING = azurite_connection_string()


class AzuriteError(RuntimeError):
    pass


@dataclass
class AzuriteHandle:
    port: int
    process: subprocess.Popen[bytes] | None = None
    # False when we found an emulator already answering: stop() then leaves it alone.
    owned: bool = False
    log_path: Path | None = None
    account_name: str = AZURITE_ACCOUNT
    account_key: str = AZURITE_KEY
    _stopped: bool = field(default=False, repr=False)

    @property
    def blob_endpoint(self) -> str:
        return azurite_blob_endpoint(self.port)

    @property
    def connection_string(self) -> str:
        return azurite_connection_string(self.port)

    def blob_settings_overrides(self) -> dict[str, Any]:
        """Fields for ``BlobSettings`` that point the blob store at this emulator."""
        return {
            "azure_auth": "connection_string",
            "azure_connection_string": self.connection_string,
            "azure_endpoints": {self.account_name: self.blob_endpoint},
            "azure_upload_account": self.account_name,
        }

    def is_answering(self) -> bool:
        return azurite_answers(self.port)

    def stop(self, timeout_s: float = 10.0) -> None:
        if self._stopped or not self.owned or self.process is None:
            return
        self._stopped = True
        _terminate_group(self.process.pid, timeout_s, wait=self.process.wait)


def _azurite_dir(state_dir: Path) -> Path:
    return Path(state_dir).resolve() / "azurite"


def _pid_file(state_dir: Path, port: int) -> Path:
    return _azurite_dir(state_dir) / f"azurite-{port}.pid"


def azurite_binary(state_dir: Path) -> Path:
    return _azurite_dir(state_dir) / "node_modules" / ".bin" / "azurite-blob"


def azurite_answers(port: int, timeout_s: float = 1.0) -> bool:
    """True when an Azurite blob service (not just any server) answers on the port."""
    url = f"http://{AZURITE_HOST}:{port}/{AZURITE_ACCOUNT}?comp=list"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            server = response.headers.get("Server", "")
    except urllib.error.HTTPError as error:  # unauthenticated list: 403, still an answer
        server = error.headers.get("Server", "") if error.headers else ""
    except (OSError, ValueError):
        return False
    return "azurite" in server.lower()


def install_azurite(state_dir: Path, timeout_s: float = 600.0) -> Path:
    """``npm install azurite@3`` into ``state_dir/azurite`` unless already there."""
    binary = azurite_binary(state_dir)
    if binary.exists():
        return binary
    npm = shutil.which("npm")
    if npm is None:
        raise AzuriteError("npm not found: install Node.js (>= 18) to run the Azurite emulator")
    install_dir = _azurite_dir(state_dir)
    install_dir.mkdir(parents=True, exist_ok=True)
    # Two test sessions (or CI and a developer) may race to install; one wins.
    with open(install_dir / ".install.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if binary.exists():
            return binary
        result = subprocess.run(
            [
                npm,
                "install",
                "--prefix",
                str(install_dir),
                "--no-audit",
                "--no-fund",
                "--no-save",
                AZURITE_NPM_SPEC,
            ],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
        if result.returncode != 0 or not binary.exists():
            raise AzuriteError(
                f"`npm install {AZURITE_NPM_SPEC}` into {install_dir} failed "
                f"(exit {result.returncode}): {result.stderr.strip()[-2000:]}"
            )
    return binary


def ensure_azurite(
    state_dir: Path, port: int = AZURITE_DEFAULT_PORT, startup_timeout_s: float = 60.0
) -> AzuriteHandle:
    """Reuse an answering emulator on ``port`` or install and start one."""
    if azurite_answers(port):
        return AzuriteHandle(port=port, owned=False)
    binary = install_azurite(state_dir)
    base = _azurite_dir(state_dir)
    data_dir = base / f"data-{port}"
    data_dir.mkdir(parents=True, exist_ok=True)
    log_path = base / f"azurite-{port}.log"
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            [
                str(binary),
                "--location",
                str(data_dir),
                "--blobHost",
                AZURITE_HOST,
                "--blobPort",
                str(port),
                # The Python SDK often speaks a newer API version than Azurite knows.
                "--skipApiVersionCheck",
                "--loose",
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            # Own process group: survives the CLI that started it, and stop() can
            # end node together with anything it spawned.
            start_new_session=True,
        )
    _pid_file(state_dir, port).write_text(str(process.pid))
    handle = AzuriteHandle(port=port, process=process, owned=True, log_path=log_path)
    deadline = time.monotonic() + startup_timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AzuriteError(
                f"azurite-blob exited with {process.returncode} before answering on port {port}: "
                f"{_tail(log_path)}"
            )
        if azurite_answers(port):
            return handle
        time.sleep(0.2)
    handle.stop()
    raise AzuriteError(
        f"azurite-blob did not answer on port {port} within {startup_timeout_s}s: {_tail(log_path)}"
    )


def _tail(path: Path, limit: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-limit:].strip()
    except OSError:
        return "(no log)"


def _terminate_group(pid: int, timeout_s: float, wait: Any = None) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if wait is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                wait(timeout=0.2)
                return
        elif not _alive(pid):
            return
        else:
            time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
    if wait is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            wait(timeout=5)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie still "exists" for kill(0); treat it as gone.
    with contextlib.suppress(OSError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[-1].split()[0] != "Z"
    return True


def _is_our_azurite(pid: int) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
    except OSError:
        return False
    return b"azurite" in cmdline


def stop_azurite(state_dir: Path, port: int = AZURITE_DEFAULT_PORT, timeout_s: float = 10.0) -> bool:
    """Stop the emulator a previous ``start`` left running; False when there was none."""
    pid_file = _pid_file(state_dir, port)
    try:
        pid = int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return False
    stopped = False
    # The pid may have been reused by an unrelated process since: check first.
    if _alive(pid) and _is_our_azurite(pid):
        _terminate_group(pid, timeout_s)
        stopped = True
    pid_file.unlink(missing_ok=True)
    return stopped


def main(argv: list[str] | None = None) -> int:
    from colstream.infra.settings import default_state_dir

    parser = argparse.ArgumentParser(
        prog="python -m colstream.infra.azurite", description=__doc__.split("\n")[0]
    )
    parser.add_argument("command", choices=["start", "stop", "status"])
    parser.add_argument(
        "--state-dir", type=Path, default=None, help="default: $COLSTREAM_STATE_DIR or ./.colstream"
    )
    parser.add_argument("--port", type=int, default=AZURITE_DEFAULT_PORT)
    args = parser.parse_args(argv)
    state_dir: Path = args.state_dir or default_state_dir()

    if args.command == "start":
        handle = ensure_azurite(state_dir, args.port)
        how = "started" if handle.owned else "already running"
        print(f"azurite {how} on {handle.blob_endpoint}")
        print(f"connection string: {handle.connection_string}")
        return 0
    if args.command == "stop":
        if stop_azurite(state_dir, args.port):
            print(f"azurite on port {args.port} stopped")
        else:
            print(f"no azurite started from {state_dir} on port {args.port}")
        return 0
    answering = azurite_answers(args.port)
    print(f"azurite on port {args.port}: {'answering' if answering else 'not answering'}")
    return 0 if answering else 1


if __name__ == "__main__":
    sys.exit(main())
