"""mypy follows `colstream.*` imports to their files, so a cross-module type error fails it.

Were the package mapped by setuptools alone, every `colstream.*` name would be `Any`
to mypy and the planted error below would pass unnoticed.
"""

from __future__ import annotations

import os
from pathlib import Path

from mypy import api as mypy_api

REPO = Path(__file__).resolve().parents[2]


def run_mypy(source: str, tmp_path: Path) -> tuple[str, int]:
    planted = tmp_path / "planted.py"
    planted.write_text(source)
    cwd = os.getcwd()
    os.chdir(REPO)  # `colstream` resolves from the repository root, as in CI
    try:
        stdout, _, status = mypy_api.run(
            ["--config-file", str(REPO / "pyproject.toml"), "--cache-dir", str(REPO / ".mypy_cache"), str(planted)]
        )
    finally:
        os.chdir(cwd)
    return stdout, status


def test_a_cross_module_type_error_fails_mypy(tmp_path: Path) -> None:
    stdout, status = run_mypy(
        "from colstream.schemas.events import UploadEvent\n"
        'x: int = UploadEvent(document_id="a", blob_uri="file:///x")\n',
        tmp_path,
    )
    assert status == 1, stdout
    assert 'Incompatible types in assignment (expression has type "UploadEvent", variable has type "int")' in stdout


def test_the_same_file_typed_correctly_passes(tmp_path: Path) -> None:
    stdout, status = run_mypy(
        "from colstream.schemas.events import UploadEvent\n"
        'x: UploadEvent = UploadEvent(document_id="a", blob_uri="file:///x")\n',
        tmp_path,
    )
    assert status == 0, stdout
