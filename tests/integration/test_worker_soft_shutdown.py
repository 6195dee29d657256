"""A worker stopped mid-stream (SIGTERM with REMAP_SIGTERM=SIGQUIT, as compose runs it) finishes and
acks its in-flight batch, and requeues the rest at once: nothing is left unacked for the Redis
visibility timeout, nothing is lost."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import redis

from shelfsight.shared.celery_app import create_celery_app
from shelfsight.shared.enqueue import enqueue_upload
from shelfsight.shared.events import ResultRecord
from shelfsight.shared.settings import Settings
from shelfsight.shared.storage import S3ObjectStore
from tests.helpers import jpeg_bytes, wait_for

EVENTS = 40


def _worker_env(settings: Settings) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHELFSIGHT_")}
    env.update({
        "SHELFSIGHT_BROKER_URL": settings.broker_url, "SHELFSIGHT_RESULT_BACKEND": settings.result_backend,
        "SHELFSIGHT_S3_ENDPOINT_URL": settings.s3_endpoint_url or "", "SHELFSIGHT_S3_ACCESS_KEY_ID": "test",
        "SHELFSIGHT_S3_SECRET_ACCESS_KEY": "test", "SHELFSIGHT_BUCKET": settings.bucket,
        "SHELFSIGHT_ALLOWED_IMAGE_BUCKETS": f'["{settings.bucket}"]',
        "SHELFSIGHT_MODEL_ARCH": "shelfsight-tiny", "SHELFSIGHT_MODEL_WEIGHTS": "none", "SHELFSIGHT_DEVICE": "cpu",
        # Batches wait up to 0.5 s to fill, so the stop lands while one is in flight.
        "SHELFSIGHT_BATCH_SIZE": "4", "SHELFSIGHT_BATCH_MAX_WAIT_MS": "500", "SHELFSIGHT_WORKER_CONCURRENCY": "4",
        "SHELFSIGHT_WORKER_SOFT_SHUTDOWN_TIMEOUT_S": "3", "REMAP_SIGTERM": "SIGQUIT",
        "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
    })
    return env


def test_stopping_worker_finishes_its_batch_and_requeues_the_rest(settings: Settings, tmp_path: Path) -> None:
    store = S3ObjectStore(settings)
    app = create_celery_app(settings)
    for i in range(EVENTS):
        store.put(settings.bucket, f"uploads/tops/p{i}.jpg", jpeg_bytes(), "image/jpeg")
        enqueue_upload(app, product_id=f"p{i}", category="tops", image=f"s3://{settings.bucket}/uploads/tops/p{i}.jpg")
    broker = redis.Redis.from_url(settings.broker_url)
    log = tmp_path / "worker.log"
    with log.open("wb") as out:
        worker = subprocess.Popen([sys.executable, "-m", "shelfsight.shared.cli", "worker"],
                                  env=_worker_env(settings), stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: store.list_keys(settings.bucket, "results/") or worker.poll() is not None, timeout=120)
        assert worker.poll() is None, log.read_text()[-3000:]
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=60) == 0, log.read_text()[-3000:]
    finally:
        if worker.poll() is None:
            worker.kill()
    text = log.read_text()
    assert "Soft Shutdown" in text
    results = store.list_keys(settings.bucket, "results/")
    for key in results:  # every result that was written is complete
        ResultRecord.model_validate_json(store.get(settings.bucket, key).body)
    assert broker.hlen("unacked") == 0, "nothing left for the visibility timeout"
    done = {Path(key).stem for key in results}
    waiting = {json.loads(base64.b64decode(json.loads(raw)["body"]))[0][0]["product_id"]
               for raw in broker.lrange(settings.extract_queue, 0, -1)}  # type: ignore[union-attr]
    assert 0 < len(done) < EVENTS, "stopped mid-stream"
    assert done | waiting == {f"p{i}" for i in range(EVENTS)}, "every event has a result or is queued again"
