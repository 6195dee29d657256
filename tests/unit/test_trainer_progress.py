"""Training progress reaches Celery task state (what Flower and `train --wait` show)."""

from __future__ import annotations

from types import SimpleNamespace

from shelfsight.trainer.tasks import _reporter


class FakeTask:
    def __init__(self) -> None:
        self.request = SimpleNamespace(id="task-1")
        self.states: list[tuple[str, dict]] = []

    def update_state(self, state: str, meta: dict) -> None:
        self.states.append((state, meta))


def test_epochs_and_phases_always_reported_steps_throttled() -> None:
    task = FakeTask()
    report = _reporter(task)  # type: ignore[arg-type]
    report({"phase": "loading"})
    for step in range(1, 50):  # a burst of steps within one throttle interval
        report({"phase": "step", "epoch": 1, "step": step, "loss": 1.0 / step})
    report({"phase": "epoch", "epoch": 1, "train_loss": 0.5, "val_loss": 0.6})
    report({"phase": "evaluating"})
    phases = [meta["phase"] for _, meta in task.states]
    assert all(state == "PROGRESS" for state, _ in task.states)
    assert phases[0] == "loading" and phases[-2:] == ["epoch", "evaluating"]
    assert phases.count("step") <= 1  # throttled: the backend is not written 49 times
    assert task.states[-2][1]["val_loss"] == 0.6
