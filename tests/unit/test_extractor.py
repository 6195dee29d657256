"""The extraction service with in-memory fakes behind the real interfaces (no servers)."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from shelfsight.shared.registry import ModelRegistry
from shelfsight.shared.settings import Settings
from shelfsight.shared.storage import InMemoryObjectStore, TransientStorageError
from shelfsight.shared.streams import InMemoryPublisher
from shelfsight.shared.taxonomy import load_taxonomy
from shelfsight.worker.extractor import ExtractionService
from shelfsight.worker.model_cache import ModelCache
from tests.helpers import jpeg_bytes, png_bytes

BUCKET = "shelfsight"


@pytest.fixture
def unit_settings() -> Settings:
    return Settings(
        bucket=BUCKET, allowed_image_buckets=[BUCKET], model_arch="shelfsight-tiny", model_weights="none",
        device="cpu", batch_size=4, batch_max_wait_ms=5, max_retries=2, retry_backoff_s=0.5,
        max_image_bytes=200_000, max_image_pixels=1_000_000,
    )


@pytest.fixture
def service(unit_settings: Settings) -> Iterator[ExtractionService]:
    store = InMemoryObjectStore()
    taxonomy = load_taxonomy(unit_settings.taxonomy_path)
    models = ModelCache(unit_settings, taxonomy, store, ModelRegistry(store, BUCKET))
    svc = ExtractionService(unit_settings, taxonomy, store, InMemoryPublisher(), models)
    yield svc
    svc.close()


def _event(product_id: str = "sku-1", category: str = "pans", key: str = "uploads/pans/sku-1.jpg", **extra) -> dict:
    return {"product_id": product_id, "category": category, "image": f"s3://{BUCKET}/{key}", **extra}


def test_result_has_every_attribute_with_distribution(service: ExtractionService) -> None:
    service.store.put(BUCKET, "uploads/pans/sku-1.jpg", jpeg_bytes(), "image/jpeg")
    outcome = service.process(_event(event_id="e-1"))
    assert outcome.status == "result", outcome
    record = json.loads(service.store.get(BUCKET, "results/pans/sku-1.json").body)
    assert record["schema_version"] == 2 and record["event_id"] == "e-1"
    assert record["model"]["mode"] == "zero_shot" and record["model"]["version"] == "zero-shot"
    assert set(record["attributes"]) == {"lid", "handle"}
    for result in record["attributes"].values():
        assert set(result["scores"]) == {"yes", "no"}
        assert sum(result["scores"].values()) == pytest.approx(1.0, abs=1e-3)
        assert result["confidence"] == max(result["scores"].values())
        assert result["scores"][result["value"]] == result["confidence"]
        assert result["needs_review"] is True  # zero-shot: no validated threshold, always reviewed
    assert record["needs_review"] is True
    assert record["image"]["width"] == 96 and record["image"]["etag"]
    streams = [s for s, _ in service.publisher.entries]
    assert streams == ["shelfsight:results", "shelfsight:review"]  # review only once the result is written


@pytest.fixture(params=[True, False], ids=["conditional-writes", "read-then-write"])
def any_write_mode(request, unit_settings: Settings) -> Iterator[ExtractionService]:
    settings = unit_settings.model_copy(update={"s3_conditional_writes": request.param})
    store = InMemoryObjectStore()
    taxonomy = load_taxonomy(settings.taxonomy_path)
    svc = ExtractionService(settings, taxonomy, store, InMemoryPublisher(),
                            ModelCache(settings, taxonomy, store, ModelRegistry(store, BUCKET)))
    yield svc
    svc.close()


def test_same_event_twice_keeps_one_identical_result(any_write_mode: ExtractionService) -> None:
    service = any_write_mode
    service.store.put(BUCKET, "uploads/pans/sku-1.jpg", jpeg_bytes(), "image/jpeg")
    event = _event(event_id="e-1", submitted_at="2026-11-27T10:00:00Z")  # a redelivery is the same payload
    assert service.process(event).status == "result"
    first = service.store.get(BUCKET, "results/pans/sku-1.json").body
    puts = service.store.puts
    assert service.process(event).status == "result"
    assert service.store.get(BUCKET, "results/pans/sku-1.json").body == first
    assert service.store.puts == puts  # nothing rewritten
    assert service.store.list_keys(BUCKET, "results/") == ["results/pans/sku-1.json"]


def test_older_event_never_overwrites_newer_result(any_write_mode: ExtractionService) -> None:
    service = any_write_mode
    service.store.put(BUCKET, "uploads/pans/sku-1.jpg", jpeg_bytes((10, 10, 10)), "image/jpeg")
    newer = _event(event_id="new", submitted_at="2026-11-27T12:00:00Z")
    older = _event(event_id="old", submitted_at="2026-11-27T11:00:00Z")
    assert service.process(newer).status == "result"
    assert service.process(older).status == "superseded"
    assert json.loads(service.store.get(BUCKET, "results/pans/sku-1.json").body)["event_id"] == "new"
    newest = _event(event_id="newest", submitted_at="2026-11-27T13:00:00Z")
    assert service.process(newest).status == "result"  # a newer event does replace it
    assert json.loads(service.store.get(BUCKET, "results/pans/sku-1.json").body)["event_id"] == "newest"


@pytest.mark.parametrize(
    ("event", "setup", "code"),
    [
        ({"product_id": "sku-1"}, None, "malformed_event"),
        ("{not json", None, "malformed_event"),
        (_event(category="shoes"), None, "unknown_category"),
        ({**_event(), "image": "s3://other-bucket/x.jpg"}, None, "image_source_not_allowed"),
        (_event(key="uploads/missing.jpg"), None, "object_missing"),
        (_event(), b"this is not an image", "undecodable_image"),
        (_event(), jpeg_bytes()[:200], "undecodable_image"),
        (_event(), b"\xff" * 300_000, "image_too_large"),
        (_event(), jpeg_bytes(size=(1200, 1000)), "image_too_many_pixels"),
        ({**_event(), "product_id": "x" * 20_000}, None, "event_too_large"),
    ],
)
def test_bad_input_becomes_a_specific_dead_letter(service: ExtractionService, event, setup, code) -> None:
    if setup is not None:
        service.store.put(BUCKET, "uploads/pans/sku-1.jpg", setup, "image/jpeg")
    outcome = service.process(event)
    assert outcome.status == "dead_letter" and outcome.detail["error_code"] == code
    letter = json.loads(service.store.get(BUCKET, outcome.detail["record"]).body)
    assert letter["error_code"] == code and letter["message"] and letter["attempts"] == 1
    assert letter["event"] == event or letter["event"].get("truncated")
    stream, fields = service.publisher.entries[-1]
    assert stream == "shelfsight:dead-letters" and fields["error_code"] == code
    # the service keeps going: a good event right after still gets a result
    service.store.put(BUCKET, "uploads/pans/good.jpg", jpeg_bytes(), "image/jpeg")
    assert service.process(_event(product_id="good", key="uploads/pans/good.jpg")).status == "result"


def test_png_with_alpha_and_greyscale_are_accepted(service: ExtractionService) -> None:
    for mode in ("RGBA", "L", "P"):
        key = f"uploads/pans/{mode}.png"
        service.store.put(BUCKET, key, png_bytes(mode), "image/png")
        assert service.process(_event(product_id=f"p{mode}", key=key)).status == "result"


class FlakyStore(InMemoryObjectStore):
    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures = failures

    def get(self, bucket, key, max_bytes=None):
        if key.startswith("uploads/") and self.failures > 0:
            self.failures -= 1
            raise TransientStorageError(f"s3://{bucket}/{key}: 503")
        return super().get(bucket, key, max_bytes)


def test_transient_errors_retry_with_backoff_then_dead_letter(unit_settings: Settings) -> None:
    store = FlakyStore(failures=10)
    taxonomy = load_taxonomy(unit_settings.taxonomy_path)
    svc = ExtractionService(unit_settings, taxonomy, store, InMemoryPublisher(),
                            ModelCache(unit_settings, taxonomy, store, ModelRegistry(store, BUCKET)))
    store.put(BUCKET, "uploads/pans/sku-1.jpg", jpeg_bytes(), "image/jpeg")
    delays = []
    for attempt in (1, 2):
        outcome = svc.process(_event(event_id="e"), attempt=attempt)
        assert outcome.status == "retry"
        delays.append(outcome.retry_in)
    # exponential from retry_backoff_s (0.5 s), with jitter: between half and all of 0.5 s, then of 1 s
    assert 0.25 <= delays[0] <= 0.5 and 0.5 <= delays[1] <= 1.0
    final = svc.process(_event(event_id="e"), attempt=3)
    assert final.status == "dead_letter" and final.detail["error_code"] == "transient_exhausted"
    store.failures = 0
    assert svc.process(_event(event_id="e2"), attempt=1).status == "result"
    svc.close()


def test_outcomes_are_counted_in_scrapeable_prometheus_metrics(service: ExtractionService) -> None:
    import urllib.request

    from prometheus_client import REGISTRY

    from shelfsight.shared.dev.services import free_port
    from shelfsight.worker.metrics import serve_metrics

    def count(name: str, **labels: str) -> float:
        return REGISTRY.get_sample_value(name, labels) or 0.0

    before_ok = count("shelfsight_events_total", outcome="result", category="pans")
    before_dead = count("shelfsight_dead_letters_total", code="object_missing")
    service.store.put(BUCKET, "uploads/pans/sku-1.jpg", jpeg_bytes(), "image/jpeg")
    service.process(_event())
    service.process(_event(product_id="gone", key="uploads/gone.jpg"))
    assert count("shelfsight_events_total", outcome="result", category="pans") == before_ok + 1
    assert count("shelfsight_dead_letters_total", code="object_missing") == before_dead + 1
    port = free_port()
    serve_metrics(port)
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    assert 'shelfsight_events_total{category="pans",outcome="result"}' in body
    assert "shelfsight_batch_size_bucket" in body


def _jpeg_payload(service: ExtractionService, data: bytes):
    from shelfsight.worker.extractor import Prepared

    model = service.models.get("pans")
    return Prepared(pixels=None, jpeg=data, size=model.image_size, width=96, height=80)


def test_batched_jpeg_decode_path_agrees_with_pil_path(service: ExtractionService) -> None:
    """The nvJPEG path (here torchvision's decoder on CPU) scores like the PIL path."""
    data = jpeg_bytes((30, 140, 220), size=(120, 90))
    model = service.models.get("pans")
    via_pil = service.batcher.run("pans", service.prepare(data, model), timeout=30)
    via_batch_decode = service.batcher.run("pans", _jpeg_payload(service, data), timeout=30)
    for name, probs in via_pil.probabilities.items():
        assert via_batch_decode.probabilities[name] == pytest.approx(probs, abs=0.02)


def test_undecodable_jpeg_in_batch_decode_falls_back_and_fails_alone(service: ExtractionService) -> None:
    from shelfsight.worker.extractor import Rejected

    good = jpeg_bytes()
    truncated = jpeg_bytes(size=(200, 200))[:300]
    futures = [service.batcher.submit("pans", _jpeg_payload(service, d)) for d in (good, truncated, good)]
    assert futures[0].result(timeout=30).probabilities and futures[2].result(timeout=30).probabilities
    with pytest.raises(Rejected) as caught:
        futures[1].result(timeout=30)
    assert caught.value.code == "undecodable_image"


def test_unloadable_model_on_a_fresh_worker_falls_back_instead_of_dead_lettering(unit_settings: Settings) -> None:
    from tests.helpers import publish_tiny_version

    store = InMemoryObjectStore()
    settings = unit_settings.model_copy(update={"bucket": BUCKET})
    good = publish_tiny_version(settings, store, "pans", seed=1)
    broken = publish_tiny_version(settings, store, "pans", seed=2)
    store.delete(BUCKET, f"models/pans/{broken}/model.safetensors")  # CURRENT names weights that are gone
    taxonomy = load_taxonomy(settings.taxonomy_path)
    svc = ExtractionService(settings, taxonomy, store, InMemoryPublisher(),
                            ModelCache(settings, taxonomy, store, ModelRegistry(store, BUCKET)))
    store.put(BUCKET, "uploads/pans/sku-1.jpg", jpeg_bytes(), "image/jpeg")
    # no last good version in this worker: the version below CURRENT in the promotion history serves
    assert svc.process(_event(event_id="m"), attempt=1).status == "result"
    record = json.loads(store.get(BUCKET, "results/pans/sku-1.json").body)
    assert record["model"]["version"] == good and record["model"]["mode"] == "fine_tuned"
    assert svc.models.get("pans").served_for == broken
    svc.close()
