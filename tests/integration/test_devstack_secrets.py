"""No default secrets: the dev stack's Redis needs its generated password, Flower refuses weak logins."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import redis
from pydantic import SecretStr

from shelfsight.shared.dev.stack import _http_status, start_stack
from shelfsight.shared.flower import WeakCredentials, check_basic_auth
from shelfsight.shared.settings import Settings

REPO = Path(__file__).resolve().parents[2]


def _flower(env_auth: str | None, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHELFSIGHT_")}
    if env_auth is not None:
        env["SHELFSIGHT_FLOWER_BASIC_AUTH"] = env_auth
    env["SHELFSIGHT_BROKER_URL"] = "redis://127.0.0.1:1/0"  # never reached: refused before connecting
    return subprocess.run([sys.executable, "-m", "shelfsight.shared.cli", "flower"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("auth", [None, "", "admin:shelfsight", "admin", ":no-user-here-at-all",
                                  "admin:Xq7pw", "admin:change-me", "ok:long-enough-password,admin:shelfsight"])
def test_flower_refuses_to_start_without_strong_credentials(auth: str | None, tmp_path: Path) -> None:
    done = _flower(auth, tmp_path)
    assert done.returncode == 2, done.stderr
    assert "refusing to start" in done.stderr and "SHELFSIGHT_FLOWER_BASIC_AUTH" in done.stderr
    if auth and ":" in auth:
        message = done.stderr.removeprefix("shelfsight flower: ")
        assert auth.split(",")[-1].partition(":")[2] not in message  # never echoes the password


def test_strong_credentials_pass_the_check() -> None:
    check_basic_auth("admin:Zq3-long-random-password")
    check_basic_auth("a:first-strong-password,b:second-strong-password")
    with pytest.raises(WeakCredentials):
        check_basic_auth("admin:admin")


def test_dev_stack_redis_refuses_clients_without_its_generated_password(tmp_path: Path) -> None:
    settings = Settings(flower_basic_auth=SecretStr("admin:shelfsight"))  # weak: the stack generates its own
    with start_stack(tmp_path, settings, worker=False, flower=True,
                     extra_env={"SHELFSIGHT_LOG_FORMAT": "json"}) as stack:
        port = stack.ports["redis"]
        with pytest.raises(redis.exceptions.AuthenticationError):  # NOAUTH: the default user is off
            redis.Redis(host="127.0.0.1", port=port, socket_timeout=2).ping()
        with pytest.raises(redis.exceptions.AuthenticationError):
            redis.Redis.from_url(f"redis://shelfsight:wrong@127.0.0.1:{port}/0", socket_timeout=2).ping()
        url = stack.env["SHELFSIGHT_BROKER_URL"]
        assert url.startswith("redis://shelfsight:") and redis.Redis.from_url(url).ping()
        password = url.split(":")[2].split("@")[0]
        assert len(password) >= 24

        # generated Flower login, not the weak one passed in
        auth = stack.env["SHELFSIGHT_FLOWER_BASIC_AUTH"]
        assert auth != "admin:shelfsight"
        check_basic_auth(auth)
        flower = f"http://127.0.0.1:{stack.ports['flower']}/"
        assert _http_status(flower) == 401 and _http_status(flower, auth="admin:shelfsight") == 401
        assert _http_status(flower, auth=auth) == 200

        # secrets: in a 0600 state file in a 0700 dir, never on a command line, never in a log
        assert stat.S_IMODE(os.stat(stack.state_path).st_mode) == 0o600
        assert stat.S_IMODE(os.stat(tmp_path).st_mode) == 0o700
        state = json.loads(stack.state_path.read_text())
        assert password not in json.dumps(state["processes"])  # argv of every process
        assert state["env"]["SHELFSIGHT_BROKER_URL"] == url
        export = "\n".join(stack.export_lines())
        assert f"export SHELFSIGHT_BROKER_URL={url}" in export  # printed once, by design
        logs = {p.name: p.read_text() for p in (tmp_path / "logs").glob("*.log")}
        for name, text in logs.items():
            assert password not in text and auth.partition(":")[2] not in text, name
        flower_lines = [line for line in logs["flower.log"].splitlines() if line.strip()]
        assert flower_lines and all(isinstance(json.loads(line), dict) for line in flower_lines)
    assert not (tmp_path / "redis.conf").exists()


def test_exports_carry_flower_credentials_even_without_flower(tmp_path: Path) -> None:
    """`dev up --no-flower` then `honcho start` runs `shelfsight flower` from the exports."""
    with start_stack(tmp_path, Settings(), worker=False, flower=False) as stack:
        check_basic_auth(stack.env["SHELFSIGHT_FLOWER_BASIC_AUTH"])
        assert "flower" not in stack.processes
