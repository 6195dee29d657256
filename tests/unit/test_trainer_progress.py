"""Training progress reaches Celery task state (what Flower and `train --wait` show)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from shelfsight.trainer import tasks
from shelfsight.trainer.tasks import PROGRESS_INTERVAL_S, _reporter


class FakeTask:
    def __init__(self) -> None:
        self.request = SimpleNamespace(id="task-1")
        self.states: list[tuple[str, dict]] = []

    def update_state(self, state: str, meta: dict) -> None:
        self.states.append((state, meta))


def test_epochs_and_phases_always_reported_steps_throttled(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = SimpleNamespace(now=1000.0)
    monkeypatch.setattr(tasks, "time", SimpleNamespace(monotonic=lambda: clock.now))
    task = FakeTask()
    report = _reporter(task)  # type: ignore[arg-type]
    report({"phase": "loading"})
    for step in range(1, 50):  # a step every 0.3 intervals: at most one update per interval
        clock.now += 0.3 * PROGRESS_INTERVAL_S
        report({"phase": "step", "epoch": 1, "step": step, "loss": 1.0 / step})
    report({"phase": "epoch", "epoch": 1, "train_loss": 0.5, "val_loss": 0.6})  # same instant: still goes out
    report({"phase": "evaluating"})
    assert all(state == "PROGRESS" for state, _ in task.states)
    phases = [meta["phase"] for _, meta in task.states]
    assert phases[0] == "loading" and phases[-2:] == ["epoch", "evaluating"]
    # the first step a full interval after the last update, then every fourth (1.2 intervals apart)
    assert [meta["step"] for _, meta in task.states if meta["phase"] == "step"] == list(range(4, 50, 4))
    assert task.states[-2][1]["val_loss"] == 0.6
