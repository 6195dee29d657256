"""The Celery app factory, task names and routes: what producers, workers and the trainer share.

At-least-once, JSON-only, deliberate prefetch, CUDA-safe pools. Producers (upload pipelines,
the CLI, the demo) build the app with no task modules and send tasks by name, so enqueueing
never loads the worker or the trainer. Each worker kind's composition root passes its own
task module in `tasks`.
"""

from __future__ import annotations

from collections.abc import Sequence

from celery import Celery
from kombu import Queue

from shelfsight.shared.settings import Settings

EXTRACT_TASK = "shelfsight.extract"
TRAIN_TASK = "shelfsight.train_category"
IMPORT_LABELS_TASK = "shelfsight.import_labels"
RETRAIN_ALL_TASK = "shelfsight.retrain_all"


def create_celery_app(settings: Settings, *, tasks: Sequence[str] = ()) -> Celery:
    """Build a Celery app for these settings.

    `tasks` names the task modules this process registers (none for a producer). The
    Settings object rides on the app (``app.shelfsight_settings``) so tasks reach it
    without building a second one.
    """
    app = Celery("shelfsight", broker=settings.broker_url, backend=settings.result_backend)
    app.conf.update(
        # Safe by default: nothing but JSON crosses the broker.
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        # At-least-once: ack after the task ran, redeliver if the worker died mid-task.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=True,  # failures are dead-lettered by the task itself
        # Redis redelivers anything unacked after this long: keep it above the longest task.
        broker_transport_options={"visibility_timeout": settings.visibility_timeout_s},
        result_backend_transport_options={"visibility_timeout": settings.visibility_timeout_s},
        # Prefetch: each thread holds one message at a time; batches form across threads.
        worker_prefetch_multiplier=1,
        worker_pool_start_method="spawn",  # only matters for prefork: CUDA cannot survive fork
        # Soft shutdown: a stopping worker finishes and acks its in-flight batch, then requeues
        # what is left at once (instead of after the Redis visibility timeout).
        worker_soft_shutdown_timeout=settings.worker_soft_shutdown_timeout_s,
        task_queues=[Queue(settings.extract_queue), Queue(settings.training_queue)],
        task_default_queue=settings.extract_queue,
        task_routes={
            EXTRACT_TASK: {"queue": settings.extract_queue},
            TRAIN_TASK: {"queue": settings.training_queue},
            IMPORT_LABELS_TASK: {"queue": settings.training_queue},
            RETRAIN_ALL_TASK: {"queue": settings.training_queue},
        },
        task_track_started=True,
        result_expires=7 * 24 * 3600,
        worker_send_task_events=True,  # Flower
        task_send_sent_event=True,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        imports=list(tasks),
        beat_schedule=(
            {"retrain-all": {"task": RETRAIN_ALL_TASK, "schedule": settings.retrain_schedule_s}}
            if settings.retrain_schedule_s > 0
            else {}
        ),
    )
    app.shelfsight_settings = settings
    return app


def settings_of(app: Celery) -> Settings:
    """The Settings the app was built with."""
    settings: Settings = app.shelfsight_settings
    return settings
