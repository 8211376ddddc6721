"""/embed stays in bounded memory whatever the client sends.

The API runs in a child process (uvicorn, the fake model); before each request
the test resets the child's peak RSS (``/proc/<pid>/clear_refs``) and afterwards
reads it (``VmHWM``). Each case states the bound it must stay under:

* a 97 KB PNG declaring 9999x9999 pixels, alone and four in parallel: refused
  from its header, under 40 MB above the idle peak;
* a 4096x4096 PNG (inside the limits): decoded and reduced, under 150 MB; four
  in parallel, under 250 MB (at most two decodes at once), and under 100 MB stays
  resident afterwards;
* an 8000x8000 JPEG (above the per-image limit at full size): decoded at 1/4
  DCT scale, under 120 MB;
* a 200 MB JSON body with Content-Length: refused before it is read, under 40 MB;
* a 200 MB chunked body: refused once it passes the 32 MB limit, under 120 MB.
"""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[3]
MB = 1024 * 1024

# A uvicorn child per module and peak-RSS bounds under big bodies: full suite only, not the quick tier.
pytestmark = [pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc"),
              pytest.mark.slow]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Server:
    def __init__(self, process: subprocess.Popen[bytes], port: int) -> None:
        self.process, self.port = process, port
        self.residual = 0
        self.url = f"http://127.0.0.1:{port}"

    def _status(self, field: str) -> int:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
        raise AssertionError(field)

    def peak_above_idle(self, action: Callable[[], None]) -> int:
        """Bytes of RSS above the current resident size that ``action`` made the server reach."""
        time.sleep(0.2)
        Path(f"/proc/{self.process.pid}/clear_refs").write_text("5")  # VmHWM := VmRSS
        idle = self._status("VmRSS")
        action()
        peak = self._status("VmHWM") - idle
        time.sleep(0.5)
        self.residual = self._status("VmRSS") - idle
        return peak


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    port = free_port()
    state = tmp_path_factory.mktemp("embed-memory")
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.unit.api.embed_memory_server", str(port), str(state)],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert process.poll() is None and time.monotonic() < deadline, "API did not start"
            time.sleep(0.2)
        handle = Server(process, port)
        # warm up: the model, the JSON and image code paths, a first allocation of each kind
        assert httpx.post(f"{handle.url}/embed", json={"image": b64_png(64, 64)}, timeout=60).status_code == 200
        yield handle
    finally:
        process.terminate()
        process.wait(timeout=30)


def b64_png(width: int, height: int) -> str:
    buffer = io.BytesIO()
    Image.new("L", (width, height), 200).save(buffer, format="PNG", optimize=True)
    return base64.b64encode(buffer.getvalue()).decode()


def b64_jpeg(width: int, height: int) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (10, 120, 200)).save(buffer, format="JPEG", quality=50)
    return base64.b64encode(buffer.getvalue()).decode()


def post_embed(server: Server, image: str) -> int:
    return httpx.post(f"{server.url}/embed", json={"image": image}, timeout=120).status_code


def parallel(count: int, call: Callable[[], int]) -> list[int]:
    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(lambda _: call(), range(count)))


def raw_request(server: Server, head: bytes, body_chunks: Iterator[bytes]) -> int:
    """Send a request by hand and return the status line's code (the server may stop reading early)."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=60) as sock:
        sock.sendall(head)
        try:
            for chunk in body_chunks:
                sock.sendall(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass
        sock.settimeout(30)
        answer = b""
        while b"\r\n" not in answer:
            data = sock.recv(4096)
            if not data:
                break
            answer += data
    return int(answer.split(b" ", 2)[1])


BOMB = b64_png(9999, 9999)


def test_a_decompression_bomb_is_refused_from_its_header(server: Server) -> None:
    assert len(BOMB) < 200_000  # ~97 KB of PNG
    statuses: list[int] = []
    peak = server.peak_above_idle(lambda: statuses.append(post_embed(server, BOMB)))
    assert statuses == [413]
    assert peak < 40 * MB, f"{peak / MB:.0f} MB"
    peak = server.peak_above_idle(lambda: statuses.extend(parallel(4, lambda: post_embed(server, BOMB))))
    assert statuses[1:] == [413] * 4
    assert peak < 40 * MB, f"{peak / MB:.0f} MB"


def test_a_large_image_inside_the_limits_is_decoded_reduced_and_bounded(server: Server) -> None:
    image = b64_png(4096, 4096)
    statuses: list[int] = []
    peak = server.peak_above_idle(lambda: statuses.append(post_embed(server, image)))
    assert statuses == [200] and peak < 150 * MB, f"{peak / MB:.0f} MB"
    peak = server.peak_above_idle(lambda: statuses.extend(parallel(4, lambda: post_embed(server, image))))
    assert statuses[1:] == [200] * 4 and peak < 250 * MB, f"{peak / MB:.0f} MB"
    # and it is given back: what stays resident afterwards is a fraction of it
    assert server.residual < 100 * MB, f"{server.residual / MB:.0f} MB resident after the requests"


def test_a_huge_jpeg_is_decoded_at_a_reduced_scale(server: Server) -> None:
    image = b64_jpeg(8000, 8000)  # 64 MP: over the per-image limit at full size
    statuses: list[int] = []
    peak = server.peak_above_idle(lambda: statuses.append(post_embed(server, image)))
    assert statuses == [200] and peak < 120 * MB, f"{peak / MB:.0f} MB"


def test_a_200_mb_body_is_refused_by_content_length_before_it_is_read(server: Server) -> None:
    size = 200 * MB
    head = (f"POST /embed HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {size}\r\n\r\n").encode()
    statuses: list[int] = []

    def chunks() -> Iterator[bytes]:
        yield b'{"image": "' + b"A" * (MB - 11)
        for _ in range(size // MB - 1):
            yield b"A" * MB

    peak = server.peak_above_idle(lambda: statuses.append(raw_request(server, head, chunks())))
    assert statuses == [413] and peak < 40 * MB, f"{peak / MB:.0f} MB"


def test_a_200_mb_chunked_body_is_refused_while_it_streams(server: Server) -> None:
    head = b"POST /embed HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    statuses: list[int] = []

    def chunks() -> Iterator[bytes]:
        piece = b"A" * MB
        yield b'%x\r\n{"image": "\r\n' % len(b'{"image": "')
        for _ in range(200):
            yield b"%x\r\n%s\r\n" % (len(piece), piece)
        yield b'2\r\n"}\r\n0\r\n\r\n'

    peak = server.peak_above_idle(lambda: statuses.append(raw_request(server, head, chunks())))
    assert statuses == [413] and peak < 120 * MB, f"{peak / MB:.0f} MB"


def test_the_request_pixel_budget_covers_a_whole_batch(server: Server) -> None:
    image = b64_png(4096, 4096)  # 16.8 MP each: three fit alone, not together
    response = httpx.post(f"{server.url}/embed_batch", json={"images": [image] * 4}, timeout=120)
    assert response.status_code == 413 and "per request" in json.dumps(response.json())
