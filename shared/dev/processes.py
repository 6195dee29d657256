"""Process groups for the dev stack: spawn, recognise (pid reuse included), signal, stop.

Each managed process leads its own session, so signalling its group reaches everything it
started. Liveness is read from procfs (zombies count as dead); a recorded start time tells a
process from an unrelated one that got its pid later. Nothing here knows what the processes are.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import structlog

log = structlog.get_logger()


@dataclass
class ProcessInfo:
    """One managed process: its group is what gets signalled."""

    name: str
    pid: int
    pgid: int
    starttime: int | None
    log: str
    argv: list[str]

    def to_json(self) -> dict[str, object]:
        return dict(self.__dict__)


def spawn(argv: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    """Start `argv` in a new session, stdout and stderr appended to `log_path`.

    The child sees this process's environment, unbuffered, with `env` on top.
    """
    with log_path.open("ab") as out:
        return subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **env}, start_new_session=True,
        )


def _proc_stat(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name, or None if there is no such process."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return raw.rsplit(")", 1)[1].split()  # [state, ppid, pgrp, ...]


def starttime(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (procfs), None if unknown."""
    stat = _proc_stat(pid)
    return int(stat[19]) if stat and len(stat) > 19 else None


def pid_alive(pid: int, started: int | None = None) -> bool:
    """True if `pid` runs and is not a zombie (and, if given, started at `started`)."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)  # reap it if it is our own dead child
    stat = _proc_stat(pid)
    if stat is None:
        if Path("/proc/self/stat").exists():
            return False
        try:  # no procfs: fall back to signal 0
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    if stat[0] in ("Z", "X"):
        return False
    return started is None or starttime(pid) == started


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) pids in process group `pgid`."""
    proc = Path("/proc")
    if not proc.exists():
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return []
        return [pgid]
    members = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        stat = _proc_stat(int(entry.name))
        if stat and stat[0] not in ("Z", "X") and int(stat[2]) == pgid:
            members.append(int(entry.name))
    return members


def _leader_reused(info: ProcessInfo) -> bool:
    """True if the recorded pid now belongs to a different, live process."""
    stat = _proc_stat(info.pid)
    if stat is None or stat[0] in ("Z", "X") or info.starttime is None:
        return False
    return starttime(info.pid) != info.starttime


def _signal_group(info: ProcessInfo, sig: signal.Signals) -> None:
    """Signal the whole group, unless its leader pid now belongs to an unrelated process."""
    if _leader_reused(info):
        log.warning("devstack.pid_reused", name=info.name, pid=info.pid)
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(info.pgid, sig)


def stop_processes(infos: list[ProcessInfo], timeout_s: float,
                   popens: list[subprocess.Popen[bytes]] | None = None) -> list[str]:
    """SIGTERM every group (in reverse start order), wait, SIGKILL survivors. Returns survivors."""
    for info in reversed(infos):
        _signal_group(info, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for popen in popens or []:
            with contextlib.suppress(Exception):
                popen.poll()
        if not any(group_members(info.pgid) for info in infos):
            break
        time.sleep(0.1)
    for info in infos:
        if group_members(info.pgid):
            log.warning("devstack.kill", name=info.name, pgid=info.pgid)
            _signal_group(info, signal.SIGKILL)
    time.sleep(0.1)
    for popen in popens or []:
        with contextlib.suppress(Exception):
            popen.wait(timeout=2)
    return [info.name for info in infos if group_members(info.pgid)]


def port_open(port: int) -> bool:
    """True if something accepts connections on 127.0.0.1:port."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.3):
            return True
    except OSError:
        return False


def still_open_after(port: int, timeout_s: float = 3.0) -> bool:
    """True if the port is STILL open after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while port_open(port):
        if time.monotonic() > deadline:
            return True
        time.sleep(0.1)
    return False


def tail(path: str, lines: int = 15) -> str:
    """The last lines of a log file, indented for an error message ("" if unreadable)."""
    try:
        text = Path(path).read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return ""
    return "\n".join(f"    | {line}" for line in text)
