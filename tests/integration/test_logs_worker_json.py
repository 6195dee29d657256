"""A real extraction worker process in JSON mode: every line it writes is a JSON object."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import redis

from shelfsight.shared.celery_app import EXTRACT_TASK, create_celery_app
from shelfsight.shared.enqueue import enqueue_upload
from shelfsight.shared.settings import Settings
from shelfsight.shared.storage import S3ObjectStore
from tests.helpers import jpeg_bytes, wait_for

REPO = Path(__file__).resolve().parents[2]
S3_SECRET = "moto-takes-any-secret-0123456789"


def _worker_env(settings: Settings) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHELFSIGHT_")}
    env.update({
        "HF_HUB_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
        "SHELFSIGHT_LOG_FORMAT": "json",
        "SHELFSIGHT_BROKER_URL": settings.broker_url,
        "SHELFSIGHT_RESULT_BACKEND": settings.result_backend,
        "SHELFSIGHT_S3_ENDPOINT_URL": str(settings.s3_endpoint_url),
        "SHELFSIGHT_S3_ACCESS_KEY_ID": "test",
        "SHELFSIGHT_S3_SECRET_ACCESS_KEY": S3_SECRET,
        "SHELFSIGHT_BUCKET": settings.bucket,
        "SHELFSIGHT_ALLOWED_IMAGE_SOURCES": json.dumps([f"s3://{settings.bucket}/uploads/"]),
        "SHELFSIGHT_MODEL_ARCH": settings.model_arch,
        "SHELFSIGHT_MODEL_WEIGHTS": settings.model_weights,
        "SHELFSIGHT_DEVICE": "cpu",
        "SHELFSIGHT_BATCH_SIZE": "4",
        "SHELFSIGHT_BATCH_MAX_WAIT_MS": "5",
    })
    return env


def test_worker_writes_only_json_lines_and_no_per_task_chatter(settings: Settings, store: S3ObjectStore,
                                                               tmp_path: Path) -> None:
    b = settings.bucket
    store.put(b, "uploads/pans/good.jpg", jpeg_bytes(), "image/jpeg")
    store.put(b, "uploads/pans/bad.jpg", b"<html>not an image</html>", "image/jpeg")
    out, err = (tmp_path / "stdout").open("w+"), (tmp_path / "stderr").open("w+")
    worker = subprocess.Popen(
        [sys.executable, "-m", "shelfsight.shared.cli", "worker", "--concurrency", "2"],
        cwd=REPO, env=_worker_env(settings), stdout=out, stderr=err, start_new_session=True,
    )
    try:
        app = create_celery_app(settings)
        enqueue_upload(app, product_id="good", category="pans", image=f"s3://{b}/uploads/pans/good.jpg")
        enqueue_upload(app, product_id="bad", category="pans", image=f"s3://{b}/uploads/pans/bad.jpg")
        # a key whose text looks like a credential: it reaches a log line only redacted
        enqueue_upload(app, product_id="gone", category="pans",
                       image=f"s3://{b}/uploads/pans/password=hunter2-in-a-key.jpg")
        app.send_task(EXTRACT_TASK, args=[{"product_id": "??", "junk": True}])  # malformed
        wait_for(lambda: store.exists(b, "results/pans/good.json"), timeout=120)
        client = redis.Redis.from_url(settings.broker_url, decode_responses=True)
        wait_for(lambda: client.xlen(settings.dead_letter_stream) >= 3, timeout=60)
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        worker.wait(timeout=60)
    err.seek(0)
    out.seek(0)
    lines = [line for line in err.read().splitlines() if line.strip()]
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise AssertionError(f"not a JSON line on the worker's stderr: {line!r}") from exc
    assert all(isinstance(r, dict) and "event" in r and "level" in r for r in records)
    events = [r["event"] for r in records]
    assert "worker.ready" in events and "event.done" in events
    codes = sorted(r.get("error_code") for r in records if r["event"] == "event.dead_lettered")
    assert codes == ["malformed_event", "object_missing", "undecodable_image"]
    assert not [e for e in events if e.startswith("Task ") and ("received" in e or "succeeded" in e)]
    text = "\n".join(lines)
    assert "hunter2-in-a-key" not in text and S3_SECRET not in text
    said = [json.loads(line) for line in out.read().splitlines() if line.strip()]  # stdout: JSON too
    assert [s["message"] for s in said] == ["worker: Warm shutdown (MainProcess)"]
