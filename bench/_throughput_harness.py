"""The throughput bench's harness: its child processes, CPU accounting, profiler and RSS.

Services (redis-server, a moto S3 server) and py-spy run in their own process groups and are
killed at exit, whatever happens. Nothing here knows what is being measured.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

_children: list[subprocess.Popen[bytes]] = []


def say(*parts: object) -> None:
    """A progress line on stderr (stdout carries only the result JSON)."""
    print("[bench]", *parts, file=sys.stderr, flush=True)


# --- services: redis-server and moto S3 server, each in its own process group -----------------------


def _kill_group(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=timeout)


def cleanup_children() -> None:
    """Kill every child process group still running (also registered with atexit)."""
    while _children:
        _kill_group(_children.pop())


atexit.register(cleanup_children)


def register_child(proc: subprocess.Popen[bytes]) -> None:
    """Kill `proc`'s process group at exit if it is still running then (start it in its own session)."""
    _children.append(proc)


def cleanup_child(proc: subprocess.Popen[bytes]) -> None:
    """Kill `proc`'s process group now (its supervised children included) and forget it."""
    _kill_group(proc)
    with contextlib.suppress(ValueError):
        _children.remove(proc)


@dataclass
class Services:
    redis_url: str
    s3_endpoint: str
    redis: subprocess.Popen[bytes]
    moto: subprocess.Popen[bytes]


def _s3_command(kind: str, port: int, processes: int, log_dir: Path) -> list[str]:
    """moto's server, or the bench's S3 stand-in (bench/_s3_standin.py: a fraction of moto's CPU per
    request, keep-alive, several processes on one port)."""
    if kind == "moto":
        return [sys.executable, "-c", "import sys; from moto.server import main; main(sys.argv[1:])",
                "-H", "127.0.0.1", "-p", str(port)]
    if kind == "standin":
        return [sys.executable, str(Path(__file__).with_name("_s3_standin.py")), "--port", str(port),
                "--processes", str(processes), "--root", str(log_dir / "s3")]
    raise ValueError(f"unknown S3 server {kind!r} (moto | standin)")


@contextlib.contextmanager
def services(log_dir: Path, s3: str = "moto", s3_processes: int = 1) -> Iterator[Services]:
    """A real redis-server and an S3 server (moto or the stand-in, in their own processes) on free
    loopback ports."""
    from shelfsight.shared.dev.processes import spawn
    from shelfsight.shared.dev.services import free_port, redis_server_binary, wait_for_port

    redis_port, s3_port = free_port(), free_port()
    started: list[subprocess.Popen[bytes]] = []
    try:
        redis_proc = spawn(
            [redis_server_binary(), "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--databases", "32"],
            {}, log_dir / "redis.log",
        )
        started.append(redis_proc)
        _children.append(redis_proc)
        moto_proc = spawn(_s3_command(s3, s3_port, s3_processes, log_dir), {}, log_dir / f"{s3}.log")
        started.append(moto_proc)
        _children.append(moto_proc)
        wait_for_port(redis_port, 30)
        wait_for_port(s3_port, 60)
        say(f"redis-server pid {redis_proc.pid} on 127.0.0.1:{redis_port}; {s3} S3 server pid {moto_proc.pid} "
            f"({s3_processes if s3 == 'standin' else 1} process(es)) on 127.0.0.1:{s3_port}")
        yield Services(f"redis://127.0.0.1:{redis_port}", f"http://127.0.0.1:{s3_port}", redis_proc, moto_proc)
    finally:
        for proc in reversed(started):
            _kill_group(proc)
            with contextlib.suppress(ValueError):
                _children.remove(proc)


def services_rss(svc: Services) -> dict[str, float]:
    """Resident MiB of the moto and redis-server processes."""

    return {name: round(sum(p.memory_info().rss for p in process_tree(pid)) / 2**20, 1)
            for name, pid in (("s3_server", svc.moto.pid), ("redis_server", svc.redis.pid))}


def process_tree(pid: int) -> list:
    """The process and its descendants (the S3 stand-in forks its workers)."""
    import psutil

    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


# --- CPU accounting: seconds per process and per thread of this process ------------------------------


class CpuMeter:
    """CPU seconds used between start() and stop(): this process by thread kind, moto, redis."""

    def __init__(self, pids: dict[str, int]) -> None:
        import psutil

        self._psutil = psutil
        self.pids = pids
        self._start: dict[str, float] = {}

    def _sample(self) -> dict[str, float]:
        psutil = self._psutil
        out: dict[str, float] = {}
        names = {t.native_id: t.name for t in threading.enumerate() if t.native_id is not None}
        me = psutil.Process()
        for th in me.threads():
            name = names.get(th.id, "")
            if name.startswith("batcher-"):
                kind = "worker.batcher_lane(model)"
            elif name == "MainThread":
                kind = "bench.main(enqueue+wait)"
            elif not name:
                kind = "native(torch intra-op/other)"
            elif name.startswith("ThreadPoolExecutor"):
                kind = "worker.task_threads"  # celery's threads pool: fetch, decode, write, task overhead
            else:
                kind = f"other:{name.split('-')[0]}"
            out[kind] = out.get(kind, 0.0) + th.user_time + th.system_time
        for label, pid in self.pids.items():
            total = 0.0
            for proc in process_tree(pid):
                try:
                    times = proc.cpu_times()
                    total += times.user + times.system
                except psutil.Error:
                    continue
            out[label] = total
        return out

    def start(self) -> None:
        self._start = self._sample()

    def stop(self) -> dict[str, float]:
        end = self._sample()
        return {k: round(v - self._start.get(k, 0.0), 2) for k, v in sorted(end.items()) if v - self._start.get(k, 0.0) > 0.005}


PLUMBING_KINDS = ("worker.task_threads", "other:")  # Celery task threads; consumer, listeners, timers


def plumbing_by_component(cpu_s: dict[str, float], images: int) -> dict[str, float]:
    """CPU ms per image of the worker process outside the model forward, by thread kind (the
    batcher lanes and torch's native threads are the model; the bench's own main thread and the
    servers are not the worker)."""
    return {kind: round(1000 * seconds / images, 2) for kind, seconds in sorted(cpu_s.items())
            if images and kind.startswith(PLUMBING_KINDS)}


# --- profile -------------------------------------------------------------------------------------------


@contextlib.contextmanager
def py_spy(out_path: Path | None, pids: Sequence[int], *, gil: bool = False, rate: int = 50) -> Iterator[list[Path]]:
    """Sample this process (and moto) with py-spy while the block runs; raw collapsed stacks.

    `gil`: sample only the thread holding the GIL (where Python CPU goes; native torch threads and
    threads waiting for the GIL are left out)."""
    files: list[Path] = []
    procs: list[subprocess.Popen[bytes]] = []
    fallback = "/tmp/pyspy/bin/py-spy"  # noqa: S108 - read only: where a pip --target install of py-spy may sit
    beside = Path(sys.executable).with_name("py-spy")  # a venv's bin/, not necessarily on PATH
    exe = shutil.which("py-spy") or next((str(p) for p in (beside, Path(fallback)) if p.exists()), None)
    if out_path is None or exe is None:
        if out_path is not None:
            say("py-spy not found (pip install py-spy); no profile taken")
        yield files
        return
    for pid in pids:
        path = out_path.with_name(f"{out_path.stem}-{pid}.txt")
        procs.append(subprocess.Popen([exe, "record", "--pid", str(pid), "--format", "raw", "--rate", str(rate),
                                       "--nonblocking", "--threads", *(["--gil"] if gil else []), "-o", str(path)],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True))
        _children.append(procs[-1])
        files.append(path)
    time.sleep(1.0)
    try:
        yield files
    finally:
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGINT)  # py-spy writes its file on SIGINT
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                _kill_group(proc)
            with contextlib.suppress(ValueError):
                _children.remove(proc)


PROFILE_BUCKETS: list[tuple[str, tuple[str, ...]]] = [
    ("model forward (torch)", ("score (worker/model_cache.py", "forward (")),
    ("decode+preprocess (PIL)", ("decode_image", "prepare (worker/extractor.py", "preprocess")),
    ("S3 client (boto3/botocore)", ("botocore", "boto3")),
    ("result JSON/pydantic", ("model_dump_json", "model_validate", "_record (worker/extractor.py")),
    ("logging (structlog)", ("structlog",)),
    ("redis client", ("redis/",)),
    ("celery/kombu", ("celery/", "kombu/")),
    ("moto S3 server", ("moto/", "werkzeug/", "flask/")),
]


def summarize_profile(files: Sequence[Path]) -> dict[str, float]:
    """Share of samples per bucket (first bucket whose marker is in the stack)."""
    counts: dict[str, int] = {}
    total = 0
    for path in files:
        if not path.exists():
            continue
        for line in path.read_text(errors="replace").splitlines():
            stack, _, num = line.rpartition(" ")
            if not num.isdigit():
                continue
            k = int(num)
            total += k
            bucket = next((name for name, marks in PROFILE_BUCKETS if any(m in stack for m in marks)), "other")
            counts[bucket] = counts.get(bucket, 0) + k
    return {k: round(100 * v / total, 1) for k, v in sorted(counts.items(), key=lambda kv: -kv[1])} if total else {}


# --- memory ----------------------------------------------------------------------------------------


def peak_rss_mb() -> float:
    """This process's peak resident set size in MiB (Linux reports ru_maxrss in KiB)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


