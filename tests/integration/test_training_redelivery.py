"""One run per category, also across redelivery: a lock token per execution, a finished marker per
task, promotion only while holding the lock. Real Redis and S3 (moto)."""

from __future__ import annotations

from typing import Any

import pytest
import redis

from shelfsight.shared import training_jobs
from shelfsight.shared.celery_app import TRAIN_TASK
from shelfsight.shared.dev.samples import generate_products, upload_products
from shelfsight.shared.registry import ModelRegistry
from shelfsight.shared.settings import Settings
from shelfsight.shared.storage import S3ObjectStore
from shelfsight.trainer import service
from tests.helpers import run_cli


@pytest.fixture
def lenient(settings: Settings, store: S3ObjectStore) -> Settings:
    """30 labeled pans; a gate that promotes what it sees (tiny random models; the gate is tested apart)."""
    lenient = settings.model_copy(update={"promotion_min_test_examples": 1, "promotion_margin": -1.0,
                                          "promotion_attribute_tolerance": 1.0})
    products = generate_products("pans", 30, seed=0, size=64)
    uris = upload_products(products, store, settings.bucket, "uploads")
    labels = [{"product_id": p.product_id, "category": "pans", "image": u, "attributes": p.attributes}
              for p, u in zip(products, uris, strict=True)]
    from shelfsight.trainer.app import create_trainer_app

    app = create_trainer_app(lenient)
    service.import_and_trigger(app.shelfsight_trainer, labels)
    return lenient


def _app(settings: Settings) -> Any:
    from shelfsight.trainer.app import create_trainer_app

    app = create_trainer_app(settings)
    app.loader.import_default_modules()
    return app


def test_a_redelivered_copy_of_a_finished_training_neither_retrains_nor_promotes_again(
    lenient: Settings, store: S3ObjectStore, capsys: pytest.CaptureFixture[str]
) -> None:
    app = _app(lenient)
    registry = ModelRegistry(store, lenient.bucket, lenient.models_prefix)
    first = app.tasks[TRAIN_TASK].apply(args=["pans"], task_id="task-1").get()
    assert first["status"] == "promoted"
    # the broker hands the same message out again (worker lost after the run, visibility timeout)
    again = app.tasks[TRAIN_TASK].apply(args=["pans"], task_id="task-1").get()
    assert again["status"] == "skipped" and "already ran to its end" in again["reason"]
    assert registry.versions("pans") == [first["version"]]  # the old lock let the copy retrain and promote
    assert [p.version for p in registry.history("pans")] == [first["version"]]
    assert training_jobs.training_lock_holder(redis.Redis.from_url(lenient.broker_url), "pans") is None

    # `models show` prints what reproduces the version
    capsys.readouterr()
    assert run_cli(lenient, "models", "show", "pans") == 0
    shown = capsys.readouterr().out
    for field in ("test_set_sha256", "base_weights_sha256", "framing", "letterbox", "precision", "device",
                  "split_seed", "train_seed", "software", "torch", "open_clip", "timm", "commit",
                  "macro-F1 gain", "interval", "zero-shot"):
        assert field in shown, field


def test_a_copy_redelivered_while_the_first_execution_runs_is_turned_away(lenient: Settings) -> None:
    app = _app(lenient)
    client = redis.Redis.from_url(lenient.broker_url)
    # the first execution of task-2 holds the lock with its own token
    assert training_jobs.claim_training_lock(client, "pans", "task-2", "first-token", 60) is None
    copy = app.tasks[TRAIN_TASK].apply(args=["pans"], task_id="task-2").get()
    assert copy["status"] == "skipped" and "another execution of task task-2" in copy["reason"]
    assert client.get(training_jobs.lock_key("pans")) == b"task-2#first-token"  # untouched
    assert training_jobs.training_lock_holder(client, "pans") == "task-2"


def test_a_run_that_lost_its_lock_does_not_promote(lenient: Settings, store: S3ObjectStore) -> None:
    app = _app(lenient)
    resources = app.shelfsight_trainer
    client = redis.Redis.from_url(lenient.broker_url)

    def steal_before_upload(meta: dict[str, Any]) -> None:
        if meta.get("phase") == "uploading":  # after the run's last refresh: another execution took over
            client.set(training_jobs.lock_key("pans"), "task-9#intruder")

    result = service.train_category(resources, "pans", owner="task-3", progress=steal_before_upload)
    assert result["status"] == "kept_champion" and result["promoted"] is False
    assert "no longer holds the pans training lock" in result["reason"]
    assert ModelRegistry(store, lenient.bucket, lenient.models_prefix).current("pans") is None
    assert client.get(training_jobs.lock_key("pans")) == b"task-9#intruder"  # not released: not ours
