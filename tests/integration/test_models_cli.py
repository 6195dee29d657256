"""`shelfsight models` against a real S3 (moto) and Redis: list, show, promote, rollback."""

from __future__ import annotations

import json

import redis

from shelfsight.shared.registry import ModelRegistry
from shelfsight.shared.settings import Settings
from shelfsight.shared.storage import S3ObjectStore
from tests.helpers import run_cli, upload_fake_version

_run = run_cli


def test_models_cli_list_show_promote_rollback(settings: Settings, store: S3ObjectStore, capsys) -> None:
    registry = ModelRegistry(store, settings.bucket, settings.models_prefix)
    upload_fake_version(registry, "v1", 0.6)
    upload_fake_version(registry, "v2", 0.9)
    pubsub = redis.Redis.from_url(settings.broker_url).pubsub()
    pubsub.subscribe(settings.model_events_channel)
    pubsub.get_message(timeout=5)

    assert _run(settings, "models", "show", "pans") == 1  # nothing promoted yet: a clear error
    assert "no promoted model" in capsys.readouterr().err
    assert _run(settings, "models", "promote", "pans", "v1") == 0
    assert _run(settings, "models", "promote", "pans", "v2", "--reason", "looks good") == 0
    assert [json.loads(pubsub.get_message(timeout=5)["data"])["version"] for _ in range(2)] == ["v1", "v2"]
    capsys.readouterr()
    assert _run(settings, "models", "list") == 0  # a table for people
    header, *rows = capsys.readouterr().out.strip().splitlines()
    assert header.split() == ["category", "serving", "versions", "test", "macro-F1", "reason"]
    assert [row.split() for row in rows] == [["pans", "v2", "2", "0.9000", "looks", "good"]]
    assert _run(settings, "models", "list", "--json") == 0  # a JSON list for programs
    [row] = json.loads(capsys.readouterr().out)
    assert row["category"] == "pans" and row["current"] == "v2" and row["test_macro_f1"] == 0.9
    assert row["versions"] == 2 and row["reason"] == "looks good"
    assert _run(settings, "models", "show", "pans", "--json") == 0
    assert json.loads(capsys.readouterr().out)["version"] == "v2"
    assert _run(settings, "models", "rollback", "pans") == 0
    assert registry.current("pans").version == "v1"
    assert json.loads(pubsub.get_message(timeout=5)["data"]) == {"category": "pans", "version": "v1"}
    assert _run(settings, "models", "promote", "pans", "v7") == 1
