"""The model registry: promote, rollback as a stack, and refusing unknown versions."""

from __future__ import annotations

import pytest

from shelfsight.shared.registry import ModelRegistry
from shelfsight.shared.storage import InMemoryObjectStore, ObjectMissing
from tests.helpers import upload_fake_version


def test_promote_and_rollback_flip_current_and_keep_history() -> None:
    registry = ModelRegistry(InMemoryObjectStore(), "b", "models")
    for version in ("v1", "v2", "v3"):
        upload_fake_version(registry, version)
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
        upload_fake_version(registry, version)
        registry.promote("pans", version, "better")
    assert registry.rollback("pans").version == "v2"
    assert registry.rollback("pans").version == "v1"
    registry.promote("pans", "v3", "fixed")
    assert registry.serving_stack("pans") == ["v1", "v3"]
    assert registry.rollback("pans").version == "v1"


def test_promoting_an_unknown_version_fails_and_changes_nothing() -> None:
    store = InMemoryObjectStore()
    registry = ModelRegistry(store, "b", "models")
    upload_fake_version(registry, "v1")
    registry.promote("pans", "v1", "first")
    with pytest.raises(ObjectMissing, match=r"^s3://b/models/pans/v9/manifest\.json does not exist"):
        registry.promote("pans", "v9", "typo")
    assert [p.version for p in registry.history("pans")] == ["v1"]  # no promotion record either
    assert registry.current("pans").version == "v1"
