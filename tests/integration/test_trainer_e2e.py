"""The train task end to end against a real Redis and S3 (moto): labels in, promoted model out."""

from __future__ import annotations

import hashlib
import json

import pytest
import redis
from safetensors.torch import load as load_safetensors

from shelfsight.shared import training_jobs
from shelfsight.shared.celery_app import IMPORT_LABELS_TASK, TRAIN_TASK
from shelfsight.shared.dev.samples import generate_products, upload_products
from shelfsight.shared.model_factory import create_clip
from shelfsight.shared.registry import ModelRegistry
from shelfsight.shared.settings import Settings
from shelfsight.shared.storage import S3ObjectStore
from shelfsight.trainer import service


def _app(settings: Settings):
    from shelfsight.trainer.app import create_trainer_app

    app = create_trainer_app(settings)
    app.loader.import_default_modules()  # registers the trainer's tasks, as a worker start does
    return app



def _labels(store: S3ObjectStore, settings: Settings, count: int = 30) -> list[dict]:
    products = generate_products("pans", count, seed=0, size=64)
    uris = upload_products(products, store, settings.bucket, "uploads")
    return [{"product_id": p.product_id, "category": "pans", "image": uri, "attributes": p.attributes}
            for p, uri in zip(products, uris, strict=True)]


def _lenient(settings: Settings) -> Settings:
    """Tiny random-init models on a handful of test images: let the gate promote whatever it sees
    (the gate itself is tested in tests/unit/test_training_gate.py and test_training_champion.py)."""
    return settings.model_copy(update={"promotion_min_test_examples": 1, "promotion_margin": -1.0,
                                       "promotion_attribute_tolerance": 1.0})


def test_train_task_end_to_end_then_a_worse_challenger_is_kept_out(settings: Settings, store: S3ObjectStore) -> None:
    settings = _lenient(settings)
    app = _app(settings)
    imported = app.tasks[IMPORT_LABELS_TASK].apply(args=[_labels(store, settings)]).get()
    assert imported["accepted"] == 30 and imported["rejected"] == 0 and imported["retrain"] == {}

    client = redis.Redis.from_url(settings.broker_url)
    pubsub = client.pubsub()
    pubsub.subscribe(settings.model_events_channel)
    assert pubsub.get_message(timeout=5)["type"] == "subscribe"

    result = app.tasks[TRAIN_TASK].apply(args=["pans"]).get()
    assert result["status"] == "promoted" and result["promoted"] is True
    assert "zero-shot" in result["reason"] and result["champion_version"] == "zero-shot"
    assert len(result["macro_f1_gain_interval"]) == 2
    version = result["version"]

    registry = ModelRegistry(store, settings.bucket, settings.models_prefix)
    assert registry.current("pans").version == version
    manifest = registry.manifest("pans", version)
    weights = store.get(settings.bucket, registry.key("pans", version, "model.safetensors")).body
    assert manifest.weights_sha256 == hashlib.sha256(weights).hexdigest()
    assert manifest.weights_bytes == len(weights)
    assert manifest.values == {"lid": ["yes", "no"], "handle": ["yes", "no"]}
    assert manifest.captions == {"lid": ["with lid", "without lid"], "handle": ["with handle", "without handle"]}
    assert manifest.architecture == "shelfsight-tiny" and manifest.parent_version is None
    # reproducible from the manifest: the test set's snapshot, base weights, software, seeds, device
    assert manifest.test_set_key == registry.key("pans", "test-sets", f"{manifest.test_set_sha256}.json")
    snapshot = store.get(settings.bucket, manifest.test_set_key).body
    assert hashlib.sha256(snapshot).hexdigest() == manifest.test_set_sha256
    assert len(manifest.base_weights_sha256 or "") == 64 and manifest.framing == "letterbox"
    assert {"torch", "open_clip", "timm", "shelfsight", "commit"} <= set(manifest.software)
    assert manifest.precision == "fp32" and manifest.device == "cpu" and manifest.image_size == 64
    assert (manifest.split_seed, manifest.train_seed) == (settings.train_split_seed, settings.train_seed)
    assert manifest.labels_snapshot["count"] == 30 and len(manifest.labels_snapshot["sha256"]) == 64
    assert manifest.metrics["test_macro_f1"] == pytest.approx(result["test_macro_f1"])
    assert manifest.metrics["decision"]["promoted"] is True
    assert sum(result["splits"].values()) == 30 and min(result["splits"].values()) >= 1

    # the weights load through the one factory, verified by sha256, and equal the saved tensors
    bundle = create_clip(manifest.architecture, registry.weights_uri("pans", version), store=store,
                         expected_sha256=manifest.weights_sha256)
    saved = load_safetensors(weights)
    assert all(bundle.model.state_dict()[k].equal(v) for k, v in saved.items())

    # the report sits beside the checkpoint
    keys = set(store.list_keys(settings.bucket, registry.key("pans", version) + "/"))
    for name in ("report.json", "loss_curves.png", "champion_vs_challenger.png", "confusion_lid.png",
                 "confusion_handle.png"):
        assert registry.key("pans", version, name) in keys, name
    png = store.get(settings.bucket, registry.key("pans", version, "loss_curves.png")).body
    assert png.startswith(b"\x89PNG")
    report = json.loads(store.get(settings.bucket, registry.key("pans", version, "report.json")).body)
    assert report["decision"]["promoted"] is True and report["test"]["champion_version"] == "zero-shot"
    assert report["test"]["champion"]["macro_f1"] == pytest.approx(result["champion_test_macro_f1"])
    assert set(report["decision"]["bootstrap"]["mean"]) == {"challenger", "champion", "delta", "lower", "upper"}
    assert set(report["decision"]["attribute_deltas"]) == {"lid", "handle"}
    assert len(report["training"]["history"]) == settings.train_epochs

    message = pubsub.get_message(timeout=5)
    assert message and json.loads(message["data"]) == {"category": "pans", "version": version}

    test_set = store.get(settings.bucket, registry.key("pans", "TEST_SET")).body

    # a challenger that cannot beat champion + margin is uploaded but not promoted, and says why
    strict = settings.model_copy(update={"promotion_margin": 2.0})
    second = _app(strict).tasks[TRAIN_TASK].apply(args=["pans"]).get()
    assert second["status"] == "kept_champion" and second["promoted"] is False
    assert second["champion_version"] == version and second["champion_test_macro_f1"] is not None
    assert f"champion {version}" in second["reason"] and "< margin 2.0000" in second["reason"]
    assert registry.current("pans").version == version
    loser = registry.manifest("pans", second["version"])
    assert loser.metrics["decision"]["promoted"] is False and "margin 2.0000" in loser.metrics["decision"]["reason"]
    assert loser.parent_version == version
    assert loser.test_set_key == manifest.test_set_key  # frozen: the same snapshot
    assert store.get(settings.bucket, registry.key("pans", "TEST_SET")).body == test_set  # not rewritten
    assert pubsub.get_message(timeout=0.5) is None  # nothing announced
    assert client.get(training_jobs.lock_key("pans")) is None  # lock released


def test_a_second_training_while_locked_is_skipped_and_says_by_whom(settings: Settings, store: S3ObjectStore) -> None:
    app = _app(settings)
    resources = app.shelfsight_trainer
    assert training_jobs.acquire_training_lock(resources.redis, "pans", "other-task", 60) is None
    result = app.tasks[TRAIN_TASK].apply(args=["pans"]).get()
    assert result["status"] == "skipped" and "other-task" in result["reason"]
    assert training_jobs.training_lock_holder(resources.redis, "pans") == "other-task"  # not stolen, not released


def test_enough_new_labels_enqueue_one_training(settings: Settings, store: S3ObjectStore) -> None:
    eager = settings.model_copy(update={"retrain_after_labels": 20})
    app = _app(eager)
    labels = _labels(store, eager, count=12)
    first = app.tasks[IMPORT_LABELS_TASK].apply(args=[labels[:10]]).get()
    assert first["retrain"] == {}
    second = app.tasks[IMPORT_LABELS_TASK].apply(args=[labels]).get()  # 10 + 12 >= 20
    queued = second["retrain"]["pans"]
    assert queued["queued"] is True
    resources = app.shelfsight_trainer
    assert training_jobs.training_lock_holder(resources.redis, "pans") == queued["task_id"]
    broker = redis.Redis.from_url(eager.broker_url)
    assert broker.llen(eager.training_queue) == 1
    assert int(broker.get(service.new_labels_key("pans"))) == 0
    # asking again while it is queued returns the same task instead of queueing a second
    again = training_jobs.enqueue_training(app, resources.redis, resources.taxonomy, "pans")
    assert again.queued is False and again.task_id == queued["task_id"]
    assert broker.llen(eager.training_queue) == 1


def test_import_task_reads_a_csv_file_from_s3_when_told_its_format(settings: Settings, store: S3ObjectStore) -> None:
    app = _app(settings)
    labels = _labels(store, settings, count=3)
    rows = ["product_id,category,image,lid,handle"] + [
        f"{x['product_id']},pans,{x['image']},{x['attributes']['lid']},{x['attributes']['handle']}" for x in labels]
    rows.append("p-bad,pans,s3://nowhere/x.jpg,maybe,")  # an unknown value: rejected, named by its line
    store.put(settings.bucket, "incoming/labels.csv", "\n".join(rows).encode(), "text/csv")
    uri = f"s3://{settings.bucket}/incoming/labels.csv"

    as_jsonl = app.tasks[IMPORT_LABELS_TASK].apply(args=[uri]).get()
    assert as_jsonl["accepted"] == 0  # read as JSONL, a CSV is nothing but rejections

    imported = app.tasks[IMPORT_LABELS_TASK].apply(args=[uri], kwargs={"label_format": "csv"}).get()
    assert imported["accepted"] == 3 and imported["rejected"] == 1, imported
