"""The extract task sends every monitoring event Flower uses, but not `task-started`."""

from __future__ import annotations

from types import SimpleNamespace

from celery.utils.imports import symbol_by_name

from shelfsight.shared.celery_app import EXTRACT_TASK
from shelfsight.shared.settings import Settings
from shelfsight.worker.app import create_worker_app
from shelfsight.worker.task_request import ExtractRequest


class Eventer:
    enabled = True

    def __init__(self) -> None:
        self.sent: list[str] = []

    def send(self, type: str, **fields: object) -> None:
        self.sent.append(type)


def test_extract_request_skips_only_task_started() -> None:
    request = ExtractRequest.__new__(ExtractRequest)  # only what send_event reads
    request._eventer = Eventer()
    request._task = SimpleNamespace(send_events=True)
    request.id = "t1"
    for kind in ("task-received", "task-started", "task-succeeded", "task-failed", "task-retried"):
        request.send_event(kind)
    assert request._eventer.sent == ["task-received", "task-succeeded", "task-failed", "task-retried"]


def test_the_extract_task_uses_it() -> None:
    app = create_worker_app(Settings(broker_url="memory://", result_backend="cache+memory://"))
    app.loader.import_default_modules()  # as a worker does at start
    task = app.tasks[EXTRACT_TASK]
    assert symbol_by_name(task.Request) is ExtractRequest
