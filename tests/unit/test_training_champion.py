"""The champion the gate compares with: zero-shot first, never skipped on a transient error; and the
data the run trains on: bad images skipped and listed, transient S3 errors retried."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save as save_safetensors

from shelfsight.shared.model_factory import create_clip, sha256_bytes
from shelfsight.shared.registry import Manifest
from shelfsight.shared.storage import InMemoryObjectStore, StoredObject, TransientStorageError
from shelfsight.trainer import gate
from shelfsight.trainer.category_data import (
    TransientFetchError,
    fetch_training_data,
    head_spec,
    split_labels,
    zero_shot_spec,
)
from shelfsight.trainer.dataset import LabeledImages
from shelfsight.trainer.evaluate import evaluate
from shelfsight.trainer.resources import TrainerResources
from shelfsight.trainer.train import EpochStats, FitResult, TrainConfig, fit
from tests.unit.training_helpers import BUCKET, add_cups, resources


class FlakyStore(InMemoryObjectStore):
    """Raises TransientStorageError on GETs of keys matching `flaky`, `failures` times per key (-1: always)."""

    def __init__(self) -> None:
        super().__init__()
        self.flaky: str | None = None
        self.failures = 0
        self.seen: Counter[str] = Counter()

    def get(self, bucket: str, key: str, max_bytes: int | None = None) -> StoredObject:
        if self.flaky and self.flaky in key:
            self.seen[key] += 1
            if self.failures < 0 or self.seen[key] <= self.failures:
                raise TransientStorageError(f"s3://{bucket}/{key}: 503 SlowDown")
        return super().get(bucket, key, max_bytes)


def _data(res: TrainerResources, weights: str | None = None) -> tuple[Any, Any, Any]:
    spec = head_spec(res.taxonomy, "cups")
    labels = split_labels(res, "cups")
    bundle = create_clip("shelfsight-tiny", weights or res.settings.model_weights)
    return spec, bundle, fetch_training_data(res, "cups", labels, spec, draft_size=bundle.image_size)


@pytest.fixture(scope="module")
def good_zero_shot(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Base weights whose zero-shot captions ("a red cup", ...) already tell the colours apart."""
    tmp = tmp_path_factory.mktemp("base")
    res = resources(tmp)
    add_cups(res, 40, start=1000)
    spec, bundle, data = _data(res)
    train = data.splits["train"]
    everything = LabeledImages([*train.images, *data.splits["val"].images, *data.splits["test"].images],
                               {a: train.targets[a] + data.splits["val"].targets[a] + data.splits["test"].targets[a]
                                for a in train.targets}, [])
    everything.ids = [str(i) for i in range(len(everything.images))]
    config = TrainConfig.from_settings(res.settings, epochs=6, lr=2e-3, warmup_steps=1, augment=False)
    fit(bundle, zero_shot_spec(res.taxonomy, "cups"), everything, None, config)
    path = tmp / "base.safetensors"
    path.write_bytes(save_safetensors({k: v.contiguous() for k, v in bundle.model.state_dict().items()}))
    return path


def _sabotaged_fit(bundle: Any, *_: Any, **__: Any) -> FitResult:
    """A 'fine-tuning' that wrecks the image tower: every image looks the same afterwards."""
    with torch.no_grad():
        for p in bundle.model.visual.parameters():
            p.zero_()
    return FitResult(state_dict=bundle.model.state_dict(), history=[EpochStats(1, 1.0, 1.0, 0.0, 0.0)], best_epoch=1,
                     best_val_loss=1.0, stopped_early=False, steps=1, seconds=0.0)


def test_a_first_model_worse_than_zero_shot_is_refused(
    tmp_path: Path, good_zero_shot: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    res = resources(tmp_path, model_weights=str(good_zero_shot), promotion_min_test_examples=5)
    add_cups(res, 50)
    spec, bundle, data = _data(res)
    monkeypatch.setattr(gate, "fit", _sabotaged_fit)
    outcome = gate.train_and_gate(res, "cups", spec, bundle, data, lambda _: None)
    assert outcome.champion_version == "zero-shot" and outcome.current_version is None
    assert outcome.champion.attributes["colour"]["macro_f1"] > 0.9  # zero-shot knows the colours
    assert not outcome.promote, outcome.reason  # the old gate: "first model of the category (no champion)"
    assert "zero-shot (the base model)" in outcome.reason and "refused" in outcome.reason


def test_a_first_model_that_beats_zero_shot_on_evidence_is_promoted(tmp_path: Path) -> None:
    res = resources(tmp_path, promotion_min_test_examples=5, train_epochs=6, train_lr=2e-3, train_augment=False)
    labels = add_cups(res, 60)
    for label in labels:  # only colour is labeled: the judged attribute
        label["attributes"].pop("handle")
    res.store.delete(BUCKET, res.store.list_keys(BUCKET, "labels/")[0])
    from shelfsight.trainer.labels import import_labels

    import_labels(labels, store=res.store, bucket=BUCKET, labels_prefix="labels", taxonomy=res.taxonomy,
                  max_bytes=1 << 20)
    spec, bundle, data = _data(res)
    outcome = gate.train_and_gate(res, "cups", spec, bundle, data, lambda _: None)
    assert outcome.champion_version == "zero-shot"
    assert outcome.decision_.checks["attributes"] == ["colour"]
    assert outcome.promote, outcome.reason
    assert outcome.decision_.checks["bootstrap"]["mean"]["lower"] >= res.settings.promotion_margin


def _publish_tiny_version(res: TrainerResources, version: str, wrong_sha: bool = False) -> None:
    bundle = create_clip("shelfsight-tiny", "none")
    weights = save_safetensors({k: v.contiguous() for k, v in bundle.model.state_dict().items()})
    spec = head_spec(res.taxonomy, "cups")
    manifest = Manifest(category="cups", version=version, architecture="shelfsight-tiny", base_weights="none",
                        taxonomy_version=res.taxonomy.version, values=spec.values, captions=spec.captions,
                        weights_sha256="0" * 64 if wrong_sha else sha256_bytes(weights), weights_bytes=len(weights))
    res.registry.upload_version(manifest, weights)
    res.registry.promote("cups", version, reason="test")


def test_a_transient_error_fetching_the_champion_is_retried_then_fails_the_run_never_skips_the_gate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = FlakyStore()
    res = resources(tmp_path, store=store)
    add_cups(res, 20)
    _publish_tiny_version(res, "v1")
    spec, bundle, data = _data(res)
    store.flaky, store.failures = "v1/model.safetensors", 2  # two 503s, then the weights come
    champion = gate.choose_champion(res, "cups", data.splits["test"], spec, base=bundle)
    assert champion.version == "v1" and champion.current == "v1"
    assert store.seen[res.registry.key("cups", "v1", "model.safetensors")] == 3

    store.seen.clear()
    store.failures = -1  # S3 keeps failing: the run fails, nothing is trained or promoted
    monkeypatch.setattr(gate, "fit", lambda *a, **k: pytest.fail("trained although the gate cannot run"))
    with pytest.raises(TransientFetchError, match="the gate cannot run, nothing is promoted"):
        gate.train_and_gate(res, "cups", spec, bundle, data, lambda _: None)
    assert store.seen[res.registry.key("cups", "v1", "model.safetensors")] == res.settings.max_retries + 1
    assert res.registry.current("cups").version == "v1"


def test_a_champion_that_cannot_be_loaded_for_good_gives_way_as_on_the_workers(tmp_path: Path) -> None:
    res = resources(tmp_path)
    add_cups(res, 20)
    _publish_tiny_version(res, "v1")
    _publish_tiny_version(res, "v2", wrong_sha=True)  # CURRENT, but its weights fail their sha256
    spec, bundle, data = _data(res)
    champion = gate.choose_champion(res, "cups", data.splits["test"], spec, base=bundle)
    assert champion.version == "v1" and champion.current == "v2"  # the version workers fall back to
    assert "v2 could not be loaded" in champion.notes[0] and "sha256" in champion.notes[0]


def test_a_bad_labeled_image_is_skipped_and_listed_not_fatal(tmp_path: Path) -> None:
    res = resources(tmp_path)
    add_cups(res, 12)
    res.store.put(BUCKET, "uploads/cups/c0003.png", b"\x89PNG\r\n\x1a\n but then nothing", "image/png")
    labels = split_labels(res, "cups")
    assert "c0003" not in labels.assignments and len(labels.records) == 11
    [message] = labels.skipped
    assert message.startswith("c0003: s3://shelfsight/uploads/cups/c0003.png: undecodable_image")
    data = fetch_training_data(res, "cups", labels, head_spec(res.taxonomy, "cups"), draft_size=64)
    assert data.skipped == labels.skipped and sum(data.sizes.values()) == 11
    for split in data.splits.values():  # every image that is left decodes
        assert all(image.size for image in split.images)


def test_transient_errors_fetching_images_are_retried(tmp_path: Path) -> None:
    store = FlakyStore()
    res = resources(tmp_path, store=store)
    add_cups(res, 12)
    store.flaky, store.failures = "uploads/cups/", 1  # every image: one 503, then fine
    labels = split_labels(res, "cups")
    assert len(labels.records) == 12 and labels.skipped == []
    assert set(store.seen.values()) == {2}
    store.flaky, store.failures = "uploads/cups/c0005", -1
    store.seen.clear()
    with pytest.raises(TransientFetchError, match="c0005.png"):
        split_labels(res, "cups")


def test_zero_shot_scoring_uses_the_taxonomy_template(tmp_path: Path) -> None:
    res = resources(tmp_path)
    assert zero_shot_spec(res.taxonomy, "cups").captions["colour"] == ["a red cup", "a blue cup"]
    add_cups(res, 10)
    spec, bundle, data = _data(res)
    champion = gate.choose_champion(res, "cups", data.splits["test"], spec, base=bundle)
    direct = evaluate(bundle, zero_shot_spec(res.taxonomy, "cups"), data.splits["test"], data_values=spec.values)
    assert champion.version == "zero-shot" and champion.result.predictions == direct.predictions
