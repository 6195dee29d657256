"""The multi-process worker's supervisor and per-process Settings, with stand-in child processes."""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path

import pytest

from shelfsight.shared.settings import Settings
from shelfsight.worker.processes import (
    Supervisor,
    SupervisorPolicy,
    per_process_settings,
    process_hostname,
    worker_command,
)
from tests.helpers import wait_for

FAST = SupervisorPolicy(restart_delay_s=0.05, max_restart_delay_s=0.2, min_uptime_s=5.0, max_young_failures=3,
                        stop_timeout_s=10.0)


def test_each_process_gets_its_share_of_the_device_budgets_as_a_copy() -> None:
    base = Settings(model_cache_bytes=8 << 30, model_load_memory_bytes=4 << 30, decode_memory_bytes=1 << 30,
                    metrics_port=9108, device="cpu")
    parts = [per_process_settings(base, i, 4, cpu_count=16) for i in range(4)]
    assert all(p.model_cache_bytes == 2 << 30 for p in parts)  # 4 x the share = the device budget
    assert all(p.model_load_memory_bytes == 1 << 30 and p.decode_memory_bytes == 256 << 20 for p in parts)
    assert [p.metrics_port for p in parts] == [9108, 9109, 9110, 9111]
    assert all(p.torch_threads == 4 for p in parts)  # CPU: the cores shared out
    assert base.model_cache_bytes == 8 << 30 and base.metrics_port == 9108  # the original is untouched
    assert per_process_settings(base, 0, 1) is base
    gpu = per_process_settings(base.model_copy(update={"device": "cuda", "metrics_port": 0}), 1, 2, cpu_count=16)
    assert gpu.torch_threads == 0 and gpu.metrics_port == 0  # GPU: torch's default; metrics stay off
    pinned = per_process_settings(base.model_copy(update={"torch_threads": 3}), 1, 2, cpu_count=16)
    assert pinned.torch_threads == 3


def test_process_names_and_command() -> None:
    assert process_hostname("extract@%h", 2) == "extract-2@%h"
    assert process_hostname("gpu0", 1) == "gpu0-1"
    command = worker_command(1, 4, 16, "extract@%h")
    assert command[:4] == [sys.executable, "-m", "shelfsight.shared.cli", "worker"]
    assert command[4:] == ["--process-index", "1", "--processes", "4", "--concurrency", "16",
                           "--hostname", "extract-1@%h"]


def _child(script: str) -> list[str]:
    return [sys.executable, "-c", script]


SLEEPER = "import signal, sys, time; signal.signal(signal.SIGTERM, lambda *a: sys.exit(0)); time.sleep(600)"


def _run(supervisor: Supervisor) -> tuple[threading.Thread, list[int]]:
    result: list[int] = []
    # signal handlers can only be installed from the main thread: run() installs them when it can
    thread = threading.Thread(target=lambda: result.append(supervisor.run()), daemon=True)
    thread.start()
    return thread, result


@pytest.fixture(autouse=True)
def _no_signal_handlers(monkeypatch: pytest.MonkeyPatch) -> None:
    """run() in a thread: signal.signal refuses there, so let it be a no-op in these tests."""
    monkeypatch.setattr(signal, "signal", lambda signum, handler: signal.SIG_DFL)


def test_a_killed_process_is_restarted_and_a_stop_reaches_every_process() -> None:
    supervisor = Supervisor(lambda i: _child(SLEEPER), 3, policy=FAST, poll_s=0.02)
    thread, result = _run(supervisor)
    first = wait_for(lambda: all(supervisor.pids()) and list(supervisor.pids()), timeout=30)
    os.kill(first[1], signal.SIGKILL)
    wait_for(lambda: supervisor.pids()[1] not in (None, first[1]), timeout=30)
    assert supervisor.pids()[0] == first[0] and supervisor.pids()[2] == first[2]  # the others untouched
    assert supervisor.children[1].restarts == 1
    supervisor.stop(signal.SIGTERM)  # what the SIGTERM handler does
    thread.join(timeout=30)
    assert result == [0]  # every process exited 0 on the forwarded SIGTERM
    assert all(pid is None for pid in supervisor.pids())


def test_processes_that_keep_failing_at_startup_make_it_give_up_with_exit_1() -> None:
    supervisor = Supervisor(lambda i: _child("import sys; sys.exit(1)"), 2, policy=FAST, poll_s=0.02)
    thread, result = _run(supervisor)
    thread.join(timeout=60)
    assert result == [1] and supervisor.gave_up
    assert max(c.young_failures for c in supervisor.children) >= FAST.max_young_failures


def test_a_process_that_ignores_the_stop_is_killed_after_the_timeout(tmp_path: Path) -> None:
    ready = tmp_path / "ready"
    stubborn = ("import pathlib, signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                f"pathlib.Path({str(ready)!r}).touch(); time.sleep(600)")
    policy = SupervisorPolicy(stop_timeout_s=0.5)
    supervisor = Supervisor(lambda i: _child(stubborn if i == 0 else SLEEPER), 2, policy=policy, poll_s=0.02)
    thread, result = _run(supervisor)
    wait_for(ready.exists, timeout=30)  # its SIGTERM is ignored from now on
    supervisor.stop(signal.SIGTERM)
    thread.join(timeout=30)
    assert result == [1]  # not a clean stop: one had to be killed
