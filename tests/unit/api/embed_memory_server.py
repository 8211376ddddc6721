"""``python -m tests.unit.api.embed_memory_server PORT STATE_DIR``: the API with the fake model, for RSS tests.

Runs in its own process so the test can read this process's peak RSS
(``VmHWM``) without the client's buffers in it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import uvicorn

from colstream.api.app import create_app
from colstream.infra.settings import ColstreamSettings
from tests.unit.api.test_app import FakeModel, FakePublisher, FakeStore


def main() -> None:
    port, state = int(sys.argv[1]), Path(sys.argv[2])
    settings = ColstreamSettings(state_dir=state).updated(blob={"local_root": state / "blobs"})
    model = FakeModel()
    app = create_app(
        settings,
        store=FakeStore(),
        publisher=FakePublisher(),
        model_loader=lambda _settings: model,
        kafka_probe=lambda: True,
        mount_eventgrid=False,
    )
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
