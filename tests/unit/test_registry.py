"""Registry promote/rollback, the champion/challenger gate, and the `models` CLI."""

from __future__ import annotations

import json

import pytest
import redis

from shelfsight.shared.registry import Manifest, ModelRegistry
from shelfsight.shared.settings import Settings
from shelfsight.shared.storage import InMemoryObjectStore, S3ObjectStore
from tests.helpers import run_cli
from shelfsight.trainer import service
from shelfsight.trainer.train import EvalResult


def _manifest(version: str, f1: float = 0.5) -> Manifest:
    return Manifest(category="pans", version=version, architecture="shelfsight-tiny", base_weights="none",
                    taxonomy_version="t", values={"lid": ["yes", "no"]}, captions={"lid": ["with lid", "without lid"]},
                    weights_sha256="0" * 64, weights_bytes=1, metrics={"test_macro_f1": f1})


def _upload(registry: ModelRegistry, version: str, f1: float = 0.5) -> None:
    registry.upload_version(_manifest(version, f1), b"w")


def test_promote_and_rollback_flip_current_and_keep_history() -> None:
    registry = ModelRegistry(InMemoryObjectStore(), "b", "models")
    for version in ("v1", "v2", "v3"):
        _upload(registry, version)
    assert registry.current("pans") is None
    registry.promote("pans", "v1", "first")
    registry.promote("pans", "v2", "better")
    assert registry.current("pans").version == "v2" and registry.current("pans").previous == "v1"
    back = registry.rollback("pans")
    assert back.version == "v1" and "rollback from v2" in back.reason
    assert [p.version for p in registry.history("pans")] == ["v1", "v2", "v1"]
    assert registry.versions("pans") == ["v1", "v2", "v3"]
    with pytest.raises(ValueError, match="nothing to roll back to"):
        registry.rollback("pans")  # v1 was the first: a second rollback does not toggle back to v2


def test_repeated_rollbacks_walk_back_through_promotions() -> None:
    registry = ModelRegistry(InMemoryObjectStore(), "b", "models")
    for version in ("v1", "v2", "v3"):
        _upload(registry, version)
        registry.promote("pans", version, "better")
    assert registry.rollback("pans").version == "v2"
    assert registry.rollback("pans").version == "v1"
    registry.promote("pans", "v3", "fixed")
    assert registry.serving_stack("pans") == ["v1", "v3"]
    assert registry.rollback("pans").version == "v1"


def test_promoting_an_unknown_version_fails_and_changes_nothing() -> None:
    store = InMemoryObjectStore()
    registry = ModelRegistry(store, "b", "models")
    _upload(registry, "v1")
    registry.promote("pans", "v1", "first")
    with pytest.raises(Exception, match="does not exist"):
        registry.promote("pans", "v9", "typo")
    assert registry.current("pans").version == "v1"


def _result(*f1s: float) -> EvalResult:
    return EvalResult(loss=0.0, attributes={f"a{i}": {"macro_f1": f, "accuracy": f} for i, f in enumerate(f1s)})


def test_gate_promotes_only_a_challenger_at_least_margin_better() -> None:
    assert service.gate(_result(0.5), None, None, None, 0.0) == (True, "first model of the category (no champion)")
    promote, reason = service.gate(_result(0.8, 0.6), _result(0.7, 0.7), "v1", None, 0.0)
    assert promote and "0.7000 ≥ champion v1 0.7000" in reason  # mean over attributes: 0.7 vs 0.7
    promote, reason = service.gate(_result(0.72), _result(0.7), "v1", None, 0.05)
    assert not promote and "0.7200 < champion v1 0.7000 + margin 0.0500" in reason
    promote, reason = service.gate(_result(0.5), None, "v1", "champion v1 could not be loaded: bad sha", 0.0)
    assert promote and "could not be loaded" in reason


_run = run_cli


@pytest.mark.integration
def test_models_cli_list_show_promote_rollback(settings: Settings, store: S3ObjectStore, capsys) -> None:
    registry = ModelRegistry(store, settings.bucket, settings.models_prefix)
    _upload(registry, "v1", 0.6)
    _upload(registry, "v2", 0.9)
    pubsub = redis.Redis.from_url(settings.broker_url).pubsub()
    pubsub.subscribe(settings.model_events_channel)
    pubsub.get_message(timeout=5)

    assert _run(settings, "models", "show", "pans") == 1  # nothing promoted yet: a clear error
    assert "no promoted model" in capsys.readouterr().err
    assert _run(settings, "models", "promote", "pans", "v1") == 0
    assert _run(settings, "models", "promote", "pans", "v2", "--reason", "looks good") == 0
    assert [json.loads(pubsub.get_message(timeout=5)["data"])["version"] for _ in range(2)] == ["v1", "v2"]
    capsys.readouterr()
    assert _run(settings, "models", "list", "--json") == 0
    [row] = json.loads(capsys.readouterr().out)
    assert row["category"] == "pans" and row["current"] == "v2" and row["test_macro_f1"] == 0.9
    assert row["versions"] == 2 and row["reason"] == "looks good"
    assert _run(settings, "models", "show", "pans", "--json") == 0
    assert json.loads(capsys.readouterr().out)["version"] == "v2"
    assert _run(settings, "models", "rollback", "pans") == 0
    assert registry.current("pans").version == "v1"
    assert json.loads(pubsub.get_message(timeout=5)["data"]) == {"category": "pans", "version": "v1"}
    assert _run(settings, "models", "promote", "pans", "v7") == 1
