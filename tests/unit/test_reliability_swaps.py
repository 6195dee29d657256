"""Issue 8, hot swaps and delivery settings: CURRENT by identity and compare-and-swap, failed
versions backed off with the last good one serving, visibility per kind of consumer, and the
extract task taking any message shape."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from shelfsight.shared import registry as registry_module
from shelfsight.shared.celery_app import TRAINING_UNACKED_KEY, create_celery_app
from shelfsight.shared.registry import ModelRegistry
from shelfsight.shared.settings import Settings
from shelfsight.shared.storage import InMemoryObjectStore
from shelfsight.shared.taxonomy import load_taxonomy
from shelfsight.worker.model_cache import ModelCache
from tests.helpers import publish_tiny_version, upload_fake_version

BUCKET = "models-test"


def _settings(**overrides: object) -> Settings:
    return Settings(bucket=BUCKET, model_arch="shelfsight-tiny", model_weights="none", device="cpu", **overrides)


class CountingStore(InMemoryObjectStore):
    def __init__(self) -> None:
        super().__init__()
        self.weight_reads = 0

    def get(self, bucket, key, max_bytes=None):
        if key.endswith("model.safetensors"):
            self.weight_reads += 1
        return super().get(bucket, key, max_bytes)


def test_a_version_that_fails_to_load_is_backed_off_while_the_last_good_serves(monkeypatch) -> None:
    settings = _settings(model_retry_backoff_s=60.0)
    store = CountingStore()
    taxonomy = load_taxonomy(settings.taxonomy_path)
    good = publish_tiny_version(settings, store, "pans", seed=1)
    cache = ModelCache(settings, taxonomy, store, ModelRegistry(store, BUCKET))
    assert cache.get("pans").version == good
    bad = publish_tiny_version(settings, store, "pans", seed=2, corrupt_sha=True)
    reads = store.weight_reads
    for _ in range(5):  # five polls: old code downloaded the bad weights five times
        assert cache.refresh("pans") is False
    assert store.weight_reads == reads + 1 and cache.get("pans").version == good
    # once the back-off has passed it is tried again (it may have been a transient failure)
    clock = [0.0]
    real_monotonic = __import__("time").monotonic
    monkeypatch.setattr("shelfsight.worker.model_cache.time.monotonic", lambda: real_monotonic() + clock[0])
    clock[0] = 61.0
    assert cache.refresh("pans") is False and store.weight_reads == reads + 2
    assert bad != good


def test_a_fresh_worker_serves_the_previous_version_when_current_will_not_load() -> None:
    settings = _settings()
    store = InMemoryObjectStore()
    taxonomy = load_taxonomy(settings.taxonomy_path)
    good = publish_tiny_version(settings, store, "pans", seed=1)
    bad = publish_tiny_version(settings, store, "pans", seed=2, corrupt_sha=True)
    model = ModelCache(settings, taxonomy, store, ModelRegistry(store, BUCKET)).get("pans")
    # old code: the load error escaped get(): every event of the category was dead-lettered
    assert (model.version, model.served_for) == (good, bad)


def test_current_is_compare_and_swapped_so_history_and_pointer_agree() -> None:
    store = InMemoryObjectStore()
    registry = ModelRegistry(store, BUCKET)
    for version in ("v1", "v2", "v3"):
        upload_fake_version(registry, version)
    registry.promote("pans", "v1", "first")
    real_put = store.put
    raced = []

    def racing_put(bucket, key, body, content_type="application/json", **conditions):
        if key.endswith("/CURRENT") and not raced:  # another promoter lands between our read and write
            raced.append(True)
            registry.promote("pans", "v3", "the other promoter")
        return real_put(bucket, key, body, content_type, **conditions)

    store.put = racing_put  # type: ignore[method-assign]
    pointer = registry.promote("pans", "v2", "us")
    # old code: an unconditional PUT; CURRENT said v2 with previous v1 while the history said v1, v3, v2
    assert pointer.previous == "v3" and registry.current("pans").version == "v2"
    assert [p.version for p in registry.history("pans")] == ["v1", "v3", "v2"]
    assert [p.sequence for p in registry.history("pans")] == [1, 2, 3]


def test_history_is_ordered_by_sequence_not_by_the_promoters_clock(monkeypatch) -> None:
    store = InMemoryObjectStore()
    registry = ModelRegistry(store, BUCKET)
    for version in ("v1", "v2"):
        upload_fake_version(registry, version)
    registry.promote("pans", "v1", "first")

    class SlowClock(datetime):
        @classmethod
        def now(cls, tz=None):  # a promoter whose clock is a day behind
            return datetime.now(tz or UTC) - timedelta(days=1)

    monkeypatch.setattr(registry_module, "datetime", SlowClock)
    registry.promote("pans", "v2", "from a slow host")
    assert [p.version for p in registry.history("pans")] == ["v1", "v2"]  # old code: v2, v1 (by time)
    assert registry.serving_stack("pans") == ["v1", "v2"]
    assert registry.rollback("pans").version == "v1"


def test_extraction_and_training_have_their_own_visibility_and_unacked_index() -> None:
    settings = Settings()
    extract = create_celery_app(settings, tasks=("shelfsight.worker.tasks",)).conf.broker_transport_options
    training = create_celery_app(settings, tasks=("shelfsight.trainer.tasks",)).conf.broker_transport_options
    assert extract["visibility_timeout"] <= 600  # a dead worker's events are back within minutes
    # a sweep every tenth of the timeout (kombu's default sweep is every 100 s)
    assert extract["unacked_restore_interval"] * extract["unacked_restore_throttle"] <= extract["visibility_timeout"] / 5
    assert training["visibility_timeout"] >= 4 * 3600  # multi-hour runs are not restored mid-run
    assert extract.get("unacked_key", "unacked") == "unacked" and training["unacked_key"] == TRAINING_UNACKED_KEY
    for options in (extract, training):  # a half-open connection cannot hang a publish
        assert options["socket_timeout"] and options["socket_connect_timeout"] and options["socket_keepalive"]
        assert options["health_check_interval"] > 0


@pytest.mark.parametrize(
    ("args", "kwargs", "expected"),
    [
        (({"product_id": "p"},), {}, {"product_id": "p"}),
        ((), {"event": {"product_id": "p"}}, {"product_id": "p"}),
        (({"a": 1}, {"b": 2}), {}, {"args": [{"a": 1}, {"b": 2}], "kwargs": {}}),
        ((), {}, {"args": [], "kwargs": {}}),
        (("x",), {"stray": 1}, {"args": ["x"], "kwargs": {"stray": 1}}),
    ],
)
def test_any_message_shape_reaches_the_guard(args, kwargs, expected) -> None:
    from shelfsight.worker.tasks import extract, wire_payload

    assert wire_payload(args, kwargs) == expected
    assert extract.typing is False  # Celery's argument check would raise TypeError before the guard
