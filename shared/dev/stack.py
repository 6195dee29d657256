"""The embedded dev stack: Redis, an S3 server (moto), the workers and Flower on loopback.

Every process runs in its own process group (session, see processes.py) and logs to
`<state-dir>/logs/<name>.log`. `<state-dir>/state.json` records pids, ports and the
environment a shell needs, so that `shelfsight dev down` (another process) can stop the
stack, process groups included, and `shelfsight dev env` can print the exports again.

Nothing runs with a default secret: each `up` generates a Redis password (an ACL user, the
password-less default user off) and, unless the caller's Settings carry strong ones, Flower
credentials. They reach the processes by environment and a 0600 config file (never argv, so
`ps` does not show them), are printed once in the `export` lines, and are kept in state.json,
which is mode 0600 in a 0700 state dir.

    with start_stack(Path(".shelfsight/dev"), settings, worker=False) as stack:
        os.environ.update(stack.env)
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import structlog
from pydantic import SecretStr

from shelfsight.shared.dev.processes import (
    ProcessInfo,
    group_members,
    pid_alive,
    port_open,
    spawn,
    starttime,
    still_open_after,
    stop_processes,
    tail,
)
from shelfsight.shared.dev.services import free_port, redis_server_binary
from shelfsight.shared.flower import WeakCredentials, check_basic_auth
from shelfsight.shared.settings import Settings
from shelfsight.shared.storage import S3ObjectStore

log = structlog.get_logger()

STATE_FILE = "state.json"
REDIS_CONF = "redis.conf"
REDIS_DATA = "redis-data"  # the append-only file
REDIS_USER = "shelfsight"
FLOWER_USER = "admin"
S3_KEY = "test"  # moto accepts any credentials; these are the conventional dummy ones
SERVICE_TIMEOUT_S = 30.0
WORKER_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 15.0


class DevStackError(RuntimeError):
    """The stack could not be started or stopped; the message says what to look at."""


@dataclass
class DevStack:
    """A running stack. `.env` holds the variables a client needs; `.stop()` tears it down."""

    state_dir: Path
    env: dict[str, str] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)
    processes: dict[str, ProcessInfo] = field(default_factory=dict)
    bucket: str = ""
    _popens: list[subprocess.Popen[bytes]] = field(default_factory=list, repr=False)

    @property
    def state_path(self) -> Path:
        return self.state_dir / STATE_FILE

    def client_settings(self, base: Settings) -> Settings:
        """`base` pointed at this stack's Redis and S3: what a client of the stack uses."""
        return base.model_copy(update={
            "broker_url": self.env["SHELFSIGHT_BROKER_URL"],
            "result_backend": self.env["SHELFSIGHT_RESULT_BACKEND"],
            "s3_endpoint_url": f"http://127.0.0.1:{self.ports['s3']}",
            "sqs_endpoint_url": f"http://127.0.0.1:{self.ports['s3']}",
            "s3_access_key_id": SecretStr(S3_KEY),
            "s3_secret_access_key": SecretStr(S3_KEY),
            "bucket": self.bucket,
            "allowed_image_sources": [f"s3://{self.bucket}/"],
        })

    def export_lines(self) -> list[str]:
        """`export K=V` lines for `eval`, plus comment lines with the URLs."""
        return export_lines(self.env, self.ports)

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """Stop every process group of this stack and remove state.json (idempotent)."""
        try:
            survivors = stop_processes(list(self.processes.values()), timeout_s, self._popens)
        finally:
            self._reap()
        if survivors:
            raise DevStackError(f"dev stack in {self.state_dir}: {survivors} survived SIGKILL; "
                                f"state.json is kept")
        self.state_path.unlink(missing_ok=True)
        (self.state_dir / REDIS_CONF).unlink(missing_ok=True)

    def _reap(self) -> None:
        for popen in self._popens:
            with contextlib.suppress(Exception):
                popen.wait(timeout=0.1)

    def __enter__(self) -> DevStack:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def write_state(self, status: str) -> None:
        """Write state.json atomically (temp file + rename)."""
        payload = {
            "status": status,
            "started_at": time.time(),
            "bucket": self.bucket,
            "ports": self.ports,
            "env": self.env,
            "processes": {name: info.to_json() for name, info in self.processes.items()},
        }
        _write_private(self.state_path, json.dumps(payload, indent=2))


def _write_private(path: Path, text: str) -> None:
    """Write a file only its owner can read (it holds passwords), atomically (temp file + rename)."""
    tmp = path.with_suffix(".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.replace(tmp, path)


# --- starting one process of the stack -----------------------------------------------------------


def _launch(stack: DevStack, name: str, argv: list[str], env: dict[str, str]) -> ProcessInfo:
    """Start one process in a new session, logging to <state-dir>/logs/<name>.log."""
    log_path = stack.state_dir / "logs" / f"{name}.log"
    popen = spawn(argv, env, log_path)
    stack._popens.append(popen)
    info = ProcessInfo(name=name, pid=popen.pid, pgid=popen.pid, starttime=starttime(popen.pid),
                       log=str(log_path), argv=argv)
    stack.processes[name] = info
    stack.write_state("starting")  # so `dev down` can clean up even if `up` is killed now
    log.info("devstack.started", name=name, pid=popen.pid, log=str(log_path))
    return info


def _wait(info: ProcessInfo, what: str, check: Callable[[], bool], timeout_s: float) -> None:
    """Poll `check` until true; fail early if the process died, with a pointer to its log."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not pid_alive(info.pid):
            raise DevStackError(f"{info.name} exited while starting; see its log: {info.log}\n"
                                f"{tail(info.log)}")
        with contextlib.suppress(Exception):
            if check():
                return
        time.sleep(0.2)
    raise DevStackError(f"{info.name} not {what} after {timeout_s:.0f}s; see its log: {info.log}\n"
                        f"{tail(info.log)}")


# --- readiness checks ----------------------------------------------------------------------------


def _redis_ping(url: str) -> bool:
    import redis

    client = redis.Redis.from_url(url, socket_timeout=1)
    try:
        return bool(client.ping())
    finally:
        client.close()


def _celery_ping(broker_url: str, prefix: str) -> bool:
    """True once a worker whose hostname starts with `prefix` answers a control ping."""
    from celery import Celery

    app = Celery("devstack-ping", broker=broker_url)
    try:
        replies = app.control.ping(timeout=1.0) or []
    finally:
        app.close()
    return any(name.startswith(prefix) for reply in replies for name in reply)


def _http_status(url: str, auth: str | None = None) -> int:
    """HTTP status of a GET (4xx/5xx included), with optional `user:password` basic auth."""
    import base64

    request = urllib.request.Request(url)  # noqa: S310 - callers pass http://127.0.0.1 URLs only
    if auth:
        request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=2) as resp:  # noqa: S310 - loopback only
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


# --- the stack -----------------------------------------------------------------------------------


def stack_env(redis_port: int, s3_port: int, bucket: str, redis_password: str) -> dict[str, str]:
    """The variables that point shelfsight (and the AWS CLI) at the dev stack."""
    redis_url = f"redis://{REDIS_USER}:{redis_password}@127.0.0.1:{redis_port}"
    return {
        "SHELFSIGHT_BROKER_URL": f"{redis_url}/0",
        "SHELFSIGHT_RESULT_BACKEND": f"{redis_url}/1",
        "SHELFSIGHT_S3_ENDPOINT_URL": f"http://127.0.0.1:{s3_port}",
        "SHELFSIGHT_SQS_ENDPOINT_URL": f"http://127.0.0.1:{s3_port}",  # moto serves SQS there too
        "SHELFSIGHT_S3_ACCESS_KEY_ID": S3_KEY,
        "SHELFSIGHT_S3_SECRET_ACCESS_KEY": S3_KEY,
        "SHELFSIGHT_BUCKET": bucket,
        # the whole dev bucket (the demo keeps images in uploads/ and labeled/); the service's
        # own prefixes in it are never read as images all the same
        "SHELFSIGHT_ALLOWED_IMAGE_SOURCES": json.dumps([f"s3://{bucket}/"]),
        "AWS_ACCESS_KEY_ID": S3_KEY,
        "AWS_SECRET_ACCESS_KEY": S3_KEY,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{s3_port}",
    }


def export_lines(env: dict[str, str], ports: dict[str, int]) -> list[str]:
    """Shell-quoted `export` lines, preceded by comments naming the URLs."""
    lines = [f"# shelfsight dev stack: redis 127.0.0.1:{ports.get('redis')}, "
             f"s3 http://127.0.0.1:{ports.get('s3')}"]
    if "flower" in ports:
        lines.append(f"# flower: http://127.0.0.1:{ports['flower']}/ "
                     "(basic auth: the user:password in SHELFSIGHT_FLOWER_BASIC_AUTH below)")
    lines.append("# generated secrets: keep these lines to yourself (`shelfsight dev env` prints them again)")
    lines += [f"export {key}={shlex.quote(value)}" for key, value in env.items()]
    return lines


def _passthrough_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k.startswith("SHELFSIGHT_")}


def load_state(state_dir: Path) -> dict | None:
    """The parsed state.json of `state_dir`, or None if there is none."""
    path = state_dir / STATE_FILE
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except json.JSONDecodeError as exc:
        raise DevStackError(f"{path} is not valid JSON ({exc}); stop leftover processes by hand "
                            "and delete it") from exc


def _infos(state: dict) -> list[ProcessInfo]:
    return [ProcessInfo(**info) for info in state.get("processes", {}).values()]


def alive_processes(state: dict) -> dict[str, bool]:
    """name -> whether that process (or anything in its group) still runs."""
    return {info.name: pid_alive(info.pid, info.starttime) or bool(group_members(info.pgid))
            for info in _infos(state)}


@contextlib.contextmanager
def _lock(state_dir: Path) -> Iterator[None]:
    """Exclusive lock so two `dev up`/`dev down` on one state dir cannot interleave."""
    with (state_dir / ".lock").open("w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DevStackError(f"another `shelfsight dev` command is using {state_dir}") from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# The stacks started inside each terminated_by_signal block of the main thread, innermost last.
_owners: list[list[DevStack]] = []


@contextlib.contextmanager
def terminated_by_signal() -> Iterator[None]:
    """Inside the block, SIGTERM and SIGHUP raise SystemExit (128 + signal) like Ctrl-C raises
    KeyboardInterrupt, so `finally` blocks and context managers stop the stack's processes.

    Python's default for SIGTERM ends the process at once, and the stack's processes, each in
    its own session, would outlive it. Only the main thread can install handlers; elsewhere the
    block runs unchanged.

    A stack that `start_stack` started inside the block is also stopped here when the block ends
    with an exception. That covers a signal landing between `start_stack`'s return and the
    caller's `with stack:` (the stack's own `__exit__` does not run then); stopping twice is
    harmless.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []

    def stop(signum: int, _frame: object) -> None:
        for sig in previous:  # a second signal (e.g. from `timeout` and a shell) must not cut the teardown short
            signal.signal(sig, signal.SIG_IGN)
        received.append(signum)
        raise SystemExit(128 + signum)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGHUP)}
    owned: list[DevStack] = []
    _owners.append(owned)
    try:
        yield
    except BaseException:
        for stack in owned:
            try:
                stack.stop()
            except DevStackError as exc:
                log.error("devstack.teardown_failed", error=str(exc))
        raise
    finally:
        _owners.pop()  # blocks nest: this one is innermost (remove() would match any equal list)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    # The handler's SystemExit is lost when the signal lands while the main thread runs a
    # finalizer (`__del__`, a weakref callback: Python prints "Exception ignored" and goes on).
    # The block then ends normally; exit as the signal asked all the same.
    if received:
        raise SystemExit(128 + received[0])


def start_stack(state_dir: Path, settings: Settings, *, worker: bool = True, trainer: bool = False,
                flower: bool = True, relay: bool = False, extra_env: dict[str, str] | None = None,
                timeout_s: float = WORKER_TIMEOUT_S) -> DevStack:
    """Start Redis, moto S3 (with the bucket), and optionally worker, trainer, Flower and relay.

    The relay (`relay=True`) drains the Redis list shelfsight.shared.relay.demo.UPLOADS_LIST,
    as compose's relay drains MinIO's notifications.

    Returns once everything answers. `extra_env` is applied last to every child's
    environment (and to `.env` when it sets SHELFSIGHT_* variables). On any failure, what was
    started is stopped again and DevStackError says which log to read. Refuses to start a
    second stack in a state dir whose stack is still alive.
    """
    state_dir = Path(state_dir).resolve()
    (state_dir / "logs").mkdir(parents=True, exist_ok=True)
    state_dir.chmod(0o700)  # state.json and redis.conf hold the generated passwords
    extra_env = dict(extra_env or {})
    with _lock(state_dir):
        _clear_stale(state_dir)
        stack = DevStack(state_dir=state_dir, bucket=extra_env.get("SHELFSIGHT_BUCKET", settings.bucket))
        try:
            with terminated_by_signal():  # SIGTERM while starting: stop what was started, then exit
                _start_all(stack, settings, extra_env, worker=worker, trainer=trainer, flower=flower,
                           relay=relay, timeout_s=timeout_s)
            if _owners:  # the caller's block stops it if a signal lands before the caller holds it
                _owners[-1].append(stack)
            stack.write_state("up")
        except BaseException as exc:
            log.error("devstack.start_failed", error=(str(exc) or type(exc).__name__).splitlines()[0])
            try:
                stack.stop()
            except DevStackError as stop_exc:
                log.error("devstack.teardown_failed", error=str(stop_exc))
            if isinstance(exc, Exception) and not isinstance(exc, DevStackError):
                raise DevStackError(f"dev stack failed to start: {exc}") from exc
            raise
    log.info("devstack.up", state_dir=str(state_dir), ports=stack.ports)
    return stack


def _clear_stale(state_dir: Path) -> None:
    state = load_state(state_dir)
    if state is None:
        return
    alive = alive_processes(state)
    if any(alive.values()):
        running = ", ".join(name for name, up in alive.items() if up)
        raise DevStackError(f"a dev stack is already running in {state_dir} ({running}); "
                            "run `shelfsight dev down` first, or use another --state-dir")
    log.info("devstack.stale_state_removed", state_dir=str(state_dir))
    (state_dir / STATE_FILE).unlink(missing_ok=True)


def _start_all(stack: DevStack, settings: Settings, extra_env: dict[str, str], *, worker: bool,
               trainer: bool, flower: bool, relay: bool, timeout_s: float) -> None:
    redis_port, s3_port = free_port(), free_port()
    redis_password = secrets.token_urlsafe(24)
    stack.ports = {"redis": redis_port, "s3": s3_port}
    stack.env = stack_env(redis_port, s3_port, stack.bucket, redis_password)
    # generated even with flower=False: `dev up --no-flower` + `honcho start` runs Flower from the exports
    stack.env["SHELFSIGHT_FLOWER_BASIC_AUTH"] = flower_credentials(settings)
    stack.env.update({k: v for k, v in extra_env.items() if k.startswith("SHELFSIGHT_")})
    child_env = {**_passthrough_env(), **stack.env, **extra_env}

    conf = stack.state_dir / REDIS_CONF  # the password in a 0600 file, not on redis-server's argv
    _write_private(conf, "user default off\n"
                         f"user {REDIS_USER} on >{redis_password} ~* &* +@all\n")
    # The broker survives a Redis restart, as in production (compose runs it the same way): queued
    # and unacked messages are in the append-only file. A new stack starts from an empty one.
    data = stack.state_dir / REDIS_DATA
    shutil.rmtree(data, ignore_errors=True)
    data.mkdir(mode=0o700)
    info = _launch(stack, "redis", [
        redis_server_binary(), str(conf), "--port", str(redis_port), "--bind", "127.0.0.1",
        "--dir", str(data), "--save", "", "--appendonly", "yes", "--appendfsync", "everysec",
    ], child_env)
    broker = stack.env["SHELFSIGHT_BROKER_URL"]
    _wait(info, "answering PING", lambda: _redis_ping(broker), SERVICE_TIMEOUT_S)

    info = _launch(stack, "s3", [sys.executable, "-m", "moto.server", "-H", "127.0.0.1",
                                 "-p", str(s3_port)], child_env)
    _wait(info, "listening", lambda: port_open(s3_port), SERVICE_TIMEOUT_S)
    S3ObjectStore(stack.client_settings(settings)).ensure_bucket(stack.bucket)

    cli = [sys.executable, "-m", "shelfsight.shared.cli"]
    if worker:
        info = _launch(stack, "worker", [*cli, "worker"], child_env)
        _wait(info, "answering celery ping", lambda: _celery_ping(broker, "extract@"), timeout_s)
    if trainer:
        info = _launch(stack, "trainer", [*cli, "trainer"], child_env)
        _wait(info, "answering celery ping", lambda: _celery_ping(broker, "trainer@"), timeout_s)
    if relay:  # ready once it serves /metrics (it does so just before it starts relaying)
        from shelfsight.shared.relay.demo import UPLOADS_LIST

        port = free_port()
        stack.ports["relay_metrics"] = port
        info = _launch(stack, "relay", [*cli, "relay", "--redis-list", UPLOADS_LIST],
                       {**child_env, "SHELFSIGHT_METRICS_PORT": str(port)})
        _wait(info, "serving /metrics", lambda: port_open(port), SERVICE_TIMEOUT_S)
    if flower:
        port = free_port()
        stack.ports["flower"] = port
        info = _launch(stack, "flower", [*cli, "flower", "--port", str(port)], child_env)
        _wait(info, "serving HTTP",
              lambda: _http_status(f"http://127.0.0.1:{port}/healthcheck") == 200, SERVICE_TIMEOUT_S)


def flower_credentials(settings: Settings) -> str:
    """The caller's Flower credentials if they are strong, else a generated `admin:<random>`."""
    given = settings.flower_basic_auth.get_secret_value()
    try:
        check_basic_auth(given)
    except WeakCredentials:
        return f"{FLOWER_USER}:{secrets.token_urlsafe(18)}"
    return given


def stop_stack(state_dir: Path, timeout_s: float = STOP_TIMEOUT_S) -> bool:
    """Stop the stack recorded in `state_dir`. False if there was none (not an error).

    Raises DevStackError if a process group or a port survives SIGKILL.
    """
    state_dir = Path(state_dir).resolve()
    if not state_dir.exists():
        return False
    with _lock(state_dir):
        state = load_state(state_dir)
        if state is None:
            return False
        infos = _infos(state)
        survivors = stop_processes(infos, timeout_s)
        open_ports = [f"{name}:{port}" for name, port in state.get("ports", {}).items()
                      if still_open_after(int(port))]
        if survivors or open_ports:
            raise DevStackError(f"dev stack in {state_dir} did not stop cleanly: processes "
                                f"{survivors or 'none'} still running, ports {open_ports or 'none'} "
                                "still open; state.json is kept so you can retry")
        (state_dir / STATE_FILE).unlink(missing_ok=True)
        (state_dir / REDIS_CONF).unlink(missing_ok=True)
    log.info("devstack.down", state_dir=str(state_dir))
    return True
