"""Dead letters: the record of why an event produced no result, in S3 and on a Redis Stream."""

from __future__ import annotations

import hashlib
import json
import socket
from typing import Any

import structlog

from shelfsight.shared.events import DeadLetter, ErrorCode, UploadEvent, dead_letter_key
from shelfsight.shared.settings import Settings
from shelfsight.shared.storage import ObjectStore, StorageError
from shelfsight.shared.streams import EventPublisher, publish_after_write
from shelfsight.shared.taxonomy import load_taxonomy
from shelfsight.worker import metrics
from shelfsight.worker.delivery import OutcomeNotDurable

log = structlog.get_logger()


UNKNOWN_CATEGORY_LABEL = "unknown"
MALFORMED_FOLDER = "malformed"


class DeadLetterWriter:
    """Writes `dead-letters/<day>/<event_id>.json` and an entry on the dead-letter stream.

    A payload that is not a valid event is written to `dead-letters/<day>/malformed/<sha256>.json`
    (named by its own content, not by the event_id it claims), so it can never overwrite the
    record of a real event. Metrics label categories outside the taxonomy as `unknown`, so a
    producer cannot grow the number of series.
    """

    def __init__(self, settings: Settings, store: ObjectStore, publisher: EventPublisher) -> None:
        self.settings = settings
        self.store = store
        self.publisher = publisher
        self.worker_name = socket.gethostname()
        self.categories = frozenset(load_taxonomy(settings.taxonomy_path).categories)

    def record(
        self, raw: Any, event: UploadEvent | None, code: ErrorCode, message: str, attempt: int
    ) -> str:
        """Record a dead letter for `raw` (the payload as received); returns its S3 key.

        Raises OutcomeNotDurable when the S3 record cannot be written (the caller must not ack
        the message then). A stream entry that cannot be written after the record was is logged
        and counted, not raised: the record stands.
        """
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
        name = event.event_id if event else f"{MALFORMED_FOLDER}/{payload_digest(raw)}"
        key = dead_letter_key(self.settings.dead_letter_prefix, letter.failed_at, name)
        try:
            self.store.put(self.settings.bucket, key, letter.model_dump_json(indent=2).encode())
        except StorageError as exc:
            metrics.OUTCOME_WRITE_FAILURES.labels(kind="dead_letter").inc()
            log.error("dead_letter.write_failed", error_code=code, reason=message[:500], record=key,
                      error=f"{type(exc).__name__}: {exc}")
            raise OutcomeNotDurable("dead_letter", f"dead letter {key} not written: {exc}") from exc
        published = publish_after_write(self.publisher, self.settings.dead_letter_stream, {
            "event_id": event_id, "error_code": code, "message": message[:1000],
            "record": f"s3://{self.settings.bucket}/{key}", "attempts": str(attempt),
        })
        if published is None:
            metrics.STREAM_PUBLISH_FAILURES.labels(stream="dead_letters").inc()
        metrics.DEAD_LETTERS.labels(code=code).inc()
        metrics.EVENTS.labels(outcome="dead_letter", category=self.category_label(letter.category)).inc()
        log.warning("event.dead_lettered", error_code=code, reason=message, record=key)
        return key

    def category_label(self, category: str | None) -> str:
        """A metric label: the category if the taxonomy knows it, else `unknown` (bounded)."""
        return category if category is not None and category in self.categories else UNKNOWN_CATEGORY_LABEL


def payload_digest(raw: Any) -> str:
    """sha256 of a payload as received (hex): names a malformed payload's dead-letter record."""
    if isinstance(raw, bytes):
        data = raw
    else:
        text = raw if isinstance(raw, str) else json.dumps(raw, default=str, sort_keys=True)
        data = str(text).encode("utf-8", "surrogatepass")
    return hashlib.sha256(data).hexdigest()


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
    if isinstance(raw, bytes):  # kept as text (never deserialised): a record must be JSON
        raw = raw.decode("utf-8", "backslashreplace")
    text = raw if isinstance(raw, str) else json.dumps(raw, default=str)
    if len(text) <= limit:
        return raw
    return {"truncated": True, "bytes": len(text), "head": str(text)[:limit]}
