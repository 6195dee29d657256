"""Issue 8 on a real broker and a real S3 endpoint behind a fault proxy: a message is acked only
once its event's outcome is durable.

Each test would fail on the code before issue 8: there the message was acked (Celery's default
for an exception, a failed retry publish, an argument TypeError, an unknown task) and nothing
was ever recorded.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from prometheus_client import REGISTRY

from shelfsight.shared.celery_app import EXTRACT_TASK, create_celery_app
from shelfsight.shared.dev.faults import FaultProxy
from shelfsight.shared.enqueue import enqueue_upload
from shelfsight.shared.settings import Settings
from shelfsight.shared.storage import S3ObjectStore
from tests.helpers import extraction_worker, jpeg_bytes, wait_for

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def proxy(settings: Settings) -> Iterator[FaultProxy]:
    with FaultProxy(settings.s3_endpoint_url or "") as running:
        yield running


@pytest.fixture
def faulty(settings: Settings, proxy: FaultProxy) -> Settings:
    """The worker's settings: S3 through the proxy, no retries inside boto3, fast retries."""
    return settings.model_copy(update={
        "s3_endpoint_url": proxy.url, "s3_retries": 0, "s3_read_timeout_s": 1.0, "s3_connect_timeout_s": 1.0,
        "max_retries": 1, "retry_backoff_s": 0.05, "retry_backoff_max_s": 0.3, "model_poll_interval_s": 60.0,
    })


def _requeued(reason: str) -> float:
    return REGISTRY.get_sample_value("shelfsight_requeued_total", {"reason": reason}) or 0.0


def _records(store: S3ObjectStore, settings: Settings, prefix: str) -> list[dict]:
    return [json.loads(store.get(settings.bucket, k).body) for k in store.list_keys(settings.bucket, prefix)]


def _pending(settings: Settings) -> int:
    """Messages the broker still holds for the extract queue: queued, or delivered and unacked."""
    client = redis.Redis.from_url(settings.broker_url)
    return int(client.llen(settings.extract_queue)) + int(client.hlen("unacked"))


def test_with_s3_denied_nothing_is_acked_and_the_event_finishes_once_s3_is_back(
    faulty: Settings, proxy: FaultProxy, store: S3ObjectStore
) -> None:
    store.put(faulty.bucket, "uploads/pans/a.jpg", jpeg_bytes(), "image/jpeg")
    proxy.set("deny")  # credentials revoked: the image, CURRENT and the dead letter all answer 403
    before = _requeued("outcome_not_durable")
    with extraction_worker(faulty, concurrency=2):
        enqueue_upload(create_celery_app(faulty), product_id="a", category="pans", event_id="denied-1",
                       image=f"s3://{faulty.bucket}/uploads/pans/a.jpg")
        wait_for(lambda: _requeued("outcome_not_durable") > before, timeout=60)
        assert _pending(faulty) >= 1  # still held by the broker, not acked away
        assert not store.list_keys(faulty.bucket, "results/") and not store.list_keys(faulty.bucket, "dead-letters/")
        proxy.clear()
        # Its retries ran out while S3 was denied, so the attempt after the clear writes what it
        # finds: the result, or (when that attempt read the model before the clear and wrote after
        # it) the transient error's dead letter. Either way exactly one outcome, then the ack.
        wait_for(lambda: store.list_keys(faulty.bucket, "results/") or store.list_keys(faulty.bucket, "dead-letters/"),
                 timeout=60)
        wait_for(lambda: _pending(faulty) == 0, timeout=30)
    results, dead = store.list_keys(faulty.bucket, "results/"), _records(store, faulty, "dead-letters/")
    assert len(results) + len(dead) == 1, (results, dead)
    assert results == ["results/pans/a.json"] or dead[0]["error_code"] == "transient_exhausted"


def test_a_retry_that_cannot_be_published_requeues_the_original(
    faulty: Settings, proxy: FaultProxy, store: S3ObjectStore, monkeypatch
) -> None:
    from celery.canvas import Signature
    from kombu.exceptions import OperationalError

    store.put(faulty.bucket, "uploads/pans/b.jpg", jpeg_bytes(), "image/jpeg")
    real_apply_async = Signature.apply_async
    failed: list[str] = []

    def broker_refuses_once(self, *args, **kwargs):  # the retry's publish meets a broker blip
        if not failed:
            failed.append(self.id or "")
            raise OperationalError("Error 111 connecting to redis. Connection refused.")
        return real_apply_async(self, *args, **kwargs)

    monkeypatch.setattr(Signature, "apply_async", broker_refuses_once)
    proxy.set("error_503", match=lambda method, path: method == "GET" and "/uploads/" in path, count=1)
    before = _requeued("retry_not_published")
    with extraction_worker(faulty, concurrency=2):
        enqueue_upload(create_celery_app(faulty), product_id="b", category="pans", event_id="retry-1",
                       image=f"s3://{faulty.bucket}/uploads/pans/b.jpg")
        # old code: Celery's Reject(requeue=False) dropped the message here, for good
        wait_for(lambda: store.exists(faulty.bucket, "results/pans/b.json"), timeout=60)
    assert proxy.counts["error_503"] == 1, dict(proxy.counts)
    assert failed and _requeued("retry_not_published") == before + 1


def test_a_message_with_two_positional_args_is_dead_lettered_not_a_type_error(
    settings: Settings, store: S3ObjectStore
) -> None:
    with extraction_worker(settings, concurrency=2) as app:
        app.send_task(EXTRACT_TASK, args=[{"product_id": "x", "marker": "two-args"}, {"extra": 1}])
        letters = wait_for(lambda: _records(store, settings, "dead-letters/"), timeout=60)
    [letter] = letters
    assert letter["error_code"] == "malformed_event" and "two-args" in json.dumps(letter["event"])


def test_unknown_task_and_non_task_messages_wait_for_their_dead_letter(
    faulty: Settings, proxy: FaultProxy, store: S3ObjectStore
) -> None:
    proxy.set("error_503")  # S3 down: the dead letters cannot be written yet
    before = _requeued("undeliverable_not_recorded")
    with extraction_worker(faulty, concurrency=2) as app:
        app.send_task("shelfsight.no_such_task", args=[{"marker": "unknown-task"}], queue=faulty.extract_queue)
        with app.producer_or_acquire() as producer:  # not a Celery task message at all
            producer.publish({"marker": "not-a-task"}, routing_key=faulty.extract_queue, serializer="json")
        wait_for(lambda: _requeued("undeliverable_not_recorded") >= before + 2, timeout=60)
        assert _pending(faulty) >= 1  # old code: both were rejected (gone) while their dead letters failed
        proxy.clear()
        letters = wait_for(lambda: len(_records(store, faulty, "dead-letters/")) >= 2 and
                           _records(store, faulty, "dead-letters/"), timeout=60)
    markers = sorted(m for m in ("unknown-task", "not-a-task") for r in letters if m in json.dumps(r["event"]))
    assert markers == ["not-a-task", "unknown-task"]


def _worker(settings: Settings, log: Path, **overrides: str) -> subprocess.Popen:
    env = {
        **os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1",
        "SHELFSIGHT_BROKER_URL": settings.broker_url, "SHELFSIGHT_RESULT_BACKEND": settings.result_backend,
        "SHELFSIGHT_S3_ENDPOINT_URL": settings.s3_endpoint_url or "", "SHELFSIGHT_S3_ACCESS_KEY_ID": "test",
        "SHELFSIGHT_S3_SECRET_ACCESS_KEY": "test", "SHELFSIGHT_BUCKET": settings.bucket,
        "SHELFSIGHT_ALLOWED_IMAGE_BUCKETS": f'["{settings.bucket}"]', "SHELFSIGHT_MODEL_ARCH": "shelfsight-tiny",
        "SHELFSIGHT_MODEL_WEIGHTS": "none", "SHELFSIGHT_DEVICE": "cpu", "SHELFSIGHT_VISIBILITY_TIMEOUT_S": "3",
        **{f"SHELFSIGHT_{k.upper()}": v for k, v in overrides.items()},
    }
    return subprocess.Popen([sys.executable, "-m", "shelfsight.shared.cli", "worker", "--concurrency", "4"],
                            env=env, cwd=ROOT, stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True)


def _stop(proc: subprocess.Popen | None) -> None:
    if proc is not None and proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def test_a_worker_whose_service_cannot_be_built_exits_without_consuming(
    settings: Settings, store: S3ObjectStore, tmp_path: Path
) -> None:
    store.put(settings.bucket, "uploads/pans/c.jpg", jpeg_bytes(), "image/jpeg")
    enqueue_upload(create_celery_app(settings), product_id="c", category="pans",
                   image=f"s3://{settings.bucket}/uploads/pans/c.jpg")
    proc = _worker(settings, tmp_path / "w.log", taxonomy_path=str(tmp_path / "missing-taxonomy.json"))
    try:
        code = proc.wait(timeout=120)  # old code: it ran on, answering ping, acking every message
    finally:
        _stop(proc)
    assert code != 0
    assert redis.Redis.from_url(settings.broker_url).llen(settings.extract_queue) == 1  # never taken
    assert "missing-taxonomy.json" in (tmp_path / "w.log").read_text(errors="replace")


def test_an_event_that_kills_its_worker_each_time_ends_as_poison(
    settings: Settings, store: S3ObjectStore, tmp_path: Path
) -> None:
    store.put(settings.bucket, "uploads/pans/p.jpg", jpeg_bytes(), "image/jpeg")
    client = redis.Redis.from_url(settings.broker_url)
    client.hset("shelfsight:delivery:poison-1", "n", 2)  # two workers already died on it
    enqueue_upload(create_celery_app(settings), product_id="p", category="pans", event_id="poison-1",
                   image=f"s3://{settings.bucket}/uploads/pans/p.jpg")
    # this worker holds the event in its batcher for a minute, then is killed like an OOM victim
    first = _worker(settings, tmp_path / "w1.log", batch_size="64", batch_max_wait_ms="60000")
    second = None
    try:
        wait_for(lambda: int(client.hget("shelfsight:delivery:poison-1", "n") or 0) == 3, timeout=120)
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(timeout=10)
        second = _worker(settings, tmp_path / "w2.log")
        letters = wait_for(lambda: _records(store, settings, "dead-letters/"), timeout=120)
    finally:
        _stop(first)
        _stop(second)
    assert [letter["error_code"] for letter in letters] == ["poison"]  # old code: redelivered forever
    assert not store.exists(settings.bucket, "results/pans/p.json")
