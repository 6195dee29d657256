"""Relay.handle: per-record validation, dead letters, redelivery, and nothing acked on failure."""

from __future__ import annotations

import json
from typing import Any

import pytest

from shelfsight.shared.events import DeadLetter, UploadEvent
from shelfsight.shared.relay import metrics
from shelfsight.shared.relay.core import Relay, RelayUnavailable
from shelfsight.shared.relay.dead_letters import RelayDeadLetters
from shelfsight.shared.settings import Settings
from shelfsight.shared.storage import InMemoryObjectStore
from shelfsight.shared.streams import InMemoryPublisher
from tests.relay_fixtures import s3_notification, s3_record, s3_test_event, sns_envelope


class Harness:
    """A Relay over an in-memory store and stream, with an enqueue that can be made to fail."""

    def __init__(self, max_bytes: int = 1 << 20) -> None:
        self.settings = Settings(bucket="results")
        self.store = InMemoryObjectStore()
        self.publisher = InMemoryPublisher()
        self.enqueued: list[UploadEvent] = []
        self.fail_after: int | None = None
        self.relay = Relay(self._enqueue, RelayDeadLetters(self.settings, self.store, self.publisher),
                           self.settings.s3_notification_key_pattern, max_bytes)

    def _enqueue(self, event: UploadEvent) -> str:
        if self.fail_after is not None and len(self.enqueued) >= self.fail_after:
            raise ConnectionError("broker down")
        self.enqueued.append(event)
        return event.event_id

    def dead_letters(self) -> list[DeadLetter]:
        keys = self.store.list_keys("results", "dead-letters/")
        return [DeadLetter.model_validate_json(self.store.get("results", k).body) for k in keys]


def _count(counter: Any, **labels: str) -> float:
    return float(counter.labels(**labels)._value.get())


def test_good_records_are_enqueued_beside_a_bad_one_which_is_dead_lettered() -> None:
    h = Harness()
    body = json.dumps(s3_notification(
        s3_record("uploads", "tops/p1.jpg", "01"),
        s3_record("uploads", "no-category.jpg", "02"),           # key does not match the pattern
        s3_record("uploads", "pans/p3.jpg", "03"),
    ))
    before = _count(metrics.RECORDS, source="sqs", outcome="dead_letter")
    handled = h.relay.handle(body, "sqs")
    assert [e.product_id for e in h.enqueued] == ["p1", "p3"]
    assert handled.event_ids == [e.event_id for e in h.enqueued]
    [letter] = h.dead_letters()
    assert letter.error_code == "malformed_event" and "record 2" in letter.message
    assert letter.event["s3"]["object"]["key"] == "no-category.jpg"  # the record as received
    [(stream, fields)] = h.publisher.entries
    assert stream == h.settings.dead_letter_stream and fields["record"] == handled.dead_letters[0]
    assert _count(metrics.RECORDS, source="sqs", outcome="dead_letter") == before + 1


def test_a_record_with_an_invalid_product_id_is_dead_lettered_alone() -> None:
    h = Harness()
    handled = h.relay.handle(json.dumps(s3_notification(
        s3_record("uploads", "tops/bad$id.jpg", "01"), s3_record("uploads", "tops/p2.jpg", "02"))), "sqs")
    assert [e.product_id for e in h.enqueued] == ["p2"]
    assert len(handled.dead_letters) == 1 and "product_id" in h.dead_letters()[0].message


def test_redelivered_notification_enqueues_the_same_event_ids_and_dead_letter_ids() -> None:
    h = Harness()
    body = json.dumps(sns_envelope(s3_notification(
        s3_record("uploads", "tops/p1.jpg", "01"), s3_record("uploads", "bad.jpg", "02"))))
    first = h.relay.handle(body, "sqs")
    second = h.relay.handle(body, "sqs")
    assert first.event_ids == second.event_ids and len(first.event_ids) == 1
    assert first.dead_letters == second.dead_letters  # same S3 key: one record, written twice


def test_test_events_and_non_created_records_are_skipped_without_dead_letters() -> None:
    h = Harness()
    assert h.relay.handle(json.dumps(s3_test_event()), "sqs").outcome == "skipped"
    removed = h.relay.handle(json.dumps(s3_notification(
        s3_record("uploads", "tops/p1.jpg", "01", name="ObjectRemoved:Delete"))), "sqs")
    assert removed.skipped == 1 and removed.outcome == "skipped"
    assert h.enqueued == [] and h.dead_letters() == []


@pytest.mark.parametrize("body", [b"{broken json", b'{"unrelated": 1}'])
def test_an_unusable_notification_becomes_one_dead_letter(body: bytes) -> None:
    h = Harness()
    handled = h.relay.handle(body, "redis_list")
    assert handled.outcome == "dead_letter" and h.enqueued == []
    [letter] = h.dead_letters()
    assert letter.error_code == "malformed_event" and letter.worker.startswith("relay@")


def test_an_oversized_notification_is_dead_lettered_as_too_large() -> None:
    h = Harness(max_bytes=200)
    handled = h.relay.handle(json.dumps(s3_notification(*[s3_record("uploads", f"tops/p{i}.jpg", str(i))
                                                          for i in range(5)])), "webhook")
    assert handled.outcome == "dead_letter" and h.enqueued == []
    assert h.dead_letters()[0].error_code == "event_too_large"


def test_enqueue_failure_raises_so_the_source_keeps_the_notification() -> None:
    h = Harness()
    h.fail_after = 1
    before = _count(metrics.NOTIFICATIONS, source="sqs", outcome="failed")
    body = json.dumps(s3_notification(s3_record("uploads", "tops/p1.jpg", "01"),
                                      s3_record("uploads", "tops/p2.jpg", "02")))
    with pytest.raises(RelayUnavailable):
        h.relay.handle(body, "sqs")
    assert _count(metrics.NOTIFICATIONS, source="sqs", outcome="failed") == before + 1
    h.fail_after = None  # the broker is back: the retry enqueues both, p1 again with its first id
    first_id = h.enqueued[0].event_id
    handled = h.relay.handle(body, "sqs")
    assert handled.event_ids[0] == first_id and len(handled.event_ids) == 2


def test_dead_letter_store_failure_also_keeps_the_notification() -> None:
    h = Harness()

    def broken_put(*_: Any, **__: Any) -> str:
        raise OSError("S3 down")

    h.store.put = broken_put  # type: ignore[method-assign]
    with pytest.raises(RelayUnavailable):
        h.relay.handle(b"{broken", "sqs")
