"""The relay unwraps every envelope S3, SNS, EventBridge and MinIO put around S3 records."""

from __future__ import annotations

import json

import pytest

from shelfsight.shared.enqueue import events_from_s3_notification
from shelfsight.shared.relay.envelopes import EnvelopeError, unwrap
from shelfsight.shared.settings import Settings
from tests.relay_fixtures import (
    eventbridge_event,
    minio_list_item,
    s3_notification,
    s3_record,
    s3_test_event,
    sns_envelope,
)

PATTERN = Settings().s3_notification_key_pattern


def test_s3_direct_records_are_returned_as_they_are() -> None:
    record = s3_record("shelfsight", "uploads/tops/p1.jpg", "A1")
    unwrapped = unwrap(json.dumps(s3_notification(record)).encode())
    assert (unwrapped.kind, unwrapped.records) == ("s3", [record])


def test_sns_message_is_unwrapped_to_the_s3_records_inside() -> None:
    record = s3_record("shelfsight", "uploads/tops/p1.jpg", "A1")
    unwrapped = unwrap(json.dumps(sns_envelope(s3_notification(record))))
    assert (unwrapped.kind, unwrapped.records) == ("sns", [record])


def test_eventbridge_object_created_gives_the_same_event_id_as_the_s3_record() -> None:
    """Same bucket, key and sequencer, whichever way S3 told us: one event id."""
    unwrapped = unwrap(eventbridge_event("shelfsight", "uploads/tops/p1.jpg", "0062A1"))
    assert unwrapped.kind == "eventbridge"
    via_eventbridge = events_from_s3_notification({"Records": unwrapped.records}, PATTERN)
    direct = events_from_s3_notification(
        s3_notification(s3_record("shelfsight", "uploads/tops/p1.jpg", "0062A1")), PATTERN)
    assert [e.event_id for e in via_eventbridge] == [e.event_id for e in direct]
    assert via_eventbridge[0].image == "s3://shelfsight/uploads/tops/p1.jpg"
    assert via_eventbridge[0].product_id == "p1" and via_eventbridge[0].category == "tops"


def test_eventbridge_events_other_than_object_created_hold_no_records() -> None:
    event = eventbridge_event("shelfsight", "uploads/tops/p1.jpg", "A1")
    event["detail-type"] = "Object Deleted"
    assert unwrap(event).records == []


@pytest.mark.parametrize("message", [s3_test_event(), sns_envelope(s3_test_event())])  # type: ignore[arg-type]
def test_s3_test_event_holds_no_records(message: dict) -> None:
    unwrapped = unwrap(message)
    assert (unwrapped.kind, unwrapped.records) == ("test_event", [])


def test_minio_access_format_list_item_yields_every_record() -> None:
    first = s3_record("shelfsight", "uploads/tops/p1.jpg", "A1")
    second = s3_record("shelfsight", "uploads/pans/p2.jpg", "A2")
    unwrapped = unwrap(minio_list_item(first, second))
    assert unwrapped.kind == "minio"
    assert [r["s3"]["object"]["key"] for r in unwrapped.records] == ["uploads/tops/p1.jpg", "uploads/pans/p2.jpg"]
    assert unwrapped.records[0]["eventName"] == "s3:ObjectCreated:Put"


@pytest.mark.parametrize("body", [b"\xff\xfe not utf-8", b"{not json", b"42", b'{"hello": "world"}',
                                  b'[{"no": "Event"}]'])
def test_unusable_notifications_raise(body: bytes) -> None:
    with pytest.raises(EnvelopeError):
        unwrap(body)
