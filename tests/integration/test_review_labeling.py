"""The labeling loop against real Redis and S3: the review stream (as the worker writes it) ->
`shelfsight review export --format label-studio` -> labeled in Label Studio (simulated in its
export format) -> `shelfsight labels import --format label-studio` -> labels stored, retrain enqueued."""

from __future__ import annotations

import json
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import redis

from shelfsight.shared.dev.samples import generate_products, upload_products
from shelfsight.shared.logs import configure_logging
from shelfsight.shared.settings import Settings
from shelfsight.shared.storage import S3ObjectStore
from shelfsight.shared.streams import RedisStreamPublisher, redis_client
from shelfsight.shared.training_jobs import training_lock_holder
from shelfsight.trainer.labels import load_category_labels
from tests.helpers import run_cli
from tests.label_studio_format import labeled_export, validate_import

T0 = datetime(2026, 11, 27, 9, 0, tzinfo=UTC)


@pytest.fixture(autouse=True)
def _logs_to_stderr() -> None:
    configure_logging("console", "INFO")


def _publish_review_entries(settings: Settings, uris: list[str], uncertainties: list[float]) -> None:
    """What the worker XADDs for a result that needs review (the fields of the review-stream contract)."""
    publisher = RedisStreamPublisher(redis_client(settings), settings.stream_maxlen)
    for n, (uri, uncertainty) in enumerate(zip(uris, uncertainties, strict=True)):
        pid = f"pan-{n}"
        publisher.publish(settings.review_stream, {
            "event_id": f"ev-{n}", "product_id": pid, "category": "pans", "image": uri,
            "result": f"s3://{settings.bucket}/results/pans/{pid}.json", "model_version": "20261127T080000Z-test",
            "uncertainty": str(uncertainty),
            "attributes": {"lid": {"value": "yes", "confidence": 1 - uncertainty / 2, "needs_review": True,
                                   "scores": {"yes": 1 - uncertainty / 2, "no": uncertainty / 2}},
                           "handle": {"value": "no", "confidence": 0.99, "needs_review": False,
                                      "scores": {"yes": 0.01, "no": 0.99}}},
            "submitted_at": (T0 + timedelta(minutes=n)).isoformat(),
        })


def test_label_studio_round_trip_stores_the_labels_and_enqueues_a_retrain(
    settings: Settings, store: S3ObjectStore, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    settings = settings.model_copy(update={"retrain_after_labels": 3})
    products = generate_products("pans", 4, seed=5, size=64)
    uris = upload_products(products, store, settings.bucket, "uploads")
    _publish_review_entries(settings, uris, [0.3, 0.9, 0.6, 0.8])

    assert run_cli(settings, "review", "list", "--json") == 0
    assert [i["product_id"] for i in json.loads(capsys.readouterr().out)] == ["pan-1", "pan-3", "pan-2", "pan-0"]

    out = tmp_path / "export"
    assert run_cli(settings, "review", "export", "--format", "label-studio", "--limit", "3", "--out", str(out),
                   "--json") == 0
    written = json.loads(capsys.readouterr().out)["categories"]["pans"]
    tasks = json.loads(Path(written["file"]).read_text())
    config = Path(written["config"]).read_text()
    assert validate_import(tasks, config) == []  # Label Studio would import this file into a project with this config
    assert [t["data"]["product_id"] for t in tasks] == ["pan-1", "pan-3", "pan-2"]  # the budget: the 3 most uncertain

    truth = {f"pan-{n}": p.attributes for n, p in enumerate(products)}
    export_file = tmp_path / "project-7-at-2026-11-27.json"
    export_file.write_text(json.dumps(labeled_export(tasks, {t["data"]["product_id"]: [
        {"choices": truth[t["data"]["product_id"]], "updated_at": "2026-11-27T10:00:00Z"}] for t in tasks})))
    assert run_cli(settings, "labels", "import", "--format", "label-studio", str(export_file), "--json") == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["accepted"], summary["rejected"], summary["per_category"]) == (3, 0, {"pans": 3})

    stored = load_category_labels(store, settings.bucket, settings.labels_prefix, "pans")
    assert {r.product_id: r.attributes for r in stored.records} == {pid: truth[pid] for pid in ("pan-1", "pan-2", "pan-3")}
    retrain = summary["retrain"]["pans"]
    client = redis.Redis.from_url(settings.broker_url)
    assert retrain["queued"] is True
    assert training_lock_holder(client, "pans") == retrain["task_id"]  # the training task was sent for pans
    assert client.llen(settings.training_queue) == 1

    # labeled since their entries: out of the queue; the one left is the one nobody labeled
    assert run_cli(settings, "review", "list", "--json") == 0
    assert [i["product_id"] for i in json.loads(capsys.readouterr().out)] == ["pan-0"]


def test_presigned_export_loads_over_https_and_a_csv_imports_with_line_numbers(
    settings: Settings, store: S3ObjectStore, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    products = generate_products("pans", 2, seed=6, size=64)
    uris = upload_products(products, store, settings.bucket, "uploads")
    _publish_review_entries(settings, uris, [0.5, 0.7])
    out = tmp_path / "export"
    assert run_cli(settings, "review", "export", "--presign", "600", "--out", str(out)) == 0
    tasks = json.loads((out / "pans.tasks.json").read_text())
    assert validate_import(tasks, (out / "pans.config.xml").read_text()) == []
    first = tasks[0]["data"]
    assert first["image"].startswith("http") and first["image_uri"] == uris[1]
    with urllib.request.urlopen(first["image"], timeout=10) as response:  # noqa: S310 - our moto endpoint
        assert response.read() == store.get(*first["image_uri"][5:].split("/", 1)).body

    capsys.readouterr()
    assert run_cli(settings, "review", "list", "--category", "pans", "--limit", "1") == 0
    table = capsys.readouterr().out.splitlines()
    assert len(table) == 2 and table[1].split()[:4] == ["1", "0.7000", "pans", "pan-1"] and "lid=yes (0.65)" in table[1]
    assert run_cli(settings, "review", "export", "--format", "jsonl", "--out", str(out)) == 0
    lines = [json.loads(line) for line in (out / "pans.jsonl").read_text().splitlines()]
    assert [(i["product_id"], i["uncertainty"]) for i in lines] == [("pan-1", 0.7), ("pan-0", 0.5)]

    csv_file = tmp_path / "labels.csv"
    csv_file.write_text("product_id,category,image,lid,handle\n"
                        f"pan-0,pans,{uris[0]},yes,no\n"
                        f"pan-1,pans,{uris[1]},maybe,\n")
    capsys.readouterr()
    assert run_cli(settings, "labels", "import", str(csv_file)) == 1  # format from the extension
    err = capsys.readouterr().err
    assert f"{csv_file}:3: rejected: unknown value 'maybe'" in err
    stored = load_category_labels(store, settings.bucket, settings.labels_prefix, "pans")
    assert {r.product_id: r.attributes for r in stored.records} == {"pan-0": {"lid": "yes", "handle": "no"}}
