"""`shelfsight enqueue` on a real Redis: what it prints, and what lands on the queue."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import redis

from shelfsight.shared.cli import main
from shelfsight.shared.producer_cli import MAX_NOTIFICATION_BYTES
from shelfsight.shared.settings import Settings


def _env(monkeypatch: pytest.MonkeyPatch, settings: Settings) -> None:
    monkeypatch.setenv("SHELFSIGHT_BROKER_URL", settings.broker_url)
    monkeypatch.setenv("SHELFSIGHT_RESULT_BACKEND", settings.result_backend)


def _queued(settings: Settings) -> list[dict]:
    client = redis.Redis.from_url(settings.broker_url)
    return [json.loads(m) for m in client.lrange(settings.extract_queue, 0, -1)]


def test_enqueue_prints_the_event_id_and_queues_a_json_message(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    _env(monkeypatch, settings)
    assert main(["enqueue", "--product-id", "sku-9", "--category", "tops", "--image", "s3://uploads/tops/sku-9.jpg"]) == 0
    event_id = capsys.readouterr().out.strip()
    [message] = _queued(settings)
    assert message["content-type"] == "application/json"  # JSON-only serialisation on the wire
    assert message["headers"]["id"] == event_id and message["headers"]["task"] == "shelfsight.extract"
    assert main(["enqueue", "--product-id", "bad id", "--category", "tops", "--image", "s3://uploads/x.jpg"]) == 2
    assert "not enqueued" in capsys.readouterr().err
    assert len(_queued(settings)) == 1


def test_enqueue_from_s3_notification_file_with_size_limit(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, tmp_path: Path
) -> None:
    _env(monkeypatch, settings)
    record = {"eventName": "ObjectCreated:Put",
              "s3": {"bucket": {"name": "uploads"}, "object": {"key": "tops/sku-1.jpg", "sequencer": "01"}}}
    path = tmp_path / "n.json"
    path.write_text(json.dumps({"Records": [record, {**record, "eventName": "ObjectRemoved:Delete"}]}))
    assert main(["enqueue", "--s3-notification", str(path)]) == 0
    assert len(capsys.readouterr().out.split()) == 1 and len(_queued(settings)) == 1
    path.write_text(" " * (MAX_NOTIFICATION_BYTES + 1))
    assert main(["enqueue", "--s3-notification", str(path)]) == 2
    assert "exceeds" in capsys.readouterr().err


def test_enqueue_json_prints_the_event_ids_it_queued(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, tmp_path: Path
) -> None:
    _env(monkeypatch, settings)
    assert main(["enqueue", "--product-id", "sku-7", "--category", "tops", "--image", "s3://uploads/tops/sku-7.jpg",
                 "--event-id", "evt-7", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"event_ids": ["evt-7"]}
    record = {"eventName": "ObjectCreated:Put",
              "s3": {"bucket": {"name": "uploads"}, "object": {"key": "tops/sku-1.jpg", "sequencer": "01"}}}
    second = {**record, "s3": {**record["s3"], "object": {"key": "pans/p-2.jpg", "sequencer": "02"}}}
    path = tmp_path / "n.json"
    path.write_text(json.dumps({"Records": [record, second]}))
    assert main(["enqueue", "--s3-notification", str(path), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)["event_ids"]
    assert len(set(printed)) == 2 and {m["headers"]["id"] for m in _queued(settings)} == {"evt-7", *printed}


def test_enqueue_does_not_subscribe_to_a_result_per_message(settings: Settings) -> None:
    """Extraction keeps no Celery result: the producer must not hold a result subscription per event."""
    from shelfsight.shared.celery_app import create_celery_app
    from shelfsight.shared.enqueue import enqueue_upload

    app = create_celery_app(settings)
    event_id = enqueue_upload(app, product_id="sku-1", category="tops", image="s3://uploads/tops/sku-1.jpg")
    [message] = _queued(settings)
    assert message["headers"]["ignore_result"] is True
    client = redis.Redis.from_url(settings.result_backend)
    assert client.pubsub_numsub(f"celery-task-meta-{event_id}") == [(f"celery-task-meta-{event_id}".encode(), 0)]
    app.close()
