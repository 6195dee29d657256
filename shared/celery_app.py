"""The Celery app factory, task names and routes: what producers, workers and the trainer share.

At-least-once, JSON-only, deliberate prefetch, CUDA-safe pools. Producers (upload pipelines,
the CLI, the demo) build the app with no task modules and send tasks by name, so enqueueing
never loads the worker or the trainer. Each worker kind's composition root passes its own
task module in `tasks`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from celery import Celery
from kombu import Queue

from shelfsight.shared.settings import Settings

EXTRACT_TASK = "shelfsight.extract"
TRAIN_TASK = "shelfsight.train_category"
IMPORT_LABELS_TASK = "shelfsight.import_labels"
RETRAIN_ALL_TASK = "shelfsight.retrain_all"
# Re-extractions are EXTRACT_TASK messages sent to settings.backfill_queue (see shelfsight.shared.backfill);
# this task plans them after a promotion (settings.backfill_after_promotion), on the training queue.
BACKFILL_TASK = "shelfsight.backfill_category"

TRAINER_TASK_MODULE = "shelfsight.trainer.tasks"
# kombu keeps delivered-but-unacked messages in one hash per name, and every consumer that uses
# that name restores entries older than *its* visibility timeout. The trainer uses its own, so a
# multi-hour training is never restored by an extraction worker's short timeout, and extraction
# never waits for training's long one.
TRAINING_UNACKED_KEY = "unacked-training"
# kombu's Redis transport loses a message popped by a consumer that dies before recording it;
# this one pops into a per-consumer in-flight list first (see shelfsight.shared.redis_transport).
CRASH_SAFE_REDIS_TRANSPORT = "shelfsight.shared.redis_transport:Transport"

ConsumerKind = Literal["extract", "training"]


def broker_transport_options(settings: Settings, kind: ConsumerKind = "extract") -> dict[str, Any]:
    """kombu Redis transport options for a consumer of `kind` (producers use the extract ones).

    Visibility timeout per kind (each in its own unacked index), the restore sweep run often
    enough that a dead consumer's messages come back within about 1.1 × the timeout, socket
    timeouts so a half-open connection cannot hang a publish, keepalive and health checks.
    """
    visibility = settings.visibility_timeout_s if kind == "extract" else settings.training_visibility_timeout_s
    options: dict[str, Any] = {
        "visibility_timeout": visibility,
        # kombu sweeps every interval x throttle seconds (100 s by default): a tenth of the timeout
        "unacked_restore_interval": max(1, min(60, visibility // 10)),
        "unacked_restore_throttle": 1,
        # a consumer killed during a sweep holds the sweep's lock until it expires (300 s by default)
        "unacked_mutex_expire": max(5, min(300, visibility // 4)),
        # the crash-safe transport's heartbeat: a dead consumer's in-flight messages come back after it
        "inflight_alive_s": max(5, min(60, visibility // 4)),
        "socket_timeout": settings.broker_socket_timeout_s,
        "socket_connect_timeout": settings.broker_connect_timeout_s,
        "socket_keepalive": True,
        "health_check_interval": settings.broker_health_check_interval_s,
        # a worker consuming several queues takes live uploads before re-extractions, always
        # (kombu's default takes the queues in turn); see shelfsight.shared.redis_transport
        "queue_order_strategy": "priority",
        "queue_priority": [settings.extract_queue, settings.backfill_queue],
    }
    if kind == "training":
        options.update(unacked_key=TRAINING_UNACKED_KEY, unacked_index_key=f"{TRAINING_UNACKED_KEY}_index",
                       unacked_mutex_key=f"{TRAINING_UNACKED_KEY}_mutex")
    return options


def create_celery_app(
    settings: Settings, *, tasks: Sequence[str] = (), kind: ConsumerKind | None = None, current: bool = True
) -> Celery:
    """Build a Celery app for these settings.

    `tasks` names the task modules this process registers (none for a producer). `kind` says
    which queue's delivery settings a worker of this app uses; by default "training" when the
    trainer's task module is registered, else "extract". The Settings object rides on the app
    (``app.shelfsight_settings``) so tasks reach it without building a second one. `current`
    False leaves the process's current app as it is (a producer app built inside a worker).
    """
    if kind is None:
        kind = "training" if TRAINER_TASK_MODULE in tasks else "extract"
    app = Celery("shelfsight", broker=settings.broker_url, backend=settings.result_backend, set_as_current=current)
    if settings.broker_url.startswith("redis://"):
        app.conf.broker_transport = CRASH_SAFE_REDIS_TRANSPORT
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
        # Redis redelivers anything unacked after this long: one timeout per kind of consumer.
        broker_transport_options=broker_transport_options(settings, kind),
        result_backend_transport_options={"visibility_timeout": settings.visibility_timeout_s},
        redis_socket_timeout=settings.broker_socket_timeout_s,
        redis_socket_connect_timeout=settings.broker_connect_timeout_s,
        redis_socket_keepalive=True,
        redis_backend_health_check_interval=settings.broker_health_check_interval_s,
        broker_connection_timeout=settings.broker_connect_timeout_s,
        # Prefetch: each thread holds one message at a time; batches form across threads.
        worker_prefetch_multiplier=1,
        worker_pool_start_method="spawn",  # only matters for prefork: CUDA cannot survive fork
        # Soft shutdown: a stopping worker finishes and acks its in-flight batch, then requeues
        # what is left at once (instead of after the Redis visibility timeout).
        worker_soft_shutdown_timeout=settings.worker_soft_shutdown_timeout_s,
        task_queues=[Queue(settings.extract_queue), Queue(settings.training_queue), Queue(settings.backfill_queue)],
        task_default_queue=settings.extract_queue,
        task_routes={
            EXTRACT_TASK: {"queue": settings.extract_queue},
            TRAIN_TASK: {"queue": settings.training_queue},
            IMPORT_LABELS_TASK: {"queue": settings.training_queue},
            RETRAIN_ALL_TASK: {"queue": settings.training_queue},
            BACKFILL_TASK: {"queue": settings.training_queue},
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
    app.shelfsight_kind = kind
    return app


def settings_of(app: Celery) -> Settings:
    """The Settings the app was built with."""
    settings: Settings = app.shelfsight_settings
    return settings
