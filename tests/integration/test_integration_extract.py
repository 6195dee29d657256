"""End to end on real services: Celery worker (threads pool) ↔ redis-server ↔ moto S3 server."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
import redis

from shelfsight.shared.celery_app import EXTRACT_TASK
from shelfsight.shared.enqueue import enqueue_event, enqueue_upload
from shelfsight.shared.events import ResultRecord, UploadEvent
from shelfsight.shared.settings import Settings
from shelfsight.shared.storage import S3ObjectStore
from tests.helpers import extraction_worker, jpeg_bytes, wait_for


@pytest.fixture
def running_worker(settings: Settings) -> Iterator:
    with extraction_worker(settings) as app:
        yield app


def _result(store: S3ObjectStore, settings: Settings, category: str, product_id: str) -> dict | None:
    key = f"{settings.results_prefix}/{category}/{product_id}.json"
    return json.loads(store.get(settings.bucket, key).body) if store.exists(settings.bucket, key) else None


def _dead_letters(settings: Settings) -> list[dict]:
    client = redis.Redis.from_url(settings.broker_url, decode_responses=True)
    return [fields for _, fields in client.xrange(settings.dead_letter_stream)]


def test_enqueue_to_result_file_and_stream(running_worker, settings: Settings, store: S3ObjectStore) -> None:
    for i in range(6):
        store.put(settings.bucket, f"uploads/tops/sku-{i}.jpg", jpeg_bytes((40 * i, 80, 200)), "image/jpeg")
    ids = [
        enqueue_upload(running_worker, product_id=f"sku-{i}", category="tops",
                       image=f"s3://{settings.bucket}/uploads/tops/sku-{i}.jpg")
        for i in range(6)
    ]
    results = [wait_for(lambda i=i: _result(store, settings, "tops", f"sku-{i}"), timeout=90) for i in range(6)]
    for event_id, result in zip(ids, results, strict=True):
        record = ResultRecord.model_validate(result)
        assert record.event_id == event_id
        assert set(record.attributes) == {"sleeve_length", "neckline", "main_colour"}
        assert record.model.mode == "zero_shot" and record.model.architecture == "shelfsight-tiny"
        assert record.timings["batch_size"] >= 1
    client = redis.Redis.from_url(settings.broker_url, decode_responses=True)
    entries = wait_for(lambda: client.xrange(settings.results_stream) if client.xlen(settings.results_stream) >= 6 else None)
    assert sorted(f["event_id"] for _, f in entries) == sorted(ids)


def test_bad_inputs_dead_letter_and_worker_keeps_serving(running_worker, settings: Settings, store: S3ObjectStore) -> None:
    b = settings.bucket
    store.put(b, "uploads/pans/broken.jpg", b"\x89PNG garbage", "image/jpeg")
    store.put(b, "uploads/pans/huge.jpg", jpeg_bytes(size=(8000, 6000)), "image/jpeg")
    store.put(b, "uploads/pans/ok.jpg", jpeg_bytes(), "image/jpeg")
    bad = {
        "malformed_event": {"product_id": "no-image", "category": "pans"},
        "unknown_category": {"product_id": "p1", "category": "shoes", "image": f"s3://{b}/uploads/pans/ok.jpg"},
        "image_source_not_allowed": {"product_id": "p2", "category": "pans", "image": "s3://elsewhere/x.jpg"},
        "object_missing": {"product_id": "p3", "category": "pans", "image": f"s3://{b}/uploads/pans/none.jpg"},
        "undecodable_image": {"product_id": "p4", "category": "pans", "image": f"s3://{b}/uploads/pans/broken.jpg"},
        "image_too_many_pixels": {"product_id": "p5", "category": "pans", "image": f"s3://{b}/uploads/pans/huge.jpg"},
    }
    for payload in bad.values():
        running_worker.send_task(EXTRACT_TASK, args=[payload])
    running_worker.send_task(EXTRACT_TASK, args=[], kwargs={"unexpected": "shape"})  # wrong call shape
    enqueue_upload(running_worker, product_id="ok", category="pans", image=f"s3://{b}/uploads/pans/ok.jpg")
    assert wait_for(lambda: _result(store, settings, "pans", "ok"), timeout=90)["product_id"] == "ok"
    letters = wait_for(lambda: len(d := _dead_letters(settings)) >= 7 and d, timeout=60)
    codes = sorted(letter["error_code"] for letter in letters)
    assert codes == sorted([*bad, "malformed_event"])
    for letter in letters:  # each has a full record in S3 with the reason
        bucket, key = letter["record"].removeprefix("s3://").split("/", 1)
        record = json.loads(store.get(bucket, key).body)
        assert record["error_code"] == letter["error_code"] and record["message"]
    assert store.list_keys(b, "results/pans/") == ["results/pans/ok.json"]


def test_same_event_twice_gives_one_identical_result(running_worker, settings: Settings, store: S3ObjectStore) -> None:
    store.put(settings.bucket, "uploads/pans/dup.jpg", jpeg_bytes((20, 20, 20)), "image/jpeg")
    event = UploadEvent(product_id="dup", category="pans", image=f"s3://{settings.bucket}/uploads/pans/dup.jpg")
    enqueue_event(running_worker, event)
    first = wait_for(lambda: _result(store, settings, "pans", "dup"))
    running_worker.send_task(EXTRACT_TASK, args=[event.model_dump(mode="json")])  # a redelivery
    client = redis.Redis.from_url(settings.broker_url, decode_responses=True)
    wait_for(lambda: client.xlen(settings.results_stream) >= 2)  # the second delivery was processed
    assert _result(store, settings, "pans", "dup") == first  # byte-for-byte the same content
    assert store.list_keys(settings.bucket, "results/pans/") == ["results/pans/dup.json"]


def test_message_for_an_unregistered_task_is_dead_lettered(running_worker, settings: Settings) -> None:
    running_worker.send_task("shelfsight.no_such_task", args=[{"product_id": "x"}], queue=settings.extract_queue)
    letters = wait_for(lambda: _dead_letters(settings), timeout=60)
    assert letters[0]["error_code"] == "malformed_event"
    assert "no_such_task" in letters[0]["message"]
