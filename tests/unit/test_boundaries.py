"""Producers and consumers never import each other; `schemas` imports neither."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def imported_modules(folder: str) -> set[str]:
    modules: set[str] = set()
    for path in (REPO / folder).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                modules.add(node.module)
            elif isinstance(node, ast.Import):
                modules.update(alias.name for alias in node.names)
    return modules


@pytest.mark.parametrize(
    ("folder", "forbidden"),
    [
        ("producers", ("colstream.consumers",)),
        ("consumers", ("colstream.producers", "colstream.api", "colstream.cli")),
        ("schemas", ("colstream.consumers", "colstream.producers", "colstream.infra", "colstream.api")),
        ("infra", ("colstream.consumers", "colstream.producers", "colstream.api", "colstream.cli")),
        ("embedding", ("colstream.consumers", "colstream.producers", "colstream.api", "colstream.cli")),
    ],
)
def test_import_boundaries(folder: str, forbidden: tuple[str, ...]) -> None:
    offending = sorted(m for m in imported_modules(folder) if m.startswith(forbidden))
    assert offending == [], f"{folder}/ imports {offending}"


def test_everything_imports_through_the_namespace() -> None:
    for folder in ("schemas", "producers", "consumers", "infra", "embedding", "api", "cli"):
        bare = {m for m in imported_modules(folder) if m.split(".")[0] in
                {"schemas", "producers", "consumers", "infra", "embedding", "api", "cli"}}
        assert bare == set(), f"{folder}/ uses bare imports {bare}"
