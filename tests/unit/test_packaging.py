"""The wheel maps every top-level folder under one `colstream` namespace."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

from setuptools import build_meta

REPO = Path(__file__).resolve().parents[2]


def test_wheel_installs_only_the_colstream_namespace(tmp_path: Path) -> None:
    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        name = build_meta.build_wheel(str(tmp_path))
    finally:
        os.chdir(cwd)
    with zipfile.ZipFile(tmp_path / name) as wheel:
        names = wheel.namelist()
    top_level = {n.split("/", 1)[0] for n in names}
    assert top_level == {"colstream", "colstream-0.1.0.dist-info"}, top_level
    for expected in (
        "colstream/schemas/events.py",
        "colstream/schemas/json/upload-event.json",
        "colstream/producers/publisher.py",
        "colstream/consumers/splitter/stage.py",
        "colstream/consumers/embedder/stage.py",
        "colstream/consumers/sink/core.py",
        "colstream/infra/kafka_runtime/pom.xml",
        "colstream/embedding/engine.py",
        "colstream/api/app.py",
        "colstream/cli/main.py",
    ):
        assert expected in names, expected
    assert not any(n.startswith("colstream/tests") for n in names)
