"""The extraction worker's Celery consumer: a message whose body cannot be decoded is dead-lettered.

Celery acks and logs such a message (a pickle from a misconfigured producer, bytes that are not
JSON) before any task sees it. Every message on the extract queue must still end as a result or
a dead letter, so this consumer records one first. The body is kept as text, never deserialised.
"""

from __future__ import annotations

from typing import Any

import structlog
from celery.worker.consumer import Consumer as CeleryConsumer

log = structlog.get_logger()


class Consumer(CeleryConsumer):
    """Celery's consumer, plus a dead letter for every undecodable message."""

    def on_decode_error(self, message: Any, exc: Exception) -> None:
        runtime = getattr(self.app, "shelfsight_runtime", None)
        if runtime is not None:
            body = message.body
            text = body.decode("utf-8", "backslashreplace") if isinstance(body, bytes) else str(body)
            reason = (f"message body could not be decoded (content type {message.content_type!r}): "
                      f"{type(exc).__name__}: {exc}")
            try:
                runtime.dead_letters.record(text, None, "malformed_event", reason[:500], attempt=1)
            except Exception:  # the message is acked below either way; say why there is no record
                log.exception("dead_letter.write_failed", reason=reason[:500])
        super().on_decode_error(message, exc)
