"""Storage notifications as they arrive, unwrapped into plain S3 event records.

One relay accepts every envelope an object store or AWS puts around an S3 event record:

- S3 direct (to SQS, or MinIO's webhook target): `{"Records": [...]}`;
- SNS (to SQS, raw delivery off): `{"Type": "Notification", "Message": "<S3 JSON>"}`;
- EventBridge (to SQS): `{"source": "aws.s3", "detail-type": "Object Created", "detail": {...}}`;
- MinIO's Redis-list target (format `access`): `[{"Event": [...], "EventTime": "..."}]`;
- S3's `s3:TestEvent`, sent when a notification is configured: nothing to do.

Unwrapping says nothing about whether a record is usable: each record is validated on its own
later (shelfsight.shared.relay.core), so one bad record cannot hide its neighbours.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any


class EnvelopeError(ValueError):
    """The notification as a whole is unusable: not JSON, or no envelope this relay knows."""


@dataclass
class Unwrapped:
    """What one notification holds: its envelope kind and its S3 records (possibly none)."""

    kind: str  # "s3" | "sns" | "eventbridge" | "minio" | "test_event" | "ignored"
    records: list[Any] = field(default_factory=list)


def parse_json(body: bytes | str) -> Any:
    """The notification's JSON; EnvelopeError if it is not UTF-8 JSON."""
    try:
        text = body.decode("utf-8") if isinstance(body, bytes) else body
        return json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EnvelopeError(f"notification is not UTF-8 JSON: {exc}") from exc


def unwrap(message: Any) -> Unwrapped:
    """The S3 records inside one notification (a parsed JSON value, or its text)."""
    if isinstance(message, bytes | str):
        message = parse_json(message)
    if isinstance(message, list):  # MinIO Redis target, `access` format: a list of entries
        return Unwrapped("minio", [r for entry in message for r in _minio_entry(entry)])
    if not isinstance(message, dict):
        raise EnvelopeError(f"notification is a JSON {type(message).__name__}, not an object or list")
    if message.get("Event") == "s3:TestEvent":
        return Unwrapped("test_event")
    if message.get("Type") == "Notification" and "Message" in message:
        inner = unwrap(message["Message"])
        return Unwrapped("sns" if inner.kind == "s3" else inner.kind, inner.records)
    if message.get("source") == "aws.s3" and isinstance(message.get("detail"), dict):
        return _eventbridge(message)
    if isinstance(message.get("Event"), list):  # one MinIO entry on its own
        return Unwrapped("minio", _minio_entry(message))
    records = message.get("Records")
    if isinstance(records, list):
        return Unwrapped("s3", records)
    raise EnvelopeError("not a storage notification: no Records, SNS, EventBridge or MinIO envelope")


def _minio_entry(entry: Any) -> list[Any]:
    if not isinstance(entry, dict) or not isinstance(entry.get("Event"), list):
        raise EnvelopeError("MinIO entry without an 'Event' list")
    return list(entry["Event"])


def _eventbridge(message: dict[str, Any]) -> Unwrapped:
    """An EventBridge S3 event as the S3 record it stands for (only 'Object Created' counts)."""
    if message.get("detail-type") != "Object Created":
        return Unwrapped("ignored")
    detail = message["detail"]
    obj = detail.get("object") if isinstance(detail.get("object"), dict) else {}
    record: dict[str, Any] = {
        "eventSource": "aws:s3",
        "eventName": f"ObjectCreated:{detail.get('reason') or 'Put'}",
        "s3": {
            "bucket": {"name": (detail.get("bucket") or {}).get("name")},
            # EventBridge keys are URL-encoded like S3 notification keys; the same decoding applies.
            "object": {"key": obj.get("key"), "sequencer": obj.get("sequencer"), "eTag": obj.get("etag"),
                       "size": obj.get("size")},
        },
    }
    if message.get("time"):
        record["eventTime"] = message["time"]
    return Unwrapped("eventbridge", [record])
