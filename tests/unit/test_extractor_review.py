"""The worker serves calibrated confidences and needs_review flags, and puts results that need
review on the review stream once their file is durable (issue 11). In-memory fakes, no servers."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from safetensors.torch import save as save_safetensors

from shelfsight.shared import clip_math
from shelfsight.shared.model_factory import create_clip, sha256_bytes
from shelfsight.shared.registry import Manifest, ModelRegistry
from shelfsight.shared.review import parse_entry
from shelfsight.shared.settings import Settings
from shelfsight.shared.storage import InMemoryObjectStore, TransientStorageError
from shelfsight.shared.streams import InMemoryPublisher
from shelfsight.shared.taxonomy import load_taxonomy
from shelfsight.worker import metrics
from shelfsight.worker.extractor import ExtractionService
from shelfsight.worker.model_cache import ModelCache
from tests.helpers import jpeg_bytes

BUCKET = "shelfsight"
IMAGE = "uploads/pans/sku-1.jpg"


class _Store(InMemoryObjectStore):
    """Fails every write under results/ while `fail_results` is set."""

    fail_results = False

    def put(self, bucket: str, key: str, body: bytes, *args: Any, **kwargs: Any) -> str:
        if self.fail_results and key.startswith("results/"):
            raise TransientStorageError(f"s3://{bucket}/{key}: 503")
        return super().put(bucket, key, body, *args, **kwargs)


class _Publisher(InMemoryPublisher):
    """Refuses entries on the streams in `down`."""

    def __init__(self) -> None:
        super().__init__()
        self.down: set[str] = set()

    def publish(self, stream: str, fields: dict[str, Any]) -> str:
        if stream in self.down:
            raise ConnectionError("redis down")
        return super().publish(stream, fields)


@pytest.fixture
def settings() -> Settings:
    return Settings(bucket=BUCKET, allowed_image_buckets=[BUCKET], model_arch="shelfsight-tiny", model_weights="none",
                    device="cpu", batch_size=2, batch_max_wait_ms=1, max_retries=2, retry_backoff_s=0.01)


def _service(settings: Settings, store: InMemoryObjectStore, **calibration: Any) -> ExtractionService:
    """A service whose pans CURRENT is a tiny checkpoint whose manifest carries `calibration`."""
    bundle = create_clip("shelfsight-tiny", "none")
    weights = save_safetensors({k: v.contiguous() for k, v in bundle.model.state_dict().items()})
    taxonomy = load_taxonomy(settings.taxonomy_path)
    cat = taxonomy.category("pans")
    registry = ModelRegistry(store, BUCKET, settings.models_prefix)
    registry.upload_version(Manifest(
        category="pans", version="v1", architecture="shelfsight-tiny", base_weights="none",
        taxonomy_version=taxonomy.version, values={n: a.value_names for n, a in cat.attributes.items()},
        captions={n: a.captions() for n, a in cat.attributes.items()}, weights_sha256=sha256_bytes(weights),
        weights_bytes=len(weights), **calibration,
    ), weights)
    registry.promote("pans", "v1", reason="test")
    store.put(BUCKET, IMAGE, jpeg_bytes(), "image/jpeg")
    return ExtractionService(settings, taxonomy, store, _Publisher(), ModelCache(settings, taxonomy, store, registry))


@pytest.fixture
def flagged(settings: Settings) -> Iterator[ExtractionService]:
    """lid at T = 3 and never reviewed (threshold 0), handle always reviewed."""
    svc = _service(settings, _Store(), temperatures={"lid": 3.0},
                   review_thresholds={"lid": 0.0, "handle": clip_math.REVIEW_ALL})
    yield svc
    svc.close()


def _event(event_id: str = "e-1") -> dict[str, Any]:
    return {"event_id": event_id, "product_id": "sku-1", "category": "pans", "image": f"s3://{BUCKET}/{IMAGE}"}


def test_the_worker_serves_softmax_of_logits_over_the_manifests_temperature(flagged: ExtractionService) -> None:
    model = flagged.models.get("pans")
    assert model.temperatures == {"lid": 3.0} and model.review_thresholds["handle"] == clip_math.REVIEW_ALL
    pixels = torch.randn(3, 3, model.image_size, model.image_size, generator=torch.Generator().manual_seed(0))
    calibrated = model.score(pixels)
    raw = dataclasses.replace(model, temperatures={}).score(pixels)
    # log-probabilities are the logits up to a per-row constant, which softmax ignores
    assert torch.allclose(calibrated["lid"], (raw["lid"].log() / 3).softmax(-1), atol=1e-5)
    assert not torch.allclose(calibrated["lid"], raw["lid"])
    assert torch.equal(calibrated["handle"], raw["handle"])  # no temperature: T = 1


def test_a_result_carries_needs_review_per_attribute_and_overall_and_goes_to_review(
    flagged: ExtractionService,
) -> None:
    assert flagged.process(_event()).status == "result"
    record = json.loads(flagged.store.get(BUCKET, "results/pans/sku-1.json").body)
    assert record["schema_version"] == 2
    assert record["attributes"]["lid"]["needs_review"] is False
    assert record["attributes"]["handle"]["needs_review"] is True  # the value is still given
    assert record["attributes"]["handle"]["value"] in {"yes", "no"}
    assert record["needs_review"] is True
    streams = [stream for stream, _ in flagged.publisher.entries]
    assert streams == ["shelfsight:results", "shelfsight:review"]  # after the results entry, i.e. the write
    review = flagged.publisher.entries[1][1]
    assert set(review) == {"event_id", "product_id", "category", "image", "result", "model_version",
                           "uncertainty", "attributes", "submitted_at"}
    assert all(isinstance(v, str) for v in review.values())
    assert review["result"] == f"s3://{BUCKET}/results/pans/sku-1.json" and review["model_version"] == "v1"
    attributes = json.loads(review["attributes"])
    assert attributes["handle"] == {k: record["attributes"]["handle"][k]
                                    for k in ("value", "confidence", "needs_review", "scores")}
    expected = clip_math.product_uncertainty(
        {a: torch.tensor([list(r["scores"].values())]) for a, r in record["attributes"].items()})
    # computed with the batch from unrounded probabilities; the file's scores have 4 decimals
    assert float(review["uncertainty"]) == pytest.approx(float(expected[0]), abs=2e-4)
    item = parse_entry("1-0", review)  # what `shelfsight review` reads back
    assert item.product_id == "sku-1" and item.result == review["result"] and set(item.attributes) == {"lid", "handle"}


def test_no_review_entry_when_nothing_needs_review(settings: Settings) -> None:
    svc = _service(settings, _Store(), review_thresholds={"lid": 0.0, "handle": 0.0})
    try:
        assert svc.process(_event()).status == "result"
        assert json.loads(svc.store.get(BUCKET, "results/pans/sku-1.json").body)["needs_review"] is False
        assert [stream for stream, _ in svc.publisher.entries] == ["shelfsight:results"]
    finally:
        svc.close()


def test_an_old_manifest_without_thresholds_is_never_reviewed(settings: Settings) -> None:
    svc = _service(settings, _Store())  # written before issue 11: T = 1, no thresholds
    try:
        assert svc.process(_event()).status == "result"
        record = json.loads(svc.store.get(BUCKET, "results/pans/sku-1.json").body)
        assert record["needs_review"] is False
        assert not any(a["needs_review"] for a in record["attributes"].values())
    finally:
        svc.close()


def test_no_review_entry_before_the_result_is_durable(flagged: ExtractionService) -> None:
    flagged.store.fail_results = True  # type: ignore[attr-defined]
    assert flagged.process(_event()).status == "retry"
    assert flagged.publisher.entries == []
    flagged.store.fail_results = False  # type: ignore[attr-defined]
    assert flagged.process(_event(), attempt=2, fresh=False).status == "result"
    assert [stream for stream, _ in flagged.publisher.entries] == ["shelfsight:results", "shelfsight:review"]


def test_a_review_stream_outage_never_undoes_a_written_result(flagged: ExtractionService) -> None:
    flagged.publisher.down.add("shelfsight:review")  # type: ignore[attr-defined]
    failures = metrics.STREAM_PUBLISH_FAILURES.labels(stream="review")
    before = failures._value.get()
    assert flagged.process(_event()).status == "result"
    assert failures._value.get() == before + 1  # counted, and the result stands
    assert json.loads(flagged.store.get(BUCKET, "results/pans/sku-1.json").body)["needs_review"] is True
    assert [stream for stream, _ in flagged.publisher.entries] == ["shelfsight:results"]
