"""Celery tasks of the trainer worker (training queue). Thin: validate, call a service, log.

Run them with `shelfsight trainer` (solo pool: one training at a time, owns the GPU).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import structlog
from celery import Task, shared_task

from shelfsight.shared import backfill
from shelfsight.shared.celery_app import (
    BACKFILL_TASK,
    IMPORT_LABELS_TASK,
    RETRAIN_ALL_TASK,
    TRAIN_TASK,
)
from shelfsight.trainer import metrics, service
from shelfsight.trainer.app import resources_of
from shelfsight.trainer.train import Progress

log = structlog.get_logger()

PROGRESS_INTERVAL_S = 1.0


def _reporter(task: Task) -> Progress:
    """Forward training progress to the result backend as state PROGRESS (Flower, --wait).

    Steps are throttled to one update per PROGRESS_INTERVAL_S; phase changes and epoch ends
    always go through.
    """
    last = 0.0

    def report(meta: dict[str, Any]) -> None:
        nonlocal last
        now = time.monotonic()
        if meta.get("phase") == "step" and now - last < PROGRESS_INTERVAL_S:
            return
        last = now
        if task.request.id:
            task.update_state(state="PROGRESS", meta=meta)

    return report


@shared_task(bind=True, name=TRAIN_TASK)
def train_category(self: Task, category: str, caption_template: str | None = None) -> dict[str, Any]:
    """Fine-tune a challenger for `category`, gate it against the champion, publish it."""
    resources = resources_of(self.app)
    task_id = self.request.id or ""
    with structlog.contextvars.bound_contextvars(category=category, task_id=task_id):
        log.info("task.train.start")
        started = time.monotonic()
        try:
            result = service.train_category(
                resources, category, owner=task_id or None, caption_template=caption_template,
                progress=_reporter(self),
            )
        except Exception as exc:
            metrics.record_run(resources.taxonomy, category, None, time.monotonic() - started, time.time())
            log.error("task.train.failed", error=f"{type(exc).__name__}: {exc}")
            raise
        metrics.record_run(resources.taxonomy, category, result, time.monotonic() - started, time.time())
        log.info("task.train.finished", status=result["status"], version=result.get("version"))
        return result


@shared_task(bind=True, name=IMPORT_LABELS_TASK)
def import_labels(self: Task, labels: str | Sequence[Mapping[str, Any]], label_format: str = "jsonl") -> dict[str, Any]:
    """Import labels: a list of label dicts, or the s3:// URI of a file in `label_format`
    (jsonl, csv or label-studio: trainer.labels.LABEL_FORMATS).

    Returns accepted/rejected counts and every rejection (line number, reason); a retrain is
    enqueued for categories that reached settings.retrain_after_labels new labels.
    """
    if not isinstance(labels, str | list):
        raise TypeError("labels must be a list of label objects or an s3:// URI of a JSONL file")
    resources = resources_of(self.app)
    with structlog.contextvars.bound_contextvars(task_id=self.request.id or ""):
        summary = service.import_and_trigger(resources, labels, app=self.app, label_format=label_format)
        log.info("task.labels.imported", accepted=summary["accepted"], rejected=summary["rejected"])
        return summary


@shared_task(bind=True, name=RETRAIN_ALL_TASK)
def retrain_all(self: Task) -> dict[str, Any]:
    """Celery beat: enqueue a training for every category that has labels."""
    resources = resources_of(self.app)
    with structlog.contextvars.bound_contextvars(task_id=self.request.id or ""):
        enqueued = service.retrain_all(self.app, resources)
        log.info("task.retrain_all", categories=sorted(enqueued))
        return enqueued


@shared_task(bind=True, name=BACKFILL_TASK)
def backfill_category(self: Task, category: str, version: str, start_after: str = "") -> dict[str, Any]:
    """After a promotion: enqueue the re-extraction of a chunk of the category's stale results.

    Hands over to a copy of itself for the next chunk (later when the backfill queue is full), so
    a training queued meanwhile is not held up; progress goes to the result backend (Flower).
    """
    resources = resources_of(self.app)
    settings = resources.settings
    with structlog.contextvars.bound_contextvars(category=category, task_id=self.request.id or ""):
        runner = backfill.Backfill(self.app, resources.store, resources.redis, settings,
                                   settings.backfill_rate_per_s)

        def progress(stats: backfill.BackfillStats) -> None:
            if self.request.id and stats.checked % 50 == 0:
                self.update_state(state="PROGRESS", meta=stats.as_dict())

        outcome = backfill.backfill_chunk(runner, resources.registry, category, version, start_after,
                                          progress=progress)
        if outcome.next_after is not None:
            self.app.send_task(BACKFILL_TASK, countdown=outcome.delay_s or None, kwargs={
                "category": category, "version": version, "start_after": outcome.next_after})
        log.info("task.backfill.chunk", **outcome.as_dict())
        return outcome.as_dict()
