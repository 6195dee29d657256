"""Layering, checked on the import graph: every import points down, never sideways.

shared/ (shelfsight.shared) is the ground floor; shared/dev/ (shelfsight.shared.dev) is dev tooling
on top of it; worker/ and trainer/ stand side by side on shared/ and never import each other.
The static test parses every module (imports inside functions and TYPE_CHECKING blocks count);
the subprocess tests check what a real process of each kind actually loads.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
FOLDERS = ("shared", "worker", "trainer")  # client folder -> shelfsight.<folder>
OLD_TOP_LEVEL = frozenset(FOLDERS)
DEV = "shelfsight.shared.dev"


@dataclass(frozen=True)
class Edge:
    source: str  # importing module
    target: str  # imported module (or the package a name was imported from)
    line: int
    absolute_name: str  # the name as written when the import is absolute ('' for a relative import)

    def __str__(self) -> str:
        return f"{self.source} -> {self.target} (line {self.line})"


def module_name(root: Path, path: Path) -> str:
    """shared/dev/stack.py -> shelfsight.shared.dev.stack; worker/__init__.py -> shelfsight.worker."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(["shelfsight", *parts])


def project_modules(root: Path) -> dict[str, Path]:
    modules = {}
    for folder in FOLDERS:
        for path in sorted((root / folder).rglob("*.py")):
            modules[module_name(root, path)] = path
    return modules


def _resolve_relative(source: str, is_package: bool, level: int, module: str | None) -> str:
    package = source.split(".") if is_package else source.split(".")[:-1]
    base = package[: len(package) - (level - 1)]
    return ".".join([*base, module] if module else base)


def _dynamic_import(node: ast.Call) -> str | None:
    """importlib.import_module("x.y") / __import__("x.y") with a literal name."""
    func = node.func
    name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None
    if name in {"import_module", "__import__"} and node.args:
        first = node.args[0]
        if isinstance(first, ast.Constant) and isinstance(first.value, str):
            return first.value
    return None


def import_edges(root: Path) -> list[Edge]:
    """Every import of every module under shared/, worker/ and trainer/, as module -> module edges."""
    modules = project_modules(root)
    edges = []
    for source, path in modules.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                edges += [Edge(source, alias.name, node.lineno, alias.name) for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    target, written = _resolve_relative(source, is_package, node.level, node.module), ""
                else:
                    target = written = node.module or ""
                for alias in node.names:
                    # `from pkg import mod` imports the module pkg.mod when there is one
                    sub = f"{target}.{alias.name}"
                    edges.append(Edge(source, sub if sub in modules else target, node.lineno, written))
            elif isinstance(node, ast.Call) and (name := _dynamic_import(node)):
                edges.append(Edge(source, name, node.lineno, name))
    return edges


def _within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def layering_violations(edges: list[Edge]) -> list[str]:
    """Each edge that breaks a layering rule, with the rule it breaks."""
    found = []
    for edge in edges:
        src, dst = edge.source, edge.target
        if edge.absolute_name and edge.absolute_name.split(".")[0] in OLD_TOP_LEVEL:
            found.append(f"{edge}: old top-level name {edge.absolute_name!r}; import shelfsight.<folder>")
        if _within(src, "shelfsight.shared") and (
            _within(dst, "shelfsight.worker") or _within(dst, "shelfsight.trainer")
        ):
            found.append(f"{edge}: shared imports upward")
        if _within(src, "shelfsight.worker") and _within(dst, "shelfsight.trainer"):
            found.append(f"{edge}: worker imports the trainer")
        if _within(src, "shelfsight.trainer") and _within(dst, "shelfsight.worker"):
            found.append(f"{edge}: trainer imports the worker")
        if not _within(src, DEV) and _within(dst, DEV):
            found.append(f"{edge}: runtime code imports dev tooling")
    return found


def test_every_import_points_down() -> None:
    edges = import_edges(REPO)
    assert len(edges) > 100 and any(e.target == "shelfsight.shared.settings" for e in edges)  # it parsed
    violations = layering_violations(edges)
    assert not violations, "layering broken by these imports:\n" + "\n".join(violations)


def test_the_checker_finds_each_kind_of_bad_edge(tmp_path: Path) -> None:
    """The rules above are only as good as the parser: a planted tree with one bad edge per rule."""
    files = {
        "shared/__init__.py": "",
        "shared/settings.py": "",
        "shared/cli.py": "def main():\n    from shelfsight.worker.cli import worker\n",
        "shared/flower.py": "from ..trainer import tasks\n",
        "shared/dev/__init__.py": "",
        "shared/dev/demo.py": "import importlib\nimportlib.import_module('shelfsight.trainer.app')\n",
        "worker/__init__.py": "",
        "worker/tasks.py": "from shelfsight.shared import settings\nfrom shelfsight.shared import dev\n",
        "worker/app.py": "if True:\n    import shelfsight.trainer.report as report\n",
        "trainer/__init__.py": "",
        "trainer/app.py": "from shared.settings import Settings\nfrom shelfsight.shared.dev.demo import x\n",
        "trainer/tasks.py": "from .. import worker\nfrom . import app\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    found = "\n".join(layering_violations(import_edges(tmp_path)))
    expected = [
        "shelfsight.shared.cli -> shelfsight.worker.cli (line 2): shared imports upward",
        "shelfsight.shared.flower -> shelfsight.trainer.tasks (line 1): shared imports upward",
        "shelfsight.shared.dev.demo -> shelfsight.trainer.app (line 2): shared imports upward",
        "shelfsight.worker.tasks -> shelfsight.shared.dev (line 2): runtime code imports dev tooling",
        "shelfsight.worker.app -> shelfsight.trainer.report (line 2): worker imports the trainer",
        "shelfsight.trainer.app -> shared.settings (line 1): old top-level name 'shared.settings'",
        "shelfsight.trainer.app -> shelfsight.shared.dev.demo (line 2): runtime code imports dev tooling",
        "shelfsight.trainer.tasks -> shelfsight.worker (line 1): trainer imports the worker",
    ]
    for line in expected:
        assert line in found, f"missed: {line}\nfound:\n{found}"
    assert "settings (line 1): shared" not in found and "tasks -> shelfsight.trainer.app" not in found
    assert len(found.splitlines()) == len(expected)


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "SHELFSIGHT_"))}
    return {**env, "HF_HUB_OFFLINE": "1"}


_SETTINGS = ("Settings(broker_url='redis://127.0.0.1:1/0', result_backend='redis://127.0.0.1:1/0', "
             "s3_endpoint_url='http://127.0.0.1:1', model_arch='shelfsight-tiny', model_weights='none', "
             "device='cpu')")

_REPORT = """
import json, sys, weakref
from celery import signals
hooks = []
for signal in vars(signals).values():
    if isinstance(signal, signals.Signal):
        for _, receiver in signal.receivers:
            receiver = receiver() if isinstance(receiver, weakref.ReferenceType) else receiver
            if receiver is not None:
                hooks.append(f"{signal.name}:{receiver.__module__}.{receiver.__qualname__}")
print(json.dumps({"modules": sorted(sys.modules), "hooks": hooks, "tasks": sorted(app.tasks)}))
"""


def _start_process_of_kind(factory: str) -> subprocess.Popen[str]:
    """A fresh interpreter builds one kind of app, imports its task modules, reports what it loaded."""
    module, _, name = factory.rpartition(".")
    script = (f"from shelfsight.shared.settings import Settings\nfrom {module} import {name}\n"
              f"app = {name}({_SETTINGS})\napp.loader.import_default_modules()\n{_REPORT}")
    return subprocess.Popen([sys.executable, "-c", script], cwd=REPO, env=_clean_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


_started: dict[str, subprocess.Popen[str]] = {}


def start_process_kinds() -> dict[str, subprocess.Popen[str]]:
    """Start both kinds (once). tests/unit/conftest.py calls this right after collection, so the
    seconds each spends importing torch overlap the tests that run before this module."""
    if not _started:
        _started["worker"] = _start_process_of_kind("shelfsight.worker.app.create_worker_app")
        _started["trainer"] = _start_process_of_kind("shelfsight.trainer.app.create_trainer_app")
    return _started


@pytest.fixture(scope="module")
def process_kinds() -> dict[str, dict[str, list[str]]]:
    """What a fresh worker process and a fresh trainer process loaded."""
    reports = {}
    for kind, proc in start_process_kinds().items():
        out, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, err
        reports[kind] = json.loads(out.strip().splitlines()[-1])
    return reports


def test_an_extraction_worker_process_loads_neither_the_trainer_nor_matplotlib(process_kinds: dict) -> None:
    loaded = process_kinds["worker"]
    assert "shelfsight.extract" in loaded["tasks"] and "shelfsight.worker.tasks" in loaded["modules"]
    assert any("shelfsight.worker" in hook for hook in loaded["hooks"])  # the hook listing is real
    unwanted = [m for m in loaded["modules"] if _within(m, "shelfsight.trainer") or _within(m, "matplotlib")]
    assert not unwanted, unwanted


def test_a_trainer_process_loads_no_worker_module_and_no_worker_hooks(process_kinds: dict) -> None:
    loaded = process_kinds["trainer"]
    assert "shelfsight.train_category" in loaded["tasks"] and "shelfsight.trainer.tasks" in loaded["modules"]
    assert "shelfsight.extract" not in loaded["tasks"]
    unwanted = [m for m in loaded["modules"] if _within(m, "shelfsight.worker")]
    assert not unwanted, unwanted
    assert not [hook for hook in loaded["hooks"] if "shelfsight.worker" in hook], loaded["hooks"]


def test_enqueue_help_loads_neither_the_worker_nor_the_trainer() -> None:
    """`python -m shelfsight.shared.cli enqueue --help`, run the way -m runs it (runpy), then sys.modules."""
    script = """
import json, runpy, sys
sys.argv = ["shelfsight", "enqueue", "--help"]
code = None
try:
    runpy.run_module("shelfsight.shared.cli", run_name="__main__", alter_sys=True)
except SystemExit as exc:
    code = exc.code
print(json.dumps({"code": code, "modules": sorted(sys.modules)}))
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=_clean_env(),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    *help_lines, last = done.stdout.strip().splitlines()
    loaded = json.loads(last)
    assert loaded["code"] == 0 and any("--product-id" in line for line in help_lines)
    assert "shelfsight.shared.producer_cli" in loaded["modules"]  # the command really loaded
    unwanted = [m for m in loaded["modules"] if _within(m, "shelfsight.worker") or _within(m, "shelfsight.trainer")]
    assert not unwanted, unwanted
