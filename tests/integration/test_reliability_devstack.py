"""Issue 8, the dev stack: Redis keeps an append-only file (the broker survives a restart), and
SIGTERM to `shelfsight dev up` while it starts, or to `shelfsight demo`, stops every process it
started instead of leaving them running."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import redis

from shelfsight.shared.dev.processes import pid_alive
from shelfsight.shared.dev.stack import DevStack, start_stack, terminated_by_signal
from shelfsight.shared.settings import Settings
from tests.helpers import wait_for

ROOT = Path(__file__).resolve().parents[2]


def _state(state_dir: Path) -> dict:
    path = state_dir / "state.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def test_dev_redis_keeps_an_append_only_file(tmp_path: Path) -> None:
    with start_stack(tmp_path, Settings(), worker=False, flower=False) as stack:
        client = redis.Redis.from_url(stack.env["SHELFSIGHT_BROKER_URL"])
        assert client.config_get("appendonly") == {"appendonly": "yes"}  # old stack: "no"
        assert Path(client.config_get("dir")["dir"]).resolve() == (tmp_path / "redis-data").resolve()


def _cli(state_dir: Path, *argv: str) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT),
           "SHELFSIGHT_MODEL_ARCH": "shelfsight-tiny", "SHELFSIGHT_MODEL_WEIGHTS": "none", "SHELFSIGHT_DEVICE": "cpu"}
    return subprocess.Popen([sys.executable, "-m", "shelfsight.shared.cli", *argv, "--state-dir", str(state_dir)],
                            env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _terminate_when(proc: subprocess.Popen, state_dir: Path, ready: str, status: str = "starting") -> list[int]:
    """SIGTERM `proc` once state.json lists process `ready` (and the stack is in `status`, "up"
    once everything answers); the pids the stack had started."""
    def reached() -> dict:
        state = _state(state_dir)
        return state if ready in state.get("processes", {}) and state.get("status") == status else {}

    try:
        state = wait_for(reached, timeout=240)
        pids = [info["pid"] for info in state["processes"].values()]
        assert all(pid_alive(pid) for pid in pids)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) != 0
        return pids
    finally:
        if proc.poll() is None:
            proc.kill()


def test_sigterm_while_dev_up_starts_stops_what_it_started(tmp_path: Path) -> None:
    up = _cli(tmp_path, "dev", "up", "--no-flower")
    pids = _terminate_when(up, tmp_path, ready="worker")  # redis and s3 are up, the worker is starting
    # old code: `dev up` died at once and redis, moto and the worker (their own sessions) ran on
    wait_for(lambda: not any(pid_alive(pid) for pid in pids), timeout=30)
    assert not (tmp_path / "state.json").exists()


def test_sigterm_to_the_running_demo_stops_its_stack(tmp_path: Path) -> None:
    demo = _cli(tmp_path, "demo")
    pids = _terminate_when(demo, tmp_path, ready="worker", status="up")  # the demo is under way
    # old code: `make demo` died at once; redis, moto, worker, trainer, relay and Flower ran on
    wait_for(lambda: not any(pid_alive(pid) for pid in pids), timeout=30)


def test_a_sigterm_before_the_callers_with_still_stops_the_stack(tmp_path: Path) -> None:
    """`with terminated_by_signal(), start_stack(...) as stack:` (the demo): a SIGTERM that lands
    after start_stack has returned and before the `with` holds the stack. Old code: the SystemExit
    left through the signal block, the stack's __exit__ never ran, and its processes ran on."""
    started: list[DevStack] = []
    try:
        with pytest.raises(SystemExit) as stopped, terminated_by_signal():
            started.append(start_stack(tmp_path, Settings(), worker=False, flower=False))
            os.kill(os.getpid(), signal.SIGTERM)  # the handler raises before the next line
            pytest.fail("the SIGTERM handler did not raise")
        assert stopped.value.code == 128 + signal.SIGTERM
        pids = [info.pid for info in started[0].processes.values()]
        assert pids and not any(pid_alive(pid) for pid in pids)
        assert not (tmp_path / "state.json").exists()
    finally:
        for stack in started:
            stack.stop()
