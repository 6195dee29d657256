"""Dead letters: the record of why an event produced no result, in S3 and on a Redis Stream."""

from __future__ import annotations

import hashlib
import json
import socket
from typing import Any

import structlog

from shelfsight.shared.events import DeadLetter, ErrorCode, UploadEvent, dead_letter_key
from shelfsight.shared.settings import Settings
from shelfsight.shared.storage import ObjectStore
from shelfsight.shared.streams import EventPublisher
from shelfsight.worker import metrics

log = structlog.get_logger()


class DeadLetterWriter:
    """Writes `dead-letters/<day>/<event_id>.json` and an entry on the dead-letter stream."""

    def __init__(self, settings: Settings, store: ObjectStore, publisher: EventPublisher) -> None:
        self.settings = settings
        self.store = store
        self.publisher = publisher
        self.worker_name = socket.gethostname()

    def record(
        self, raw: Any, event: UploadEvent | None, code: ErrorCode, message: str, attempt: int
    ) -> str:
        """Record a dead letter for `raw` (the payload as received); returns its S3 key."""
        event_id = event.event_id if event else payload_id(raw)
        letter = DeadLetter(
            event_id=event_id,
            product_id=event.product_id if event else _field(raw, "product_id"),
            category=event.category if event else _field(raw, "category"),
            error_code=code,
            message=message,
            attempts=attempt,
            event=_truncate(raw, self.settings.max_event_bytes),
            worker=self.worker_name,
        )
        key = dead_letter_key(self.settings.dead_letter_prefix, letter.failed_at, event_id)
        self.store.put(self.settings.bucket, key, letter.model_dump_json(indent=2).encode())
        self.publisher.publish(self.settings.dead_letter_stream, {
            "event_id": event_id, "error_code": code, "message": message[:1000],
            "record": f"s3://{self.settings.bucket}/{key}", "attempts": str(attempt),
        })
        metrics.DEAD_LETTERS.labels(code=code).inc()
        metrics.EVENTS.labels(outcome="dead_letter", category=letter.category or "?").inc()
        log.warning("event.dead_lettered", error_code=code, reason=message, record=key)
        return key


def payload_id(raw: Any) -> str:
    """An id for a payload too broken to carry its own event_id: stable per payload."""
    found = _field(raw, "event_id")
    if found and all(c.isalnum() or c in "-_.:" for c in found) and len(found) <= 128:
        return found
    text = raw if isinstance(raw, str) else json.dumps(raw, default=str, sort_keys=True)
    return "malformed-" + hashlib.sha256(str(text).encode()).hexdigest()[:16]


def _field(raw: Any, name: str) -> str | None:
    value = raw.get(name) if isinstance(raw, dict) else None
    return str(value)[:128] if value is not None else None


def _truncate(raw: Any, limit: int) -> Any:
    text = raw if isinstance(raw, str) else json.dumps(raw, default=str)
    if len(text) <= limit:
        return raw
    return {"truncated": True, "bytes": len(text), "head": str(text)[:limit]}
