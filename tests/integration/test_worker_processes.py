"""`shelfsight worker --processes 2` on a real broker and S3: every event gets one outcome, a
promotion reaches every process, and a process killed with SIGKILL loses nothing."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import redis

from shelfsight.shared.celery_app import create_celery_app
from shelfsight.shared.enqueue import enqueue_upload
from shelfsight.shared.settings import Settings
from shelfsight.shared.storage import S3ObjectStore
from shelfsight.shared.streams import announce_model
from tests.helpers import jpeg_bytes, publish_tiny_version, wait_for

ROOT = Path(__file__).resolve().parents[2]
PROCESSES = 2


def _two_free_ports() -> int:
    """A port P with P and P + 1 free (the processes serve metrics on P + index)."""
    for _ in range(50):
        with socket.socket() as a:
            a.bind(("127.0.0.1", 0))
            port = a.getsockname()[1]
            with socket.socket() as b:
                try:
                    b.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
                return int(port)
    raise RuntimeError("no two adjacent free ports")


def _env(settings: Settings, **overrides: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHELFSIGHT_")}
    env.update({
        "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
        "SHELFSIGHT_BROKER_URL": settings.broker_url, "SHELFSIGHT_RESULT_BACKEND": settings.result_backend,
        "SHELFSIGHT_S3_ENDPOINT_URL": settings.s3_endpoint_url or "", "SHELFSIGHT_S3_ACCESS_KEY_ID": "test",
        "SHELFSIGHT_S3_SECRET_ACCESS_KEY": "test", "SHELFSIGHT_BUCKET": settings.bucket,
        "SHELFSIGHT_ALLOWED_IMAGE_BUCKETS": f'["{settings.bucket}"]',
        "SHELFSIGHT_MODEL_ARCH": "shelfsight-tiny", "SHELFSIGHT_MODEL_WEIGHTS": "none", "SHELFSIGHT_DEVICE": "cpu",
        "SHELFSIGHT_BATCH_SIZE": "8", "SHELFSIGHT_WORKER_CONCURRENCY": "6",
        "SHELFSIGHT_VISIBILITY_TIMEOUT_S": "4",  # a dead process's events come back within seconds
        "SHELFSIGHT_WORKER_SOFT_SHUTDOWN_TIMEOUT_S": "1", "SHELFSIGHT_LOG_FORMAT": "json",
        **{f"SHELFSIGHT_{k.upper()}": v for k, v in overrides.items()},
    })
    return env


@pytest.fixture
def start_workers(tmp_path: Path) -> Iterator:
    procs: list[subprocess.Popen[bytes]] = []

    def start(settings: Settings, **overrides: str) -> subprocess.Popen[bytes]:
        log = (tmp_path / f"workers{len(procs)}.log").open("wb")
        proc = subprocess.Popen(
            [sys.executable, "-m", "shelfsight.shared.cli", "worker", "--processes", str(PROCESSES)],
            env=_env(settings, **overrides), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the supervisor and, with it, its processes
            proc.wait(timeout=30)
        for child in psutil.Process().children(recursive=True):
            if "--process-index" in " ".join(child.cmdline()):
                child.kill()


def _children(supervisor: subprocess.Popen[bytes]) -> dict[int, int]:
    """index -> pid of the supervisor's worker processes now."""
    found = {}
    for child in psutil.Process(supervisor.pid).children():
        try:
            argv = child.cmdline()
        except psutil.Error:
            continue
        if "--process-index" in argv:
            found[int(argv[argv.index("--process-index") + 1])] = child.pid
    return found


def _metric(port: int, name: str, label: str = "") -> float:
    """One sample of a process's /metrics (0 when absent)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    for line in text.splitlines():
        if line.startswith(name) and label in line and not line.startswith("#"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def _metric_or_zero(port: int, name: str, label: str = "") -> float:
    try:
        return _metric(port, name, label)
    except OSError:
        return 0.0


def _wait_consuming(port: int) -> None:
    """Every process serves /metrics once it is ready and consuming (worker_ready)."""
    wait_for(lambda: all(_up(port + i) for i in range(PROCESSES)), timeout=120)


def _up(port: int) -> bool:
    try:
        _metric(port, "shelfsight_resident_models")
        return True
    except OSError:
        return False


def _send(app: object, settings: Settings, first: int, n: int) -> list[str]:
    return [enqueue_upload(app, product_id=f"p{i}", category="pans", image=f"s3://{settings.bucket}/uploads/pans/p.jpg")
            for i in range(first, first + n)]


def _stream(settings: Settings, stream: str) -> list[dict[str, str]]:
    client = redis.Redis.from_url(settings.broker_url, decode_responses=True)
    return [fields for _, fields in client.xrange(stream)]


def test_every_event_has_one_outcome_and_a_promotion_reaches_every_process(
    settings: Settings, store: S3ObjectStore, start_workers
) -> None:
    port = _two_free_ports()
    store.put(settings.bucket, "uploads/pans/p.jpg", jpeg_bytes((90, 90, 90)), "image/jpeg")
    # batches wait up to 0.3 s to fill: each process holds its share of the burst, so both serve
    supervisor = start_workers(settings, metrics_port=str(port), model_poll_interval_s="600", batch_max_wait_ms="300")
    app = create_celery_app(settings)
    broker = redis.Redis.from_url(settings.broker_url)
    _wait_consuming(port)
    sent = _send(app, settings, 0, 40)
    missing = enqueue_upload(app, product_id="gone", category="pans", image=f"s3://{settings.bucket}/uploads/pans/gone.jpg")
    entries = wait_for(lambda: len(e := _stream(settings, settings.results_stream)) >= len(sent) and e, timeout=180)
    assert Counter(e["event_id"] for e in entries) == Counter(sent)  # one outcome per event, none doubled
    dead = wait_for(lambda: _stream(settings, settings.dead_letter_stream), timeout=60)
    assert [(d["event_id"], d["error_code"]) for d in dead] == [(missing, "object_missing")]
    wait_for(lambda: broker.hlen("unacked") == 0 and broker.llen(settings.extract_queue) == 0, timeout=30)
    # both processes served (pans resident in each), each with its own metrics listener
    wait_for(lambda: all(_metric_or_zero(port + i, "shelfsight_resident_models") >= 1 for i in range(PROCESSES)),
             timeout=60)
    version = publish_tiny_version(settings, store, "pans", seed=5)
    announce_model(broker, settings.model_events_channel, "pans", version)
    wait_for(lambda: all(_metric_or_zero(port + i, "shelfsight_model_swaps_total", 'category="pans"') >= 1
                         for i in range(PROCESSES)), timeout=120)  # every process swapped, not just one
    after = _send(app, settings, 40, 20)
    entries = wait_for(lambda: len(e := _stream(settings, settings.results_stream)) >= 60 and e, timeout=120)
    assert {e["model_version"] for e in entries if e["event_id"] in after} == {version}
    assert len(_stream(settings, settings.dead_letter_stream)) == 1
    assert supervisor.poll() is None
    supervisor.send_signal(signal.SIGTERM)  # forwarded to every process: each shuts down cleanly
    assert supervisor.wait(timeout=90) == 0


def test_a_process_killed_with_sigkill_loses_nothing_and_is_restarted(
    settings: Settings, store: S3ObjectStore, start_workers
) -> None:
    store.put(settings.bucket, "uploads/pans/p.jpg", jpeg_bytes((30, 90, 150)), "image/jpeg")
    # batches wait 1.5 s to fill (batch size 64): every event sits unacked in a process's batcher
    port = _two_free_ports()
    supervisor = start_workers(settings, batch_size="64", batch_max_wait_ms="1500", metrics_port=str(port))
    first = wait_for(lambda: len(c := _children(supervisor)) == PROCESSES and c, timeout=30)
    broker = redis.Redis.from_url(settings.broker_url)
    app = create_celery_app(settings)
    _wait_consuming(port)
    sent = _send(app, settings, 0, 12)  # 2 processes x 6 threads: each holds 6
    wait_for(lambda: broker.hlen("unacked") == 12, timeout=60)
    os.kill(first[0], signal.SIGKILL)
    entries = wait_for(lambda: len(e := _stream(settings, settings.results_stream)) >= 12 and e, timeout=120)
    assert Counter(e["event_id"] for e in entries) == Counter(sent)  # the killed process's events too, once
    assert _stream(settings, settings.dead_letter_stream) == []
    wait_for(lambda: broker.hlen("unacked") == 0, timeout=30)
    restarted = wait_for(lambda: (c := _children(supervisor)).get(0) not in (None, first[0]) and c, timeout=60)
    assert restarted[1] == first[1]  # the other process was left alone
    assert supervisor.poll() is None
