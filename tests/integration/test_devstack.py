"""The embedded dev stack: real redis-server, moto server and Flower processes, started and stopped."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import redis
from pydantic import SecretStr

from shelfsight.shared.dev.stack import (
    DevStackError,
    _http_status,
    group_members,
    load_state,
    pid_alive,
    port_open,
    start_stack,
)
from shelfsight.shared.settings import Settings
from shelfsight.shared.storage import S3ObjectStore

REPO = Path(__file__).resolve().parents[2]
AUTH = "dev:s3cret-dev-stack-password"  # Flower refuses passwords under 12 characters


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "shelfsight.shared.cli", "dev", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=60)


def _stack_settings(stack_env: dict[str, str]) -> Settings:
    return Settings(
        broker_url=stack_env["SHELFSIGHT_BROKER_URL"],
        s3_endpoint_url=stack_env["SHELFSIGHT_S3_ENDPOINT_URL"],
        s3_access_key_id=stack_env["SHELFSIGHT_S3_ACCESS_KEY_ID"],
        s3_secret_access_key=stack_env["SHELFSIGHT_S3_SECRET_ACCESS_KEY"],
        bucket=stack_env["SHELFSIGHT_BUCKET"],
    )


def test_up_serves_redis_s3_flower_and_down_leaves_nothing(tmp_path: Path) -> None:
    settings = Settings(flower_basic_auth=SecretStr(AUTH))
    stack = start_stack(tmp_path, settings, worker=False, flower=True,
                        extra_env={"SHELFSIGHT_BUCKET": "devbucket"})
    try:
        assert set(stack.processes) == {"redis", "s3", "flower"}
        assert redis.Redis.from_url(stack.env["SHELFSIGHT_BROKER_URL"]).ping()
        s = _stack_settings(stack.env)
        assert s.bucket == "devbucket"
        store = S3ObjectStore(s)
        store.put(s.bucket, "probe.txt", b"hi", "text/plain")
        assert store.get(s.bucket, "probe.txt").body == b"hi"

        flower = f"http://127.0.0.1:{stack.ports['flower']}/"
        assert _http_status(flower) == 401
        assert _http_status(flower, auth="dev:wrong-password-123") == 401
        assert _http_status(flower, auth=AUTH) == 200

        # a second stack in the same state dir is refused
        with pytest.raises(DevStackError, match="already running"):
            start_stack(tmp_path, Settings(), worker=False, flower=False)

        env = _cli("env", "--state-dir", str(tmp_path))
        assert env.returncode == 0
        assert f"export SHELFSIGHT_BROKER_URL={stack.env['SHELFSIGHT_BROKER_URL']}" in env.stdout
        status = _cli("status", "--state-dir", str(tmp_path))
        assert status.returncode == 0, status.stdout + status.stderr
    except BaseException:
        stack.stop()
        raise

    down = _cli("down", "--state-dir", str(tmp_path))  # another process, as from a shell
    assert down.returncode == 0, down.stderr
    for info in stack.processes.values():
        assert not pid_alive(info.pid), info.name
        assert group_members(info.pgid) == [], info.name
    for name, port in stack.ports.items():
        assert not port_open(port), name
    assert load_state(tmp_path) is None

    again = _cli("down", "--state-dir", str(tmp_path))
    assert again.returncode == 0
    assert "nothing to stop" in again.stderr
    assert _cli("env", "--state-dir", str(tmp_path)).returncode == 1


def test_failed_start_tears_down_what_it_started(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_bucket(self: S3ObjectStore, bucket: str) -> None:
        raise RuntimeError("bucket creation refused")

    monkeypatch.setattr(S3ObjectStore, "ensure_bucket", broken_bucket)
    started: list[int] = []
    import shelfsight.shared.dev.stack as devstack

    real_launch = devstack._launch

    def spy(*args, **kwargs):
        info = real_launch(*args, **kwargs)
        started.append(info.pgid)
        return info

    monkeypatch.setattr(devstack, "_launch", spy)
    with pytest.raises(DevStackError, match="bucket creation refused"):
        start_stack(tmp_path, Settings(), worker=False, flower=False)
    assert len(started) == 2  # redis and s3 were running
    assert all(group_members(pgid) == [] for pgid in started)
    assert load_state(tmp_path) is None


def test_context_manager_stops_the_stack(tmp_path: Path) -> None:
    with start_stack(tmp_path, Settings(), worker=False, flower=False) as stack:
        port = stack.ports["redis"]
        assert port_open(port)
        assert os.path.exists(tmp_path / "state.json")
    assert not port_open(port)
    assert not (tmp_path / "state.json").exists()
