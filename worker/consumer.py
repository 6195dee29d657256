"""The extraction worker's Celery consumer: messages no task can take are dead-lettered first,
and task events go to Redis in groups.

Celery acks (or rejects without requeue) a message whose body cannot be decoded, that is not a
task message, that names an unknown task or that is malformed as a task, and only then tells
anyone. Every message on the extract queue must end as a result or a dead letter, so this
consumer writes the dead letter *before* letting Celery drop the message; when the dead letter
cannot be written (S3 down or denied), the message is put back on the queue instead, after a
short pause, and tried again later. The body is kept as text, never deserialised.

Task events (task-received, task-succeeded, ...; what Flower lists) are buffered by Celery and
published, as one message per group, on the consumer's next loop turn: in a burst that is about
one PUBLISH (a Redis round trip on the consumer's thread) per event. Here the first
event buffered schedules one flush `task_event_flush_ms` later, and every event until then joins
it; a buffer of `task_event_buffer` events is sent at once by the thread that fills it. Flower
sees a task up to that interval later; nothing else reads these events. Heartbeats are not
buffered. The buffer is flushed when the consumer stops (a restart or the shutdown). Celery's
per-message floor falls by 0.1-0.25 ms (docs/performance.md, issue 12, session 7).
"""

from __future__ import annotations

import time
from typing import Any

import structlog
from celery import Celery, bootsteps
from celery.worker.consumer import Consumer as CeleryConsumer

from shelfsight.shared.settings import Settings
from shelfsight.worker import metrics
from shelfsight.worker.delivery import OutcomeNotDurable

log = structlog.get_logger()

UNRECORDED_PAUSE_S = 1.0  # while S3 is down, do not spin on the same undeliverable message


def use_extraction_consumer(app: Celery, settings: Settings) -> None:
    """Make `app`'s workers consume with the Consumer below, its task events grouped as `settings` says."""
    app.conf.worker_consumer = "shelfsight.worker.consumer:Consumer"
    app.conf.shelfsight_task_event_flush_s = settings.task_event_flush_ms / 1000
    app.conf.shelfsight_task_event_buffer = settings.task_event_buffer
    app.steps["consumer"].add(TaskEventGroups)


class Consumer(CeleryConsumer):
    """Celery's consumer, plus a dead letter for every message that never reaches a task, and
    task events flushed at most once per `shelfsight_task_event_flush_s`."""

    event_flush_interval_s = 0.0  # set by TaskEventGroups; 0: Celery's flush per loop turn
    _event_flush_due = False  # a flush is scheduled: events buffered until then join it

    def on_send_event_buffered(self) -> None:
        """Called by the event dispatcher, from any thread, after it buffered a task event."""
        interval = self.event_flush_interval_s
        if interval <= 0:
            super().on_send_event_buffered()  # Celery's: flush on the loop's next turn
            return
        if self._event_flush_due:
            return
        self._event_flush_due = True
        self.hub.call_soon(self._schedule_event_flush, interval)  # the loop's timer is the loop's own

    def _schedule_event_flush(self, interval: float) -> None:
        self.hub.call_later(interval, self._flush_due_events)

    def _flush_due_events(self) -> None:
        self._event_flush_due = False  # first: an event buffered from now on schedules the next flush
        self._flush_events()

    def group_task_events(self, interval_s: float) -> None:
        """Flush task events `interval_s` after the first one buffered (0: on the next loop turn).
        Forgets a scheduled flush: the loop's timers do not survive a consumer restart."""
        self.event_flush_interval_s = interval_s
        self._event_flush_due = False

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


class TaskEventGroups(bootsteps.StartStopStep):
    """Sets the dispatcher's buffer size when the consumer (re)starts, and flushes what is buffered
    when it stops: a restart after a lost connection, or the shutdown."""

    requires = ("celery.worker.consumer.events:Events",)

    def start(self, c: Consumer) -> None:  # added with the Consumer and both values: use_extraction_consumer
        c.group_task_events(c.app.conf["shelfsight_task_event_flush_s"])
        if c.event_dispatcher is not None:
            c.event_dispatcher.buffer_limit = c.app.conf["shelfsight_task_event_buffer"]

    def stop(self, c: Any) -> None:
        self._flush(c)

    def shutdown(self, c: Any) -> None:
        self._flush(c)

    @staticmethod
    def _flush(c: Any) -> None:
        dispatcher = c.event_dispatcher
        if dispatcher is None:
            return
        try:
            dispatcher.flush()
        except Exception as exc:  # noqa: BLE001 - the broker is gone: monitoring events, not outcomes
            log.warning("task_events.not_flushed", error=f"{type(exc).__name__}: {exc}")
