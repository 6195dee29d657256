"""Issue 8, memory bounded by design: a decode byte budget, one global limiter for cold model
loads with a memory reservation, no loads on batcher lanes, and `refresh` handing back the model
it installed."""

from __future__ import annotations

import io
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from PIL import Image

from shelfsight.shared.registry import ModelRegistry
from shelfsight.shared.settings import Settings
from shelfsight.shared.storage import InMemoryObjectStore
from shelfsight.shared.streams import InMemoryPublisher
from shelfsight.shared.taxonomy import load_taxonomy
from shelfsight.worker import model_cache as model_cache_module
from shelfsight.worker.extractor import ExtractionService
from shelfsight.worker.limits import ByteBudget, decoded_bytes_estimate
from shelfsight.worker.model_cache import ModelCache
from tests.helpers import publish_tiny_version

BUCKET = "shelfsight"


def _settings(**overrides: object) -> Settings:
    return Settings(bucket=BUCKET, allowed_image_buckets=[BUCKET], model_arch="shelfsight-tiny",
                    model_weights="none", device="cpu", batch_size=4, batch_max_wait_ms=5, **overrides)


def _png(size: tuple[int, int]) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, (10, 200, 30)).save(out, format="PNG")
    return out.getvalue()


def test_png_decodes_wait_for_the_byte_budget_instead_of_all_running_at_once() -> None:
    one_png = decoded_bytes_estimate(1200, 1000, "RGB", "PNG", 64)  # no draft for PNG: full size
    settings = _settings(decode_memory_bytes=int(one_png * 2.5), max_image_pixels=50_000_000)
    store = InMemoryObjectStore()
    taxonomy = load_taxonomy(settings.taxonomy_path)
    service = ExtractionService(settings, taxonomy, store, InMemoryPublisher(),
                                ModelCache(settings, taxonomy, store, ModelRegistry(store, BUCKET)))
    model = service.models.get("pans")
    data = _png((1200, 1000))
    with ThreadPoolExecutor(8) as pool:  # old code: eight full decodes in flight at once
        prepared = list(pool.map(lambda _: service.prepare(data, model), range(16)))
    assert all(p.pixels is not None and (p.width, p.height) == (1200, 1000) for p in prepared)
    assert service.decode_budget.peak <= settings.decode_memory_bytes
    assert service.decode_budget.peak >= one_png  # it did reserve what a decode costs
    assert service.decode_budget.in_use() == (0, 0)
    service.close()


def test_decode_estimates_take_jpeg_draft_into_account_and_nothing_else() -> None:
    full = decoded_bytes_estimate(4000, 3000, "RGB", "PNG", 224)
    assert full == 4000 * 3000 * 4 * 2
    assert decoded_bytes_estimate(4000, 3000, "RGB", "JPEG", 224) == full // 64  # 1/8 scale
    assert decoded_bytes_estimate(4000, 3000, "RGB", "WEBP", 224) == full
    assert decoded_bytes_estimate(1000, 1000, "I;16", "PNG", 224) > decoded_bytes_estimate(1000, 1000, "L", "PNG", 224)


def test_a_reservation_larger_than_the_budget_runs_alone() -> None:
    budget = ByteBudget(100)
    with budget.reserve(10_000):
        assert budget.in_use() == (100, 1)
        blocked = threading.Event()

        def second() -> None:
            with budget.reserve(1):
                blocked.set()

        thread = threading.Thread(target=second)
        thread.start()
        assert not blocked.wait(0.2)  # waits for the big one
    thread.join(timeout=5)
    assert blocked.is_set()


def test_cold_loads_of_many_categories_share_one_global_limit(monkeypatch) -> None:
    settings = _settings(model_load_concurrency=1)
    store = InMemoryObjectStore()
    for seed, category in enumerate(("pans", "tops"), start=1):
        publish_tiny_version(settings, store, category, seed=seed)
    running, peak, lock = 0, 0, threading.Lock()
    real = model_cache_module.create_clip

    def counting_create_clip(*args, **kwargs):
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        try:
            time.sleep(0.2)
            return real(*args, **kwargs)
        finally:
            with lock:
                running -= 1

    monkeypatch.setattr(model_cache_module, "create_clip", counting_create_clip)
    taxonomy = load_taxonomy(settings.taxonomy_path)
    cache = ModelCache(settings, taxonomy, store, ModelRegistry(store, BUCKET))
    with ThreadPoolExecutor(4) as pool:  # old code: one lock per category, both loads at once
        versions = list(pool.map(lambda c: cache.get(c).version, ("pans", "tops", "pans", "tops")))
    assert all(v.startswith("v") for v in versions)
    assert peak == 1


def test_get_returns_the_model_it_installed_even_if_evicted_at_once(monkeypatch) -> None:
    settings = _settings()
    store = InMemoryObjectStore()
    taxonomy = load_taxonomy(settings.taxonomy_path)
    cache = ModelCache(settings, taxonomy, store, ModelRegistry(store, BUCKET))
    real_install = cache._install

    def install_then_evicted(new, old):  # another thread's load evicts it before get() looks again
        real_install(new, old)
        with cache._lock:
            cache._active.pop(new.category, None)

    monkeypatch.setattr(cache, "_install", install_then_evicted)
    model = cache.get("pans")  # old code: KeyError here, an internal_error dead letter for the event
    assert model.category == "pans" and model.version == "zero-shot"


def test_a_batcher_lane_never_loads_a_model(monkeypatch) -> None:
    settings = _settings()
    store = InMemoryObjectStore()
    taxonomy = load_taxonomy(settings.taxonomy_path)
    service = ExtractionService(settings, taxonomy, store, InMemoryPublisher(),
                                ModelCache(settings, taxonomy, store, ModelRegistry(store, BUCKET)))
    model = service.models.get("pans")
    prepared = service.prepare(_png((80, 60)), model)
    prepared.model = model
    with service.models._lock:
        service.models._active.clear()  # evicted between the task thread's get() and the batch

    def no_loads_here(category):
        raise AssertionError(f"a lane tried to load {category}")

    monkeypatch.setattr(service.models, "get", no_loads_here)
    monkeypatch.setattr(service.models, "refresh", no_loads_here)
    scored = service.batcher.run("pans", prepared, timeout=30)  # old code: models.get() on the lane
    assert scored.model is model and set(scored.probabilities) == {h.name for h in model.heads}
    service.close()
