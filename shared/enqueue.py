"""Enqueueing upload events: the Python API and S3 ObjectCreated notifications."""

from __future__ import annotations

import re
import time
from datetime import datetime
from typing import Any
from urllib.parse import unquote_plus

from celery import Celery

from shelfsight.shared.celery_app import EXTRACT_TASK
from shelfsight.shared.events import UploadEvent

# Message header with the enqueue time (Unix seconds): kombu puts no timestamp on a Redis
# message, and the queue's oldest-message age (shelfsight.shared.observability) needs one.
ENQUEUED_AT_HEADER = "shelfsight_enqueued_at"


def enqueue_event(app: Celery, event: UploadEvent, *, queue: str | None = None) -> str:
    """Send a validated event to the extract queue (or `queue`, e.g. the backfill queue). The
    Celery task id is the event id.

    `ignore_result`: extraction stores no Celery result (its outcome is the S3 result file and
    the results stream), so the producer does not subscribe to a result channel per message, as
    Celery otherwise does for a Redis result backend (a SUBSCRIBE and an UNSUBSCRIBE per enqueue).
    """
    payload = event.model_dump(mode="json")
    routing = {"queue": queue} if queue else {}
    app.send_task(EXTRACT_TASK, args=[payload], task_id=event.event_id, ignore_result=True,
                  headers={ENQUEUED_AT_HEADER: time.time()}, **routing)
    return event.event_id


def enqueue_upload(
    app: Celery,
    *,
    product_id: str,
    category: str,
    image: str,
    event_id: str | None = None,
    submitted_at: datetime | None = None,
) -> str:
    """Validate and enqueue an upload event; returns its event id.

    Raises pydantic.ValidationError for a bad product id or image URI, so callers learn at
    once rather than through a dead letter.
    """
    fields: dict[str, Any] = {"product_id": product_id, "category": category, "image": image}
    if event_id:
        fields["event_id"] = event_id
    if submitted_at:
        fields["submitted_at"] = submitted_at
    return enqueue_event(app, UploadEvent(**fields))


class NotificationError(ValueError):
    """An S3 notification record that cannot become an upload event."""


def events_from_s3_notification(notification: dict[str, Any], key_pattern: str) -> list[UploadEvent]:
    """Upload events for each ObjectCreated record of an S3 (or MinIO) notification.

    The object key is matched against `key_pattern`, whose named groups `category` and
    `product_id` say which product the image shows. The event id is derived from the
    bucket, key and sequencer, so a notification delivered twice enqueues the same event id.
    """
    records = notification.get("Records")
    if not isinstance(records, list):
        raise NotificationError("not an S3 notification: no 'Records' list")
    pattern = re.compile(key_pattern)
    events = []
    for number, record in enumerate(records, start=1):
        name = str(record.get("eventName", ""))
        if not name.startswith(("ObjectCreated:", "s3:ObjectCreated:")):
            continue
        try:
            bucket = record["s3"]["bucket"]["name"]
            key = unquote_plus(record["s3"]["object"]["key"])
        except (KeyError, TypeError) as exc:
            raise NotificationError(f"record {number}: missing s3.bucket.name or s3.object.key") from exc
        match = pattern.match(key)
        if not match:
            raise NotificationError(
                f"record {number}: key {key!r} does not match the pattern {key_pattern!r} "
                "(set SHELFSIGHT_S3_NOTIFICATION_KEY_PATTERN)"
            )
        sequencer = str(record["s3"]["object"].get("sequencer") or record["s3"]["object"].get("eTag") or "")
        event_id = _notification_event_id(bucket, key, sequencer)
        fields: dict[str, Any] = {
            "event_id": event_id, "product_id": match["product_id"], "category": match["category"],
            "image": f"s3://{bucket}/{key}",
        }
        if record.get("eventTime"):
            fields["submitted_at"] = record["eventTime"]
        events.append(UploadEvent(**fields))
    return events


def _notification_event_id(bucket: str, key: str, sequencer: str) -> str:
    import hashlib

    return "s3-" + hashlib.sha256(f"{bucket}/{key}@{sequencer}".encode()).hexdigest()[:32]
