"""The relay's core: one notification in, upload events enqueued and bad records dead-lettered.

Sources (SQS, a Redis list, a webhook) take a notification, call `Relay.handle`, and remove it
from the source only when `handle` returns. `handle` returns once every good record's event is
in the broker and every bad record's dead letter is written; otherwise it raises
`RelayUnavailable` and the notification stays where it is, to be handled again. Event ids come
from bucket, key and sequencer (shelfsight.shared.enqueue), so handling a notification twice
enqueues the same event ids: at-least-once, with duplicates the worker writes idempotently.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import structlog
from pydantic import ValidationError

from shelfsight.shared.enqueue import NotificationError, events_from_s3_notification
from shelfsight.shared.events import ErrorCode, UploadEvent
from shelfsight.shared.relay import metrics
from shelfsight.shared.relay.dead_letters import RelayDeadLetters
from shelfsight.shared.relay.envelopes import EnvelopeError, unwrap

log = structlog.get_logger()

Enqueue = Callable[[UploadEvent], str]


class RelayUnavailable(Exception):
    """Enqueueing or dead-lettering failed (broker or storage down): keep the notification."""


@dataclass
class Handled:
    """What became of one notification."""

    kind: str
    event_ids: list[str] = field(default_factory=list)
    dead_letters: list[str] = field(default_factory=list)
    skipped: int = 0

    @property
    def outcome(self) -> str:
        if self.kind == "unusable":
            return "dead_letter"
        return "relayed" if self.event_ids or self.dead_letters else "skipped"


class Relay:
    """Turns notifications into upload events. Thread-safe if `enqueue` and the writer are."""

    def __init__(self, enqueue: Enqueue, dead_letters: RelayDeadLetters, key_pattern: str,
                 max_bytes: int) -> None:
        self.enqueue = enqueue
        self.dead_letters = dead_letters
        self.key_pattern = key_pattern
        self.max_bytes = max_bytes

    def handle(self, body: bytes | str, source: str) -> Handled:
        """Enqueue the events of one notification; dead-letter what cannot become one.

        Raises RelayUnavailable if the broker or the dead-letter store failed: the caller must
        then leave the notification at its source.
        """
        started = time.perf_counter()
        try:
            handled = self._handle(body, source)
        except RelayUnavailable:
            metrics.NOTIFICATIONS.labels(source=source, outcome="failed").inc()
            raise
        metrics.NOTIFICATIONS.labels(source=source, outcome=handled.outcome).inc()
        metrics.HANDLE_SECONDS.labels(source=source).observe(time.perf_counter() - started)
        metrics.LAST_SUCCESS.labels(source=source).set(time.time())
        log.info("relay.handled", source=source, envelope=handled.kind, enqueued=len(handled.event_ids),
                 dead_letters=len(handled.dead_letters), skipped=handled.skipped)
        return handled

    def _handle(self, body: bytes | str, source: str) -> Handled:
        size = len(body.encode() if isinstance(body, str) else body)
        if size > self.max_bytes:
            uri = self._dead_letter(_head(body), "event_too_large",
                                    f"notification is {size} bytes; the limit is {self.max_bytes} "
                                    "(SHELFSIGHT_RELAY_MAX_BODY_BYTES)")
            return Handled("unusable", dead_letters=[uri])
        try:
            unwrapped = unwrap(body)
        except EnvelopeError as exc:
            return Handled("unusable", dead_letters=[self._dead_letter(body, "malformed_event", str(exc))])
        handled = Handled(unwrapped.kind)
        for number, record in enumerate(unwrapped.records, start=1):
            self._handle_record(record, number, source, handled)
        return handled

    def _handle_record(self, record: Any, number: int, source: str, handled: Handled) -> None:
        """One record: enqueue its event, or dead-letter it, or skip it (not ObjectCreated)."""
        try:
            events = events_from_s3_notification({"Records": [record]}, self.key_pattern)
        except (NotificationError, ValidationError, AttributeError, TypeError) as exc:
            reason = _reason(exc).replace("record 1:", f"record {number}:")
            handled.dead_letters.append(self._dead_letter(record, "malformed_event", reason))
            metrics.RECORDS.labels(source=source, outcome="dead_letter").inc()
            return
        if not events:
            handled.skipped += 1
            metrics.RECORDS.labels(source=source, outcome="skipped").inc()
            return
        for event in events:
            try:
                handled.event_ids.append(self.enqueue(event))
            except Exception as exc:  # any broker failure: keep the notification
                raise RelayUnavailable(f"enqueue failed: {type(exc).__name__}: {exc}") from exc
            metrics.RECORDS.labels(source=source, outcome="enqueued").inc()
            log.debug("relay.enqueued", event_id=event.event_id, image=event.image)

    def _dead_letter(self, raw: Any, code: ErrorCode, message: str) -> str:
        try:
            return self.dead_letters.record(raw, code, message)
        except Exception as exc:  # storage or Redis down: keep the notification
            raise RelayUnavailable(f"dead letter not written: {type(exc).__name__}: {exc}") from exc


def _reason(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'event'}: {e['msg']}" for e in exc.errors()[:5])
        return f"record 1: not a valid upload event: {problems}"
    if isinstance(exc, NotificationError):
        return str(exc)
    return f"record 1: not an S3 event record ({type(exc).__name__}: {exc})"


def _head(body: bytes | str, limit: int = 4096) -> str:
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
    return text[:limit]
