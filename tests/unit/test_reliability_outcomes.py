"""Issue 8, the service's side: an event ends as a durable outcome or its message is not acked.

The real ExtractionService over in-memory fakes whose failures are injected: S3 refusing every
write, a results stream that is down, a worker that died mid-event (the delivery counter), a
redelivered copy of a finished event, an older upload of a product.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from prometheus_client import REGISTRY

from shelfsight.shared.registry import ModelRegistry
from shelfsight.shared.settings import Settings
from shelfsight.shared.storage import AccessDenied, InMemoryObjectStore, TransientStorageError
from shelfsight.shared.streams import InMemoryPublisher
from shelfsight.shared.taxonomy import load_taxonomy
from shelfsight.worker.delivery import InMemoryDeliveryTracker, backoff_delay
from shelfsight.worker.extractor import ExtractionService
from shelfsight.worker.model_cache import ModelCache
from tests.helpers import jpeg_bytes

BUCKET = "shelfsight"


class DenyingStore(InMemoryObjectStore):
    """S3 with the worker's credentials revoked for writes (or for everything), switchable."""

    def __init__(self) -> None:
        super().__init__()
        self.deny_puts = False
        self.deny_gets = False

    def put(self, bucket, key, body, content_type="application/json", *, if_none_match=False, if_match=None):
        if self.deny_puts:
            raise AccessDenied(f"s3://{bucket}/{key}: access denied (AccessDenied)")
        return super().put(bucket, key, body, content_type, if_none_match=if_none_match, if_match=if_match)

    def get(self, bucket, key, max_bytes=None):
        if self.deny_gets and key.startswith("uploads/"):
            raise AccessDenied(f"s3://{bucket}/{key}: access denied (AccessDenied)")
        return super().get(bucket, key, max_bytes)


class DownPublisher(InMemoryPublisher):
    """A Redis stream that refuses XADD (Redis restarting), switchable."""

    def __init__(self) -> None:
        super().__init__()
        self.down = False
        self.refused = 0

    def publish(self, stream, fields):
        if self.down:
            self.refused += 1
            raise ConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")
        return super().publish(stream, fields)


@pytest.fixture
def settings() -> Settings:
    return Settings(
        bucket=BUCKET, allowed_image_buckets=[BUCKET], model_arch="shelfsight-tiny", model_weights="none",
        device="cpu", batch_size=4, batch_max_wait_ms=5, max_retries=2, retry_backoff_s=0.5, poison_max_deliveries=3,
    )


@pytest.fixture
def parts(settings: Settings) -> Iterator[tuple[ExtractionService, DenyingStore, DownPublisher, InMemoryDeliveryTracker]]:
    store, publisher, deliveries = DenyingStore(), DownPublisher(), InMemoryDeliveryTracker()
    taxonomy = load_taxonomy(settings.taxonomy_path)
    service = ExtractionService(settings, taxonomy, store, publisher,
                                ModelCache(settings, taxonomy, store, ModelRegistry(store, BUCKET)),
                                deliveries=deliveries)
    store.put(BUCKET, "uploads/pans/a.jpg", jpeg_bytes(), "image/jpeg")
    yield service, store, publisher, deliveries
    service.close()


def _event(event_id: str, product_id: str = "sku-1", **extra: object) -> dict:
    return {"event_id": event_id, "product_id": product_id, "category": "pans",
            "image": f"s3://{BUCKET}/uploads/pans/a.jpg", **extra}


def _metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def _dead_letters(store: InMemoryObjectStore) -> list[dict]:
    return [json.loads(store.get(BUCKET, k).body) for k in store.list_keys(BUCKET, "dead-letters/")]


def test_a_dead_letter_that_cannot_be_written_leaves_the_message_for_redelivery(parts) -> None:
    service, store, _, _ = parts
    store.deny_puts = True  # credentials revoked: nothing can be recorded
    before = _metric("shelfsight_outcome_write_failures_total", kind="dead_letter")
    bad = service.process({"event_id": "bad-1", "product_id": "x", "category": "no-such-category",
                           "image": f"s3://{BUCKET}/uploads/pans/a.jpg"})
    # old code: the PUT's exception escaped process() and Celery acked the message: nothing anywhere
    assert bad.status == "requeue" and bad.retry_in is not None and bad.retry_in > 0
    assert _metric("shelfsight_outcome_write_failures_total", kind="dead_letter") == before + 1
    store.deny_puts = False
    again = service.process({"event_id": "bad-1", "product_id": "x", "category": "no-such-category",
                             "image": f"s3://{BUCKET}/uploads/pans/a.jpg"}, attempt=2, fresh=False)
    assert again.status == "dead_letter" and [d["error_code"] for d in _dead_letters(store)] == ["unknown_category"]


def test_denied_credentials_retry_then_requeue_instead_of_emptying_the_queue(parts, settings: Settings) -> None:
    service, store, _, _ = parts
    store.deny_gets = store.deny_puts = True
    first = service.process(_event("e-1"))
    assert first.status == "retry"  # a 403 on an allowed source is the service's access, not the event
    last = service.process(_event("e-1"), attempt=settings.max_retries + 1, fresh=False)
    assert last.status == "requeue"  # transient_exhausted could not be written either: not acked
    assert not store.list_keys(BUCKET, "dead-letters/") and not store.list_keys(BUCKET, "results/")
    store.deny_gets = store.deny_puts = False
    done = service.process(_event("e-1"), attempt=settings.max_retries + 2, fresh=False)
    assert done.status == "result" and store.exists(BUCKET, "results/pans/sku-1.json")


def test_a_stream_outage_after_the_result_is_written_is_no_dead_letter(parts) -> None:
    service, store, publisher, _ = parts
    publisher.down = True
    before = _metric("shelfsight_stream_publish_failures_total", stream="results")
    outcome = service.process(_event("e-2"))
    # old code: the XADD error became an internal_error dead letter for an event whose result exists
    assert outcome.status == "result"
    assert store.exists(BUCKET, "results/pans/sku-1.json") and not _dead_letters(store)
    assert publisher.refused >= 2  # it was retried before giving up
    assert _metric("shelfsight_stream_publish_failures_total", stream="results") == before + 1


def test_an_event_whose_worker_died_each_time_is_dead_lettered_as_poison(parts, settings: Settings) -> None:
    service, store, _, deliveries = parts
    for _ in range(settings.poison_max_deliveries):  # three workers OOM-killed mid-event: never released
        deliveries.begin("e-3", fresh=False)
    outcome = service.process(_event("e-3"), fresh=False)
    assert outcome.status == "dead_letter" and outcome.detail["error_code"] == "poison"
    assert "never finished" in outcome.detail["message"]
    assert not store.exists(BUCKET, "results/pans/sku-1.json")  # it was not handed to the model again


def test_retries_and_requeues_release_their_delivery_so_they_never_count_as_poison(parts, settings: Settings) -> None:
    service, store, _, deliveries = parts
    store.deny_gets = True
    for attempt in range(1, settings.poison_max_deliveries + 3):  # more survived deliveries than the limit
        assert service.process(_event("e-4"), attempt=1, fresh=attempt == 1).status == "retry"
    assert deliveries.deliveries.get("e-4", 0) == 0
    store.deny_gets = False
    assert service.process(_event("e-4"), fresh=False).status == "result"


def test_a_redelivered_copy_of_a_finished_event_is_acked_without_rework(parts) -> None:
    service, store, _, _ = parts
    assert service.process(_event("e-5")).status == "result"
    puts = store.puts
    copy = service.process(_event("e-5"), fresh=False)  # visibility timeout, a lost ack, a late retry
    assert copy.status == "duplicate" and copy.detail["finished_as"] == "result" and store.puts == puts
    again = service.process(_event("e-5"), fresh=True)  # a deliberate re-enqueue is worked again
    assert again.status == "result"


def test_one_outcome_per_event_a_late_copy_never_dead_letters_a_finished_event(parts, settings: Settings,
                                                                               monkeypatch) -> None:
    from shelfsight.worker.delivery import Delivery

    service, store, _, deliveries = parts
    assert service.process(_event("e-6")).status == "result"
    # a concurrent copy (restored after a visibility timeout) started before the first one finished,
    # so its begin() saw no outcome; it then exhausted its retries against a failing S3
    monkeypatch.setattr(deliveries, "begin", lambda event_id, fresh=False: Delivery(1))
    store.deny_gets = True
    late = service.process(_event("e-6"), attempt=settings.max_retries + 1, fresh=False)
    assert late.status == "duplicate" and late.detail["finished_as"] == "result"
    assert not _dead_letters(store)  # never both a result and a dead letter


def test_a_superseded_event_is_a_recorded_outcome(parts) -> None:
    service, store, publisher, _ = parts
    now = datetime.now(UTC)
    assert service.process(_event("newer", submitted_at=now.isoformat())).status == "result"
    before = _metric("shelfsight_events_total", outcome="superseded", category="pans")
    older = service.process(_event("older", submitted_at=(now - timedelta(hours=1)).isoformat()))
    assert older.status == "superseded"
    # old code: nothing but a log line; now a record in S3, a stream entry and a metric
    [key] = store.list_keys(BUCKET, "results/_superseded/")
    record = json.loads(store.get(BUCKET, key).body)
    assert (record["event_id"], record["superseded_by"]) == ("older", "newer")
    assert record["submitted_at"].endswith("Z") or record["submitted_at"].endswith("+00:00")
    entries = [f for s, f in publisher.entries if s == "shelfsight:results" and f.get("status") == "superseded"]
    assert [e["event_id"] for e in entries] == ["older"]
    assert _metric("shelfsight_events_total", outcome="superseded", category="pans") == before + 1


def test_naive_and_aware_timestamps_compare_as_utc_everywhere(parts) -> None:
    service, store, _, _ = parts
    aware = datetime(2026, 11, 27, 10, 0, tzinfo=UTC)
    assert service.process(_event("aware", submitted_at=aware.isoformat())).status == "result"
    # a re-enqueue written by a producer without a timezone: taken as UTC, compared, never a TypeError
    naive = service.process(_event("naive", submitted_at="2026-11-27T09:00:00"))
    assert naive.status == "superseded"
    assert not _dead_letters(store)


def test_backoff_is_capped_jittered_and_below_half_the_visibility_timeout(settings: Settings) -> None:
    import random

    rng = random.Random(0)
    capped = settings.model_copy(update={"retry_backoff_s": 1.0, "retry_backoff_max_s": 60.0, "visibility_timeout_s": 40})
    delays = [backoff_delay(capped, attempt, rng) for attempt in range(1, 30)]
    assert all(0 < d <= 20.0 for d in delays)  # half the visibility timeout: a due retry is never "lost"
    assert 0.5 <= delays[0] <= 1.0 and max(delays) > 10
    assert len(set(delays)) > 20  # jittered: a burst of failures does not come back in lockstep


def test_transient_errors_still_end_as_transient_exhausted_when_storage_works(parts, settings: Settings) -> None:
    service, store, _, _ = parts

    class Flaky(DenyingStore):
        def get(self, bucket, key, max_bytes=None):
            if key.startswith("uploads/"):
                raise TransientStorageError("503")
            return super().get(bucket, key, max_bytes)

    service.store = Flaky()
    service.dead_letters.store = store
    outcome = service.process(_event("e-7"), attempt=settings.max_retries + 1)
    assert outcome.status == "dead_letter" and outcome.detail["error_code"] == "transient_exhausted"
