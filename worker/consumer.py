"""The extraction worker's Celery consumer: messages no task can take are dead-lettered first.

Celery acks (or rejects without requeue) a message whose body cannot be decoded, that is not a
task message, that names an unknown task or that is malformed as a task, and only then tells
anyone. Every message on the extract queue must end as a result or a dead letter, so this
consumer writes the dead letter *before* letting Celery drop the message; when the dead letter
cannot be written (S3 down or denied), the message is put back on the queue instead, after a
short pause, and tried again later. The body is kept as text, never deserialised.
"""

from __future__ import annotations

import time
from typing import Any

import structlog
from celery.worker.consumer import Consumer as CeleryConsumer

from shelfsight.worker import metrics
from shelfsight.worker.delivery import OutcomeNotDurable

log = structlog.get_logger()

UNRECORDED_PAUSE_S = 1.0  # while S3 is down, do not spin on the same undeliverable message


class Consumer(CeleryConsumer):
    """Celery's consumer, plus a dead letter for every message that never reaches a task."""

    def on_decode_error(self, message: Any, exc: Exception) -> None:
        reason = (f"message body could not be decoded (content type {message.content_type!r}): "
                  f"{type(exc).__name__}: {exc}")
        if self._recorded(message, reason):
            super().on_decode_error(message, exc)

    def on_unknown_message(self, body: Any, message: Any) -> None:
        if self._recorded(message, "not a Celery task message"):
            super().on_unknown_message(body, message)

    def on_unknown_task(self, body: Any, message: Any, exc: Exception) -> None:
        name = (getattr(message, "headers", None) or {}).get("task", "?")
        if self._recorded(message, f"no task named {name!r} is registered on this queue"):
            super().on_unknown_task(body, message, exc)

    def on_invalid_task(self, body: Any, message: Any, exc: Exception) -> None:
        if self._recorded(message, f"invalid task message: {type(exc).__name__}: {exc}"):
            super().on_invalid_task(body, message, exc)

    def _recorded(self, message: Any, reason: str) -> bool:
        """Write the message's dead letter. False when it could not be: the message was requeued."""
        runtime = getattr(self.app, "shelfsight_runtime", None)
        if runtime is None:
            return True
        body = message.body
        text = body.decode("utf-8", "backslashreplace") if isinstance(body, bytes) else str(body)
        try:
            runtime.dead_letters.record(text, None, "malformed_event", reason[:500], attempt=1)
            return True
        except Exception as exc:  # noqa: BLE001 - OutcomeNotDurable, or no writer could be built
            kind = exc.kind if isinstance(exc, OutcomeNotDurable) else "dead_letter"
            metrics.REQUEUED.labels(reason="undeliverable_not_recorded").inc()
            log.error("dead_letter.undeliverable_requeued", reason=reason[:500], kind=kind,
                      error=f"{type(exc).__name__}: {exc}")
            time.sleep(UNRECORDED_PAUSE_S)
            try:
                message.reject(requeue=True)
            except Exception as lost:  # noqa: BLE001 - broker gone: the message stays unacked in
                # Redis and comes back after the visibility timeout
                log.error("dead_letter.requeue_failed", error=f"{type(lost).__name__}: {lost}")
            return False
