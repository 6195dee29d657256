"""`extract_task_events` turns the extract task's Celery events off (or leaves them on) before the
worker's consumer builds its strategies; training's task keeps its own."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from shelfsight.shared.celery_app import EXTRACT_TASK
from shelfsight.shared.settings import Settings
from shelfsight.worker import tasks
from shelfsight.worker.app import create_worker_app


@pytest.mark.parametrize("events", [True, False])
def test_worker_init_applies_the_setting_to_the_extract_task(events: bool) -> None:
    app = create_worker_app(Settings(broker_url="memory://", result_backend="cache+memory://",
                                     extract_task_events=events))
    tasks._on_init(sender=SimpleNamespace(app=app))  # as WorkController.__init__ sends worker_init
    assert app.tasks[EXTRACT_TASK].send_events is events


def test_an_app_without_an_extraction_runtime_is_left_alone() -> None:
    tasks._on_init(sender=SimpleNamespace(app=SimpleNamespace()))  # a trainer's or a test's app: no error
