"""Drive a real :class:`~colstream.infra.stage_runner.StageRunner` on a thread of the test."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from colstream.infra.stage_runner import StageRunner


def wait_until(condition: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    """Poll ``condition`` every few milliseconds; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} not met within {timeout:g}s"
        time.sleep(0.005)


class RunningStage:
    """``runner.run()`` on a daemon thread; ``error`` holds what it raised."""

    def __init__(self, runner: StageRunner) -> None:
        self.runner = runner
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name=f"run-{runner.handler.name}", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.runner.run()
        except BaseException as exc:
            self.error = exc

    def stop(self, timeout: float = 10.0) -> float:
        """Ask the runner to stop and wait for ``run()`` to return; the seconds it took."""
        started = time.monotonic()
        self.runner.request_stop()
        self.thread.join(timeout)
        assert not self.thread.is_alive(), f"{self.runner.handler.name} did not stop within {timeout:g}s"
        return time.monotonic() - started

    def __enter__(self) -> RunningStage:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.thread.is_alive():
            self.stop()
