"""The worker's model cache: zero-shot until promoted, LRU within a memory budget, ordered swaps."""

from __future__ import annotations

from datetime import timedelta

import pytest

from shelfsight.shared.registry import ModelRegistry
from shelfsight.shared.settings import Settings
from shelfsight.shared.storage import InMemoryObjectStore
from shelfsight.shared.taxonomy import load_taxonomy
from shelfsight.worker.model_cache import ModelCache, module_bytes
from tests.helpers import publish_tiny_version


@pytest.fixture
def cache_parts():
    settings = Settings(bucket="models-test", model_arch="shelfsight-tiny", model_weights="none", device="cpu")
    store = InMemoryObjectStore()
    taxonomy = load_taxonomy(settings.taxonomy_path)
    return settings, store, taxonomy


def _cache(settings: Settings, store, taxonomy) -> ModelCache:
    return ModelCache(settings, taxonomy, store, ModelRegistry(store, settings.bucket, settings.models_prefix))


def test_zero_shot_until_a_version_is_promoted_then_fine_tuned(cache_parts) -> None:
    settings, store, taxonomy = cache_parts
    cache = _cache(settings, store, taxonomy)
    zero = cache.get("pans")
    assert zero.mode == "zero_shot" and [h.name for h in zero.heads] == ["lid", "handle"]
    version = publish_tiny_version(settings, store, "pans", seed=1)
    assert cache.refresh("pans") is True
    tuned = cache.get("pans")
    assert (tuned.mode, tuned.version) == ("fine_tuned", version)
    assert cache.refresh("pans") is False  # nothing newer: no reload
    with pytest.raises(KeyError):
        cache.get("shoes")


def test_lru_eviction_keeps_resident_models_within_budget(cache_parts) -> None:
    settings, store, taxonomy = cache_parts
    publish_tiny_version(settings, store, "pans", seed=1)
    publish_tiny_version(settings, store, "tops", seed=2)
    probe = _cache(settings, store, taxonomy).get("pans")
    one_model = probe.nbytes
    assert one_model >= module_bytes(probe.visual)  # a fine-tuned model owns its tower
    budget = settings.model_copy(update={"model_cache_bytes": int(one_model * 1.5)})
    cache = _cache(budget, store, taxonomy)
    cache.get("pans")
    cache.get("tops")  # over budget: the least recently used (pans) goes
    assert set(cache.active_versions()) == {"tops"}
    cache.get("pans")  # a miss reloads it, and now tops is evicted
    assert set(cache.active_versions()) == {"pans"}
    roomy = _cache(settings.model_copy(update={"model_cache_bytes": one_model * 3}), store, taxonomy)
    roomy.get("pans")
    roomy.get("tops")
    assert set(roomy.active_versions()) == {"pans", "tops"}


def test_swaps_follow_current_by_identity_whatever_the_clocks_say(cache_parts) -> None:
    settings, store, taxonomy = cache_parts
    registry = ModelRegistry(store, settings.bucket, settings.models_prefix)
    old = publish_tiny_version(settings, store, "pans", seed=1)
    old_pointer = registry.current("pans")
    new = publish_tiny_version(settings, store, "pans", seed=2)
    cache = _cache(settings, store, taxonomy)
    assert cache.get("pans").version == new
    # a promoter whose clock is a day slow names the old version: CURRENT is the truth (it is written
    # with compare-and-swap), so the worker follows it; comparing clocks would leave it on `new` for good
    assert old_pointer is not None
    slow = old_pointer.model_copy(update={"updated_at": old_pointer.updated_at - timedelta(days=1)})
    store.put(settings.bucket, registry.key("pans", "CURRENT"), slow.model_dump_json().encode())
    assert cache.refresh("pans") is True and cache.get("pans").version == old
    assert cache.refresh("pans") is False  # same identity: nothing to load


def test_a_version_trained_at_another_image_size_is_served_at_that_size() -> None:
    # SHELFSIGHT_TRAIN_IMAGE_SIZE reaches the manifest; workers serve each version at its own size
    settings = Settings(bucket="models-test", model_arch="shelfsight-effnet-lite0", model_weights="none",
                        device="cpu")
    store = InMemoryObjectStore()
    cache = _cache(settings, store, load_taxonomy(settings.taxonomy_path))
    assert cache.get("pans").image_size == 224  # zero-shot: the architecture's own
    publish_tiny_version(settings, store, "pans", seed=1, image_size=96)
    assert cache.refresh("pans") is True
    tuned = cache.get("pans")
    assert (tuned.mode, tuned.image_size) == ("fine_tuned", 96)
