"""Dead letters of the relay: the same record, S3 key and stream as the worker's.

A notification record that cannot become an upload event ends here, so an operator finds it
with `shelfsight dead-letters` next to the worker's. Written without the worker package (the
relay is a producer; it never imports shelfsight.worker).
"""

from __future__ import annotations

import hashlib
import json
import socket
from typing import Any

import structlog

from shelfsight.shared.events import DeadLetter, ErrorCode, dead_letter_key
from shelfsight.shared.settings import Settings
from shelfsight.shared.storage import ObjectStore
from shelfsight.shared.streams import EventPublisher

log = structlog.get_logger()


def record_id(raw: Any) -> str:
    """A stable id for a record the relay rejects: a redelivered notification gets the same one."""
    if isinstance(raw, bytes):
        raw = raw.decode("utf-8", "replace")
    text = raw if isinstance(raw, str) else json.dumps(raw, default=str, sort_keys=True)
    return "relay-" + hashlib.sha256(str(text).encode()).hexdigest()[:32]


class RelayDeadLetters:
    """Writes `dead-letters/<day>/<id>.json` and an entry on the dead-letter stream."""

    def __init__(self, settings: Settings, store: ObjectStore, publisher: EventPublisher) -> None:
        self.settings = settings
        self.store = store
        self.publisher = publisher
        self.name = f"relay@{socket.gethostname()}"

    def record(self, raw: Any, code: ErrorCode, message: str) -> str:
        """Record `raw` (a notification or one of its records) as a dead letter; returns its S3 URI.

        Storage and Redis errors propagate: the caller then leaves the notification at its
        source, so a dead letter is never lost either.
        """
        letter = DeadLetter(
            event_id=record_id(raw), product_id=None, category=None, error_code=code,
            message=message, attempts=1, event=_truncate(raw, self.settings.max_event_bytes),
            worker=self.name,
        )
        key = dead_letter_key(self.settings.dead_letter_prefix, letter.failed_at, letter.event_id)
        self.store.put(self.settings.bucket, key, letter.model_dump_json(indent=2).encode())
        uri = f"s3://{self.settings.bucket}/{key}"
        self.publisher.publish(self.settings.dead_letter_stream, {
            "event_id": letter.event_id, "error_code": code, "message": message[:1000],
            "record": uri, "attempts": "1",
        })
        log.warning("relay.dead_lettered", error_code=code, reason=message[:300], record=uri)
        return uri


def _truncate(raw: Any, limit: int) -> Any:
    if isinstance(raw, bytes):
        raw = raw.decode("utf-8", "replace")
    text = raw if isinstance(raw, str) else json.dumps(raw, default=str)
    if len(text) <= limit:
        return raw
    return {"truncated": True, "bytes": len(text), "head": text[:limit]}
