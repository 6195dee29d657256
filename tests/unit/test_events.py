"""Event, result and label schemas; key derivation; S3 notifications."""

import json
from datetime import UTC, datetime, timedelta

import pytest
from pydantic import ValidationError

from shelfsight.shared.enqueue import NotificationError, events_from_s3_notification
from shelfsight.shared.events import (
    LabelRecord,
    UploadEvent,
    dead_letter_key,
    parse_s3_uri,
    result_key,
)
from shelfsight.shared.settings import Settings
from shelfsight.shared.taxonomy import load_taxonomy


def test_upload_event_validates_and_defaults() -> None:
    event = UploadEvent(product_id="sku-1", category="tops", image="s3://uploads/tops/sku-1.jpg")
    assert len(event.event_id) == 32 and event.schema_version == 1
    again = UploadEvent.model_validate_json(event.model_dump_json())
    assert again == event


@pytest.mark.parametrize(
    "fields",
    [
        {"product_id": "sku 1", "category": "tops", "image": "s3://b1/k"},  # space in id
        {"product_id": "sku-1", "category": "tops", "image": "https://x/y.jpg"},  # not s3
        {"product_id": "sku-1", "category": "tops", "image": "s3://bucket/"},  # no key
        {"product_id": "sku-1", "image": "s3://bucket/k"},  # no category
        {"product_id": "sku-1", "category": "tops", "image": "s3://bucket/k", "extra": 1},
        {"product_id": "sku-1", "category": "tops", "image": "s3://bucket/k", "schema_version": 2},
    ],
)
def test_upload_event_rejects_bad_fields(fields: dict) -> None:
    with pytest.raises(ValidationError):
        UploadEvent(**fields)


def test_parse_s3_uri() -> None:
    assert parse_s3_uri("s3://my-bucket/a/b c.jpg") == ("my-bucket", "a/b c.jpg")
    with pytest.raises(ValueError):
        parse_s3_uri("s3:/bucket/key")


def test_result_and_dead_letter_keys_are_deterministic() -> None:
    assert result_key("results/", "tops", "sku-1") == "results/tops/sku-1.json"
    late = datetime(2026, 11, 27, 23, 59, 59, tzinfo=UTC)
    assert dead_letter_key("dead-letters/", late, "e1") == "dead-letters/2026-11-27/e1.json"
    # grouped by the day it failed: one second later is the next day's folder
    assert dead_letter_key("dead-letters", late + timedelta(seconds=1), "e1") == "dead-letters/2026-11-28/e1.json"


def test_example_taxonomy_has_the_two_sample_categories() -> None:
    taxonomy = load_taxonomy(Settings().taxonomy_path)
    tops = taxonomy.category("tops")
    assert tops.attributes["sleeve_length"].value_names == ["Longsleeved", "Shortsleeved", "Sleeveless"]
    assert tops.attributes["sleeve_length"].captions() == ["Longsleeved", "Shortsleeved", "Sleeveless"]
    assert "neckline" in tops.attributes and "main_colour" in tops.attributes
    pans = taxonomy.category("pans")
    assert set(pans.attributes) == {"lid", "handle"}
    assert pans.attributes["lid"].captions("a pan, {}") == ["a pan, with lid", "a pan, without lid"]
    with pytest.raises(KeyError, match="unknown category 'shoes'"):
        taxonomy.category("shoes")
    with pytest.raises(ValueError, match="unknown value 'maybe'"):
        taxonomy.check_labels("pans", {"lid": "maybe"})


def test_label_record_requires_attributes() -> None:
    with pytest.raises(ValidationError):
        LabelRecord(product_id="p", category="pans", image="s3://bucket/k", attributes={})


def _notification(key: str, event_name: str = "ObjectCreated:Put") -> dict:
    return {"Records": [{
        "eventName": event_name, "eventTime": "2026-11-27T10:00:00.000Z",
        "s3": {"bucket": {"name": "uploads"}, "object": {"key": key, "sequencer": "0055AED6DCD90281E5"}},
    }]}


def test_s3_notification_maps_key_to_product_and_category() -> None:
    pattern = Settings().s3_notification_key_pattern
    events = events_from_s3_notification(_notification("incoming/tops/sku-42.jpg"), pattern)
    assert [(e.product_id, e.category, e.image) for e in events] == [("sku-42", "tops", "s3://uploads/incoming/tops/sku-42.jpg")]
    # the same notification twice gives the same event id: redelivery is idempotent
    assert events_from_s3_notification(_notification("incoming/tops/sku-42.jpg"), pattern)[0].event_id == events[0].event_id
    assert events_from_s3_notification(_notification("incoming/tops/sku-42.jpg", "ObjectRemoved:Delete"), pattern) == []


def test_s3_notification_keys_are_form_decoded() -> None:
    """S3 sends object keys form-encoded: %2B is a literal '+', '+' is a space, %3A is ':'."""
    pattern = Settings().s3_notification_key_pattern
    [event] = events_from_s3_notification(_notification("drop%2Bzone/new+uploads/pans/p%3A1.jpg"), pattern)
    assert (event.category, event.product_id) == ("pans", "p:1")
    assert event.image == "s3://uploads/drop+zone/new uploads/pans/p:1.jpg"


def test_s3_notification_with_unmatched_key_says_which_pattern() -> None:
    with pytest.raises(NotificationError, match="does not match the pattern"):
        events_from_s3_notification(_notification("no-category.jpg"), Settings().s3_notification_key_pattern)
    with pytest.raises(NotificationError):
        events_from_s3_notification(json.loads('{"foo": 1}'), ".*")
