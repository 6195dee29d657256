"""Composition root of the trainer worker process.

`shelfsight trainer` builds Settings once (in the CLI) and calls `create_trainer_app`; the app
carries the Settings and the process's `TrainerResources`. Only the trainer's task module is
registered: a trainer process never loads the extraction worker or its signal hooks.
"""

from __future__ import annotations

from celery import Celery

from shelfsight.shared.celery_app import create_celery_app
from shelfsight.shared.settings import Settings
from shelfsight.trainer.resources import TrainerResources

TRAINER_TASKS = ("shelfsight.trainer.tasks",)


def create_trainer_app(settings: Settings, resources: TrainerResources | None = None) -> Celery:
    """The trainer's Celery app, with its resources attached as `app.shelfsight_trainer`."""
    app = create_celery_app(settings, tasks=TRAINER_TASKS)
    app.shelfsight_trainer = resources or TrainerResources.build(settings)
    return app


def resources_of(app: Celery) -> TrainerResources:
    """The TrainerResources the composition root attached to `app`."""
    resources: TrainerResources = app.shelfsight_trainer
    return resources
