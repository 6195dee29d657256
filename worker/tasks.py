"""Thin Celery tasks of the extraction worker, and the signal hooks of its process.

Imported only by the extraction worker's app (see shelfsight.worker.app), so the hooks below
never run in the trainer or in a producer.

The one rule here: a message is acked only once its event's outcome is durable. The task
returns (ack) for a result, a dead letter, a superseded record or a copy of an event already
finished; it retries (a new message is published, then the original acked) for a transient
error or an outcome that could not be written; and when even that publish fails it rejects the
original *with* requeue, never without (Celery's own `Reject(requeue=False)` would drop it).
"""

from __future__ import annotations

import time
from typing import Any, NoReturn

import structlog
from celery import Task, shared_task
from celery.exceptions import Reject
from celery.signals import worker_init, worker_ready, worker_shutdown

from shelfsight.shared.celery_app import EXTRACT_TASK
from shelfsight.worker import metrics
from shelfsight.worker.extractor import Outcome
from shelfsight.worker.runtime import ServiceUnavailable, WorkerRuntime, runtime_of

log = structlog.get_logger()

REQUEUE_PAUSE_MAX_S = 5.0  # a requeue is pushed to the back of the queue; pause the thread a little too


def wire_payload(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """The event as sent: the one positional argument (or `event=`); anything else is kept whole
    ({"args": [...], "kwargs": {...}}) so it reaches the service and is dead-lettered as malformed."""
    if len(args) == 1 and not kwargs:
        return args[0]
    if not args and set(kwargs) == {"event"}:
        return kwargs["event"]
    return {"args": list(args), "kwargs": kwargs}


@shared_task(bind=True, name=EXTRACT_TASK, max_retries=None, ignore_result=True, typing=False,
             Request="shelfsight.worker.task_request:ExtractRequest")  # no task-started event (Flower keeps the rest)
def extract(self: Task, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """Turn one upload event into a result file or a dead letter.

    Takes any arguments (`typing=False` and a catch-all signature), so a malformed message still
    reaches the service and is dead-lettered, instead of failing Celery's argument check and being
    acked with nothing recorded.
    """
    request = self.request
    fresh = not (request.retries or (request.delivery_info or {}).get("redelivered"))
    try:
        service = runtime_of(self.app).service
    except ServiceUnavailable as exc:
        _requeue(self, "service_unavailable", 1.0, str(exc))
    outcome = service.process(wire_payload(args, kwargs), attempt=request.retries + 1, fresh=fresh)
    if outcome.status == "retry":
        _retry(self, outcome, "transient")
    if outcome.status == "requeue":
        _retry(self, outcome, "outcome_not_durable")
    return outcome.summary()


def _retry(task: Task, outcome: Outcome, reason: str) -> None:
    """Publish a retry due in `outcome.retry_in`, or put the original back if that fails."""
    delay = outcome.retry_in or 1.0
    metrics.REQUEUED.labels(reason=reason).inc()
    try:
        raise task.retry(countdown=delay)
    except Reject as rejected:  # the retry message could not be published: keep the original
        _requeue(task, "retry_not_published", delay, f"{reason}; retry not published: {rejected.reason}")


def _requeue(task: Task, reason: str, delay: float, error: str) -> NoReturn:
    """Reject with requeue: the message goes back to the queue (or, with Redis unreachable, stays
    in the unacked index and is restored after the visibility timeout). Never acked."""
    metrics.REQUEUED.labels(reason=reason).inc()
    log.error("event.requeued", reason=reason, error=error, task_id=task.request.id)
    time.sleep(min(delay, REQUEUE_PAUSE_MAX_S))  # no hot loop while storage or the broker is down
    raise Reject(error, requeue=True)


def _runtime(sender: Any) -> WorkerRuntime | None:
    """The runtime of the sender's app; None for an app that is not an extraction worker's
    (signals are process-global, and a test process runs several kinds of app)."""
    return getattr(getattr(sender, "app", None), "shelfsight_runtime", None)


@worker_init.connect
def _on_init(sender: Any = None, **_: Any) -> None:
    """Before the consumer builds its task strategies (which read it once): extraction's task
    events on or off (`extract_task_events`; heartbeats and training's events are not touched)."""
    runtime = _runtime(sender)
    if runtime is not None:
        sender.app.loader.import_default_modules()
        sender.app.tasks[EXTRACT_TASK].send_events = runtime.settings.extract_task_events


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
