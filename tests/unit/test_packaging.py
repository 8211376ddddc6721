"""The wheel maps every top-level folder under one `colstream` namespace."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import pytest
from setuptools import build_meta

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        name = build_meta.build_wheel(str(out))
    finally:
        os.chdir(cwd)
    return out / name


def test_wheel_installs_only_the_colstream_namespace(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as wheel_file:
        names = wheel_file.namelist()
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
        "colstream/samples/invoice.pdf",
        "colstream/samples/scanned-receipt.png",
    ):
        assert expected in names, expected
    assert not any(n.startswith("colstream/tests") for n in names)


def test_the_demo_finds_its_samples_inside_an_installed_wheel(wheel: Path, tmp_path: Path) -> None:
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as wheel_file:
        wheel_file.extractall(site)
    demo_samples = site / "colstream" / "samples"
    shipped = sorted(p.name for p in demo_samples.iterdir())
    in_repo = sorted(p.name for p in (REPO / "samples").iterdir())
    assert shipped == in_repo
    # cli/demo.py looks two folders up from itself: colstream/cli/demo.py -> colstream/samples.
    assert (site / "colstream" / "cli" / "demo.py").resolve().parent.parent / "samples" == demo_samples


def _locked_versions(lock: Path) -> dict[str, str]:
    from packaging.utils import canonicalize_name

    pins: dict[str, str] = {}
    for line in lock.read_text().splitlines():
        if line and not line[0].isspace() and not line.startswith("#") and "==" in line:
            name, version = line.split(" ", 1)[0].split("==", 1)
            pins[canonicalize_name(name)] = version
    return pins


def _requirements(extra: str | None) -> list[str]:
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return list(project["dependencies"]) + (list(project["optional-dependencies"][extra]) if extra else [])


@pytest.mark.parametrize(("lock", "extra"), [("requirements.lock", None), ("requirements-dev.lock", "dev")])
def test_the_lock_files_pin_every_requirement_within_its_range(lock: str, extra: str | None) -> None:
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    pins = _locked_versions(REPO / lock)
    for line in _requirements(extra):
        requirement = Requirement(line)
        if requirement.marker is not None and not requirement.marker.evaluate({"python_version": "3.11"}):
            continue
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{requirement.name} is not in {lock}: run scripts/lock.sh"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"{lock} pins {name}=={pins[name]}, outside {requirement.specifier}: run scripts/lock.sh"
        )
