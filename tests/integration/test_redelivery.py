"""At-least-once on real processes: a worker killed with SIGKILL mid-event loses nothing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import redis

from shelfsight.shared.celery_app import create_celery_app
from shelfsight.shared.enqueue import enqueue_upload
from shelfsight.shared.settings import Settings
from shelfsight.shared.storage import S3ObjectStore
from tests.helpers import jpeg_bytes, wait_for

ROOT = Path(__file__).resolve().parents[2]


def _start_worker(settings: Settings, log: Path, **overrides: str) -> subprocess.Popen:
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "HF_HUB_OFFLINE": "1",
        "SHELFSIGHT_BROKER_URL": settings.broker_url,
        "SHELFSIGHT_RESULT_BACKEND": settings.result_backend,
        "SHELFSIGHT_S3_ENDPOINT_URL": settings.s3_endpoint_url or "",
        "SHELFSIGHT_S3_ACCESS_KEY_ID": "test",
        "SHELFSIGHT_S3_SECRET_ACCESS_KEY": "test",
        "SHELFSIGHT_BUCKET": settings.bucket,
        "SHELFSIGHT_ALLOWED_IMAGE_BUCKETS": f'["{settings.bucket}"]',
        "SHELFSIGHT_MODEL_ARCH": "shelfsight-tiny",
        "SHELFSIGHT_MODEL_WEIGHTS": "none",
        "SHELFSIGHT_DEVICE": "cpu",
        "SHELFSIGHT_VISIBILITY_TIMEOUT_S": "3",
        **{f"SHELFSIGHT_{k.upper()}": v for k, v in overrides.items()},
    }
    return subprocess.Popen(
        [sys.executable, "-m", "shelfsight.shared.cli", "worker", "--concurrency", "4"],
        env=env, cwd=ROOT, stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True,
    )


def test_sigkilled_worker_event_is_redelivered_and_finished(settings: Settings, store: S3ObjectStore, tmp_path: Path) -> None:
    store.put(settings.bucket, "uploads/pans/k.jpg", jpeg_bytes(), "image/jpeg")
    client = redis.Redis.from_url(settings.broker_url)
    # worker 1 holds the event in its batcher for a minute: it is in flight, unacked
    first = _start_worker(settings, tmp_path / "w1.log", batch_size="64", batch_max_wait_ms="60000")
    second = None
    try:
        app = create_celery_app(settings)
        enqueue_upload(app, product_id="k", category="pans", image=f"s3://{settings.bucket}/uploads/pans/k.jpg")
        wait_for(lambda: client.hlen("unacked") == 1, timeout=90)
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(timeout=10)
        assert not store.exists(settings.bucket, "results/pans/k.json")
        second = _start_worker(settings, tmp_path / "w2.log", batch_max_wait_ms="10")
        wait_for(lambda: store.exists(settings.bucket, "results/pans/k.json"), timeout=120)
        wait_for(lambda: client.hlen("unacked") == 0, timeout=30)  # and it was acked this time
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
