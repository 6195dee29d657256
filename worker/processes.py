"""`shelfsight worker --processes N`: N extraction processes sharing one device, supervised.

Why several processes: the model is not what limits one worker process on a GPU. Its Python
(Celery, S3 requests, decode, result JSON) runs under one GIL at a few ms of CPU per image, so
one process tops out at a few hundred images/s while the GPU could score tens of thousands
(docs/performance.md). N processes give N GILs.

Why a supervisor of whole `shelfsight worker` processes rather than Celery's prefork pool with
`spawn`: a prefork child runs one task at a time, so a micro-batcher inside it would only ever
see batches of one; batching across children would have to happen in the parent, with every
decoded image pickled through a pipe. Here every process is the complete single-process worker
(threads pool, its own micro-batcher, model cache and model watcher on the same device), so
batching, acks, hot swap, poison handling and dead letters are those of one worker, N times
over; processes only share the broker queue, as separate hosts do.

The supervisor itself imports neither torch nor Celery. It
- builds each process's Settings as a copy (`per_process_settings`): the model cache and the
  other memory budgets are per device, so each of N processes gets 1/N; on CPU the torch
  threads are split too; process i serves metrics on metrics_port + i;
- starts each as `shelfsight worker --process-index i --processes N` in its own process group,
  with a parent-death signal so none outlives it;
- restarts a process that exits or dies (SIGKILL, OOM, a crashing codec), with a backoff that
  grows while it keeps dying young; gives up, stopping the others, when processes keep failing
  at startup (a service that cannot be built), and exits 1;
- forwards SIGTERM, SIGQUIT and SIGINT to every process and waits for them: with
  REMAP_SIGTERM=SIGQUIT (docker/compose.yaml) each one does Celery's soft shutdown.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog

from shelfsight.shared.settings import Settings

log = structlog.get_logger()

FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGQUIT, signal.SIGINT)
PR_SET_PDEATHSIG = 1


def per_process_settings(settings: Settings, index: int, processes: int, cpu_count: int | None = None) -> Settings:
    """The Settings of process `index` (0-based) of `processes` sharing one device: a copy.

    Memory budgets are per device (or host), so each process gets its share: the resident model
    cache (`model_cache_bytes`), cold-load reservations and the decode budget. On CPU, torch's
    threads are shared out too unless set explicitly. Process i serves /metrics on
    metrics_port + i (when metrics are on).
    """
    if processes <= 1:
        return settings
    update: dict[str, Any] = {
        "model_cache_bytes": max(1, settings.model_cache_bytes // processes),
        "model_load_memory_bytes": max(1, settings.model_load_memory_bytes // processes),
        "decode_memory_bytes": max(1, settings.decode_memory_bytes // processes),
    }
    if settings.metrics_port:
        update["metrics_port"] = settings.metrics_port + index
    if settings.torch_threads == 0 and not settings.device.startswith("cuda") and not _has_cuda(settings):
        update["torch_threads"] = max(1, (cpu_count or os.cpu_count() or 1) // processes)
    return settings.model_copy(update=update)


def _has_cuda(settings: Settings) -> bool:
    """Whether device "auto" means CUDA here, asked without importing torch in the supervisor."""
    if settings.device != "auto":
        return False
    return any(os.path.exists(p) for p in ("/dev/nvidia0", "/dev/nvidiactl"))


def process_hostname(hostname: str, index: int) -> str:
    """Celery node name of process `index`: `extract@%h` -> `extract-<index>@%h` (unique per host)."""
    name, at, host = hostname.partition("@")
    return f"{name}-{index}{at}{host}"


def worker_command(index: int, processes: int, concurrency: int, hostname: str) -> list[str]:
    """The command line of one supervised process (the same Settings come from the environment)."""
    return [sys.executable, "-m", "shelfsight.shared.cli", "worker", "--process-index", str(index),
            "--processes", str(processes), "--concurrency", str(concurrency),
            "--hostname", process_hostname(hostname, index)]


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Linux: SIGTERM this process when its parent (the supervisor) dies, so none is orphaned."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class _Child:
    index: int
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    restart_at: float = 0.0
    delay_s: float = 0.0
    young_failures: int = 0  # consecutive exits before min_uptime_s
    restarts: int = 0


@dataclass
class SupervisorPolicy:
    """When to restart and when to give up."""

    restart_delay_s: float = 1.0  # first restart delay; doubles while a process keeps dying young
    max_restart_delay_s: float = 60.0
    min_uptime_s: float = 30.0  # a process that lived this long had started fine: reset the backoff
    max_young_failures: int = 5  # this many young deaths in a row with no process up: give up
    stop_timeout_s: float = 120.0  # after a forwarded signal, then SIGKILL


@dataclass
class Supervisor:
    """Runs `command(i)` for i in range(processes), keeps them running, forwards stop signals."""

    command: Callable[[int], Sequence[str]]
    processes: int
    env: dict[str, str] | None = None
    policy: SupervisorPolicy = field(default_factory=SupervisorPolicy)
    poll_s: float = 0.2

    def __post_init__(self) -> None:
        self.children = [_Child(i) for i in range(self.processes)]
        self._stop_signal: int | None = None
        self._signals_seen = 0
        self.gave_up = False

    # --- process management ----------------------------------------------------------------
    def _start(self, child: _Child) -> None:
        child.proc = subprocess.Popen(  # noqa: S603 - our own interpreter and CLI
            list(self.command(child.index)), env=self.env, process_group=0,
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
        )
        child.started_at = time.monotonic()
        log.info("worker.process_started", index=child.index, pid=child.proc.pid, restarts=child.restarts)

    def _on_exit(self, child: _Child, code: int) -> None:
        """A process ended without being asked to: schedule its restart (or give up)."""
        lived = time.monotonic() - child.started_at
        how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
        if lived >= self.policy.min_uptime_s:
            child.young_failures, child.delay_s = 0, 0.0
        child.young_failures += 1 if lived < self.policy.min_uptime_s else 0
        child.delay_s = (min(self.policy.max_restart_delay_s, max(self.policy.restart_delay_s, 2 * child.delay_s))
                         if child.young_failures > 1 else self.policy.restart_delay_s)
        child.restart_at = time.monotonic() + child.delay_s
        child.proc = None
        log.error("worker.process_died", index=child.index, how=how, lived_s=round(lived, 1),
                  restart_in_s=child.delay_s, young_failures=child.young_failures)
        if (child.young_failures >= self.policy.max_young_failures
                and not any(c.proc is not None and time.monotonic() - c.started_at >= self.policy.min_uptime_s
                            for c in self.children)):
            log.critical("worker.processes_give_up", index=child.index, young_failures=child.young_failures,
                         hint="the process dies at startup: see its last log lines")
            self.gave_up = True
            self.stop(signal.SIGTERM)

    def stop(self, signum: int) -> None:
        """Forward `signum` to every running process (a second call forwards again)."""
        self._stop_signal = signum if self._stop_signal is None else self._stop_signal
        self._signals_seen += 1
        for child in self.children:
            if child.proc is not None and child.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    child.proc.send_signal(signum)

    # --- the loop ---------------------------------------------------------------------------
    def run(self) -> int:
        """Start every process and supervise until stopped; the exit code (0: a clean stop)."""
        previous = {s: signal.signal(s, lambda signum, _frame: self.stop(signum)) for s in FORWARDED_SIGNALS}
        codes: dict[int, int] = {}
        stop_deadline: float | None = None
        try:
            for child in self.children:
                self._start(child)
            while True:
                now = time.monotonic()
                if self._stop_signal is not None and stop_deadline is None:
                    stop_deadline = now + self.policy.stop_timeout_s
                for child in self.children:
                    if child.proc is not None and (code := child.proc.poll()) is not None:
                        if self._stop_signal is None:
                            self._on_exit(child, code)
                        else:
                            codes[child.index] = code
                            child.proc = None
                    elif child.proc is None and self._stop_signal is None and now >= child.restart_at:
                        child.restarts += 1
                        self._start(child)
                if self._stop_signal is not None and all(c.proc is None for c in self.children):
                    break
                if stop_deadline is not None and now > stop_deadline:
                    self._kill_all()
                time.sleep(self.poll_s)
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            self._kill_all()
        log.info("worker.processes_stopped", codes=codes, gave_up=self.gave_up)
        clean = all(code in (0, -self._stop_signal) for code in codes.values()) if self._stop_signal else False
        return 1 if self.gave_up or not clean else 0

    def _kill_all(self) -> None:
        for child in self.children:
            if child.proc is not None and child.proc.poll() is None:
                log.error("worker.process_killed", index=child.index, pid=child.proc.pid)
                with contextlib.suppress(ProcessLookupError):
                    child.proc.kill()
                child.proc.wait(timeout=30)

    def pids(self) -> list[int | None]:
        """The pid of each process now (None while one is waiting for its restart)."""
        return [c.proc.pid if c.proc is not None else None for c in self.children]


def supervise(settings: Settings, processes: int, concurrency: int, hostname: str) -> int:
    """Run `processes` extraction processes sharing this machine's device until stopped."""
    log.info("worker.processes", processes=processes, device=settings.device,
             model_cache_bytes_each=max(1, settings.model_cache_bytes // processes),
             concurrency_each=concurrency or settings.effective_concurrency())
    supervisor = Supervisor(
        lambda i: worker_command(i, processes, concurrency, hostname), processes, env=dict(os.environ),
    )
    return supervisor.run()
