"""A result's Redis traffic on a real redis-server: the stream entry and the delivery's outcome
go in one round trip, and when that round trip fails, both still happen (each on its own); the
dead-letter check before each write is one round trip per micro-batch."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import redis

from shelfsight.shared.registry import ModelRegistry
from shelfsight.shared.settings import Settings
from shelfsight.shared.storage import InMemoryObjectStore
from shelfsight.shared.streams import RedisStreamPublisher, redis_client
from shelfsight.shared.taxonomy import load_taxonomy
from shelfsight.worker.delivery import RedisDeliveryTracker, delivery_key
from shelfsight.worker.extractor import ExtractionService
from shelfsight.worker.model_cache import ModelCache
from tests.helpers import RecordingRedis, jpeg_bytes


@pytest.fixture
def service(settings: Settings) -> Iterator[tuple[ExtractionService, RecordingRedis]]:
    settings = settings.model_copy(update={"model_arch": "shelfsight-tiny", "model_weights": "none", "device": "cpu",
                                           "batch_size": 1, "batch_max_wait_ms": 1})
    client = RecordingRedis(connection_pool=redis_client(settings).connection_pool)
    store = InMemoryObjectStore()
    store.put(settings.bucket, "uploads/pans/a.jpg", jpeg_bytes(), "image/jpeg")
    taxonomy = load_taxonomy(settings.taxonomy_path)
    svc = ExtractionService(settings, taxonomy, store, RedisStreamPublisher(client, settings.stream_maxlen),
                            ModelCache(settings, taxonomy, store, ModelRegistry(store, settings.bucket)),
                            deliveries=RedisDeliveryTracker(client, settings.delivery_tracking_ttl_s))
    yield svc, client
    svc.close()


def _event(event_id: str, settings: Settings) -> dict[str, str]:
    return {"event_id": event_id, "product_id": "sku-1", "category": "pans",
            "image": f"s3://{settings.bucket}/uploads/pans/a.jpg"}


def test_a_result_costs_three_round_trips_the_last_carrying_entry_and_outcome(
        service: tuple[ExtractionService, RecordingRedis], settings: Settings) -> None:
    svc, client = service
    svc.models.get("pans")  # loaded before counting
    client.trips.clear()
    outcome = svc.process(_event("ev-1", settings))
    assert outcome.status == "result"
    # begin, the batch's dead-letter check before the write, then one pipeline: the results and
    # review entries (a zero-shot model's result needs review) and the outcome
    assert client.sent == [("EVAL",), ("HGET",), ("XADD", "XADD", "EVAL")]
    assert client.hget(delivery_key("ev-1"), "done") == b"result"
    assert client.hget(delivery_key("ev-1"), "n") is None  # the delivery ended
    assert [e[1][b"event_id"] for e in client.xrange(settings.results_stream)] == [b"ev-1"]


def test_when_that_round_trip_fails_the_entry_and_the_outcome_are_still_recorded(
        service: tuple[ExtractionService, RecordingRedis], settings: Settings,
        monkeypatch: pytest.MonkeyPatch) -> None:
    svc, client = service
    svc.models.get("pans")
    real = RedisStreamPublisher.publish_many

    def fails_with_more(self: RedisStreamPublisher, entries: Any, then: Any = None) -> list[str]:
        if then is not None:
            raise redis.ConnectionError("connection reset by peer")
        return real(self, entries)

    monkeypatch.setattr(RedisStreamPublisher, "publish_many", fails_with_more)
    client.trips.clear()
    assert svc.process(_event("ev-2", settings)).status == "result"
    # each entry on its own (no second pipeline), then the outcome
    assert client.sent[-3:] == [("XADD",), ("XADD",), ("EVAL",)]
    assert client.hget(delivery_key("ev-2"), "done") == b"result"
    assert [e[1][b"event_id"] for e in client.xrange(settings.results_stream)] == [b"ev-2"]
    # and a redelivered copy of it is now acked without rework
    assert svc.process(_event("ev-2", settings), fresh=False).status == "duplicate"


def test_the_dead_letter_check_is_one_round_trip_per_batch_and_still_stops_a_second_outcome(
        service: tuple[ExtractionService, RecordingRedis], settings: Settings) -> None:
    """Four events scored in one batch of 4: one pipeline of four HGETs before their writes. One
    of them has already ended as a dead letter (another copy of it did): no result for it."""
    from concurrent.futures import ThreadPoolExecutor

    from shelfsight.worker.batcher import MicroBatcher

    svc, client = service

    def run_batch(category: str, items: list) -> list:
        svc.deliveries.finish("ev-dead", "dead_letter")  # another copy of it ended meanwhile
        return svc._run_batch(category, items)

    svc.batcher.close()
    svc.batcher = MicroBatcher(run_batch, 4, 30.0)  # waits for all 4: one batch
    svc.models.get("pans")
    client.trips.clear()
    with ThreadPoolExecutor(4) as pool:
        outcomes = list(pool.map(lambda i: svc.process(_event(f"ev-{i}", settings) | {"product_id": f"sku-{i}"},
                                                       fresh=False),
                                 ["a", "b", "c", "dead"]))
    assert [o.status for o in outcomes] == ["result", "result", "result", "duplicate"]
    checks = [sent for sent in client.sent if "HGET" in sent]  # (the test's own finish is an EVAL)
    assert checks == [("HGET",) * 4]  # one round trip for the batch, not four
    assert not svc.store.exists(settings.bucket, "results/pans/sku-dead.json")
