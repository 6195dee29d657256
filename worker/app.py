"""Composition root of the extraction worker process.

`shelfsight worker` builds Settings once (in the CLI) and calls `create_worker_app`; the app
carries the Settings and the process's `WorkerRuntime`. Only the extraction task module is
registered: a worker process never imports the trainer (nor matplotlib).
"""

from __future__ import annotations

from celery import Celery

from shelfsight.shared.celery_app import create_celery_app
from shelfsight.shared.settings import Settings
from shelfsight.worker.consumer import use_extraction_consumer
from shelfsight.worker.runtime import BuildService, WorkerRuntime

WORKER_TASKS = ("shelfsight.worker.tasks",)


def create_worker_app(settings: Settings) -> Celery:
    """The extraction worker's Celery app, with its runtime attached as `app.shelfsight_runtime`."""
    app = create_celery_app(settings, tasks=WORKER_TASKS)
    use_extraction_consumer(app, settings)  # undecodable bodies are dead-lettered; task events grouped
    app.shelfsight_runtime = WorkerRuntime(settings)
    app.steps["worker"].add(BuildService)  # no service, no consuming: fail at startup instead
    return app
