"""Thin Celery tasks of the extraction worker, and the signal hooks of its process.

Imported only by the extraction worker's app (see shelfsight.worker.app), so the hooks below
never run in the trainer or in a producer.
"""

from __future__ import annotations

from typing import Any

from celery import shared_task
from celery.signals import task_rejected, task_unknown, worker_ready, worker_shutdown

from shelfsight.shared.celery_app import EXTRACT_TASK
from shelfsight.worker.runtime import WorkerRuntime, runtime_of


@shared_task(bind=True, name=EXTRACT_TASK, max_retries=None, ignore_result=True)
def extract(self, event: Any = None, **unexpected: Any) -> dict[str, Any]:  # noqa: ANN001
    """Turn one upload event into a result file or a dead letter.

    Takes anything, so a malformed message still reaches the service and is dead-lettered.
    """
    payload = event if not unexpected else {"event": event, **unexpected}
    outcome = runtime_of(self.app).service.process(payload, attempt=self.request.retries + 1)
    if outcome.status == "retry":
        raise self.retry(countdown=outcome.retry_in)
    return outcome.summary()


def _runtime(sender: Any) -> WorkerRuntime | None:
    """The runtime of the sender's app; None for an app that is not an extraction worker's
    (signals are process-global, and a test process runs several kinds of app)."""
    return getattr(getattr(sender, "app", None), "shelfsight_runtime", None)


@worker_ready.connect
def _on_ready(sender: Any = None, **_: Any) -> None:
    runtime = _runtime(sender)
    if runtime is not None:
        runtime.warm_up()


@worker_shutdown.connect
def _on_shutdown(sender: Any = None, **_: Any) -> None:
    runtime = _runtime(sender)
    if runtime is not None:
        runtime.shutdown()


@task_unknown.connect
def _on_unknown_task(sender: Any = None, name: str = "", message: Any = None, **_: Any) -> None:
    """A message naming a task nobody registered: Celery drops it, so record why."""
    _record_undeliverable(sender, message, f"no task named {name!r} is registered on this queue")


@task_rejected.connect
def _on_rejected(sender: Any = None, message: Any = None, **_: Any) -> None:
    """A message that is not a Celery task message at all."""
    _record_undeliverable(sender, message, "not a Celery task message")


def _record_undeliverable(consumer: Any, message: Any, reason: str) -> None:
    runtime = _runtime(consumer)
    if runtime is None:
        return
    body = getattr(message, "body", b"")
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else str(body)
    runtime.dead_letters.record(text, None, "malformed_event", reason, attempt=1)
