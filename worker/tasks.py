"""Thin Celery tasks of the extraction worker."""

from __future__ import annotations

from typing import Any

from celery import shared_task
from celery.signals import task_rejected, task_unknown, worker_ready, worker_shutdown

from worker.celery_app import EXTRACT_TASK
from worker.runtime import dead_letter_writer, extraction_service, shutdown, warm_up


@shared_task(bind=True, name=EXTRACT_TASK, max_retries=None, ignore_result=True)
def extract(self, event: Any = None, **unexpected: Any) -> dict[str, Any]:  # noqa: ANN001
    """Turn one upload event into a result file or a dead letter.

    Takes anything, so a malformed message still reaches the service and is dead-lettered.
    """
    payload = event if not unexpected else {"event": event, **unexpected}
    outcome = extraction_service(self.app).process(payload, attempt=self.request.retries + 1)
    if outcome.status == "retry":
        raise self.retry(countdown=outcome.retry_in)
    return outcome.summary()


@worker_ready.connect
def _on_ready(sender: Any = None, **_: Any) -> None:
    if sender is not None and sender.app.conf.task_default_queue in _queues(sender):
        warm_up(sender.app)


@worker_shutdown.connect
def _on_shutdown(sender: Any = None, **_: Any) -> None:
    if sender is not None:
        shutdown(sender.app)


def _queues(consumer: Any) -> set[str]:
    try:
        return {q.name for q in consumer.task_consumer.queues}
    except AttributeError:
        return set()


@task_unknown.connect
def _on_unknown_task(sender: Any = None, name: str = "", message: Any = None, **_: Any) -> None:
    """A message naming a task nobody registered: Celery drops it, so record why."""
    _record_undeliverable(sender, message, f"no task named {name!r} is registered on this queue")


@task_rejected.connect
def _on_rejected(sender: Any = None, message: Any = None, **_: Any) -> None:
    """A message that is not a Celery task message at all."""
    _record_undeliverable(sender, message, "not a Celery task message")


def _record_undeliverable(consumer: Any, message: Any, reason: str) -> None:
    if consumer is None:
        return
    body = getattr(message, "body", b"")
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else str(body)
    dead_letter_writer(consumer.app).record(text, None, "malformed_event", reason, attempt=1)
