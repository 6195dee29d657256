"""`shelfsight labels import` and `shelfsight train --wait` against real Redis/S3 and a real worker."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import redis
from celery.contrib.testing.worker import start_worker

from shelfsight.shared.dev.samples import generate_products, upload_products
from shelfsight.shared.logs import configure_logging
from shelfsight.shared.registry import ModelRegistry
from shelfsight.shared.settings import Settings
from shelfsight.shared.storage import S3ObjectStore
from shelfsight.shared.training_jobs import training_lock_holder
from shelfsight.trainer.app import create_trainer_app
from shelfsight.trainer.labels import load_category_labels
from tests.helpers import run_cli


@pytest.fixture(autouse=True)
def _logs_to_stderr() -> None:
    """As the `shelfsight` entry point does: logs on stderr, so stdout carries only results."""
    configure_logging("console", "INFO")


_run = run_cli


def _label_file(tmp_path: Path, store: S3ObjectStore, settings: Settings, count: int, bad: bool) -> Path:
    products = generate_products("pans", count, seed=3, size=64)
    uris = upload_products(products, store, settings.bucket, "uploads")
    lines = [json.dumps({"product_id": p.product_id, "category": "pans", "image": u, "attributes": p.attributes})
             for p, u in zip(products, uris, strict=True)]
    if bad:
        lines.insert(1, json.dumps({"product_id": "x1", "category": "pans", "image": uris[0],
                                    "attributes": {"lid": "ajar"}}))
    path = tmp_path / "labels.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_labels_import_reports_rejected_lines_exits_1_and_keeps_the_good_ones(
    settings: Settings, store: S3ObjectStore, tmp_path: Path, capsys
) -> None:
    path = _label_file(tmp_path, store, settings, 5, bad=True)
    assert _run(settings, "labels", "import", str(path), "--json") == 1
    captured = capsys.readouterr()
    assert f"{path}:2: rejected: unknown value 'ajar'" in captured.err
    summary = json.loads(captured.out)
    assert summary["accepted"] == 5 and summary["rejected"] == 1
    stored = load_category_labels(store, settings.bucket, settings.labels_prefix, "pans")
    assert len(stored.records) == 5

    clean = _label_file(tmp_path, store, settings, 3, bad=False)
    assert _run(settings, "labels", "import", str(clean)) == 0
    assert _run(settings, "labels", "import", str(tmp_path / "missing.jsonl")) == 2


def test_labels_import_refuses_a_file_over_the_size_limit(settings: Settings, tmp_path: Path, capsys) -> None:
    small = settings.model_copy(update={"max_label_file_bytes": 10})
    path = tmp_path / "big.jsonl"
    path.write_text("x" * 11)
    assert _run(small, "labels", "import", str(path)) == 2
    assert "limit is 10" in capsys.readouterr().err


def test_train_wait_follows_a_real_worker_to_the_promoted_model(
    settings: Settings, store: S3ObjectStore, tmp_path: Path, capsys
) -> None:
    # tiny random-init models and 16 products: let the gate promote what it sees (tested elsewhere)
    settings = settings.model_copy(update={"promotion_min_test_examples": 1, "promotion_margin": -1.0,
                                           "promotion_attribute_tolerance": 1.0})
    assert _run(settings, "labels", "import", str(_label_file(tmp_path, store, settings, 16, bad=False))) == 0
    capsys.readouterr()
    app = create_trainer_app(settings)
    # second request while the first is queued: reported, not queued twice
    assert _run(settings, "train", "--category", "pans") == 0
    first_id = capsys.readouterr().out.strip()
    assert _run(settings, "train", "--category", "pans") == 1
    assert f"already queued or running: task {first_id}" in capsys.readouterr().err
    with start_worker(app, pool="solo", perform_ping_check=False, queues=[settings.training_queue],
                      shutdown_timeout=30):
        code = _run(settings, "train", "--category", "pans", "--wait", "--timeout", "240", "--json")
    captured = capsys.readouterr()
    assert code == 0, captured.err
    result = json.loads(captured.out)
    assert result["status"] == "promoted"
    registry = ModelRegistry(store, settings.bucket, settings.models_prefix)
    assert registry.current("pans").version == result["version"]
    assert training_lock_holder(redis.Redis.from_url(settings.broker_url), "pans") is None
    assert _run(settings, "train", "--category", "boats") == 2
