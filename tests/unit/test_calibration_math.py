"""Calibration and abstention (issue 11): temperature scaling, ECE, the review threshold rule,
and the schemas that carry them (manifest fields, result schema v2, v1 still parsing)."""

from __future__ import annotations

import json

import pytest
import torch
from pydantic import SecretStr

from shelfsight.shared import clip_math
from shelfsight.shared.events import ResultRecord
from shelfsight.shared.model_signing import ManifestSignatureError, sign_manifest, verify_signature
from shelfsight.shared.registry import Manifest, ModelRegistry
from shelfsight.shared.storage import InMemoryObjectStore

IGNORE = clip_math.IGNORE


def _synthetic(n: int = 4000, classes: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and targets drawn from softmax(logits): perfectly calibrated at T = 1."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, classes, generator=generator) * 2
    targets = torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(1)
    return logits, targets


@pytest.mark.parametrize("true_t", [0.5, 1.0, 3.0])
def test_fit_temperature_recovers_a_known_temperature(true_t: float) -> None:
    logits, targets = _synthetic()
    # logits T times the calibrated ones need exactly T to be calibrated again
    fitted = clip_math.fit_temperature(logits * true_t, targets)
    assert fitted == pytest.approx(true_t, rel=0.1)


def test_fit_temperature_ignores_unlabeled_rows_and_defaults_to_one() -> None:
    logits, targets = _synthetic(n=2000)
    noisy = targets.clone()
    noisy[::2] = IGNORE
    garbage = logits.clone()
    garbage[::2] = torch.randn(1000, 4) * 50  # unlabeled rows must not pull T anywhere
    assert clip_math.fit_temperature(garbage * 3, noisy) == pytest.approx(3.0, rel=0.15)
    assert clip_math.fit_temperature(logits, torch.full((2000,), IGNORE)) == 1.0
    assert clip_math.fit_temperature(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long)) == 1.0


def test_fit_temperature_stays_within_bounds_on_separable_data() -> None:
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0]] * 10)
    targets = torch.tensor([0, 1] * 10)  # all right: the NLL keeps falling as T -> 0
    low, high = clip_math.TEMPERATURE_BOUNDS
    assert clip_math.fit_temperature(logits, targets) == pytest.approx(low, rel=1e-3)
    assert clip_math.fit_temperature(logits, 1 - targets) == pytest.approx(high, rel=1e-3)


def test_ece_drops_after_temperature_scaling_of_overconfident_logits() -> None:
    logits, targets = _synthetic()
    overconfident = logits * 4
    before = clip_math.expected_calibration_error(overconfident.softmax(-1), targets)
    t = clip_math.fit_temperature(overconfident, targets)
    after = clip_math.expected_calibration_error(clip_math.calibrated_probabilities(overconfident, t), targets)
    assert before > 0.15 and after < 0.04 and after < before / 4


def test_reliability_bins_count_every_labeled_prediction_and_the_last_bin_holds_one() -> None:
    probs = torch.tensor([[1.0, 0.0], [0.55, 0.45], [0.95, 0.05], [0.2, 0.8]])
    targets = torch.tensor([0, 1, 0, IGNORE])
    bins = clip_math.reliability_bins(probs, targets, bins=10)
    assert len(bins) == 10 and sum(b.count for b in bins) == 3
    assert bins[9].count == 2 and bins[9].accuracy == 1.0 and bins[9].confidence == pytest.approx(0.975)
    assert bins[5].count == 1 and bins[5].accuracy == 0.0
    ece = clip_math.expected_calibration_error(probs, targets, bins=10)
    assert ece == pytest.approx((2 * 0.025 + 1 * 0.55) / 3)
    assert clip_math.expected_calibration_error(torch.zeros(0, 2), torch.zeros(0, dtype=torch.long)) == 0.0


def test_score_heads_applies_each_attributes_temperature() -> None:
    head = clip_math.AttributeHead("lid", ("yes", "no"), clip_math.normalize(torch.eye(2)))
    other = clip_math.AttributeHead("handle", ("yes", "no"), clip_math.normalize(torch.eye(2)))
    features = torch.tensor([[1.0, 0.5]])
    raw = clip_math.score_heads(features, (head, other), 10.0)
    hot = clip_math.score_heads(features, (head, other), 10.0, temperatures={"lid": 2.0})
    logits = clip_math.attribute_logits(features, head.text_features, 10.0)
    assert torch.allclose(hot["lid"], (logits / 2).softmax(-1))
    assert hot["lid"][0, 0] < raw["lid"][0, 0]  # T > 1 softens
    assert torch.equal(hot["handle"], raw["handle"])  # no temperature: T = 1


def test_threshold_is_the_lowest_confidence_reaching_the_target_precision() -> None:
    # sorted by confidence: 10 right, then one wrong at 0.6, then right ones below
    conf = torch.tensor([0.99, 0.98, 0.97, 0.96, 0.95, 0.94, 0.93, 0.92, 0.91, 0.90, 0.60, 0.55, 0.50, 0.40])
    right = torch.tensor([1] * 10 + [0] + [1, 1, 0])
    # at 0.90: 10/10; at 0.60: 10/11 = 0.909; at 0.55: 11/12; at 0.50: 12/13 = 0.923; at 0.40: 12/14
    assert clip_math.threshold_for_precision(conf, right, 0.95) == pytest.approx(0.90)
    assert clip_math.threshold_for_precision(conf, right, 0.92) == pytest.approx(0.50)  # lowest, not first
    assert clip_math.threshold_for_precision(conf, right, 0.85) == pytest.approx(0.40)  # everything passes
    assert clip_math.threshold_for_precision(conf, right, 1.0) == pytest.approx(0.90)
    assert clip_math.threshold_for_precision(conf, right, 1.0, min_support=11) is None  # out of reach
    assert clip_math.threshold_for_precision(conf[:5], right[:5], 0.5) is None  # too few to judge
    assert clip_math.threshold_for_precision(torch.zeros(0), torch.zeros(0), 0.5) is None


def test_threshold_never_cuts_between_equal_confidences() -> None:
    conf = torch.tensor([0.9] * 12 + [0.8])
    right = torch.tensor([1] * 11 + [0] + [1])  # 11/12 at 0.9: a cut inside the tie would claim 11/11
    assert clip_math.threshold_for_precision(conf, right, 0.95) is None
    assert clip_math.threshold_for_precision(conf, right, 0.9) == pytest.approx(0.8)


# --- schemas --------------------------------------------------------------------------------------

V1_RESULT = {
    "schema_version": 1, "event_id": "e-1", "product_id": "sku-1", "category": "pans",
    "submitted_at": "2026-11-27T10:00:00Z",
    "image": {"uri": "s3://b/k.jpg", "etag": "x", "bytes": 10, "width": 2, "height": 2},
    "model": {"architecture": "a", "version": "zero-shot", "mode": "zero_shot", "weights_sha256": "0",
              "taxonomy_version": "1"},
    "attributes": {"lid": {"value": "yes", "confidence": 0.7, "scores": {"yes": 0.7, "no": 0.3}}},
    "timings": {"model_ms": 1.0},
}


def test_a_v1_result_file_still_parses_and_new_ones_are_v2() -> None:
    old = ResultRecord.model_validate_json(json.dumps(V1_RESULT))
    assert old.schema_version == 1 and old.needs_review is False
    assert old.attributes["lid"].needs_review is False and old.attributes["lid"].confidence == 0.7
    new = ResultRecord.model_validate({k: v for k, v in V1_RESULT.items() if k != "schema_version"})
    assert new.schema_version == 2
    dumped = json.loads(new.model_dump_json())
    assert dumped["needs_review"] is False and dumped["attributes"]["lid"]["needs_review"] is False
    with pytest.raises(ValueError):
        ResultRecord.model_validate({**V1_RESULT, "schema_version": 3})


def _manifest(**changes: object) -> Manifest:
    fields: dict = dict(category="pans", version="v1", architecture="shelfsight-tiny", base_weights="none",
                        taxonomy_version="t", values={"lid": ["yes", "no"]}, captions={"lid": ["a", "b"]},
                        weights_sha256="ab" * 32, weights_bytes=10)
    fields.update(changes)
    return Manifest(**fields)


def test_manifest_round_trips_calibration_and_old_manifests_load() -> None:
    store = InMemoryObjectStore()
    registry = ModelRegistry(store, "b")
    manifest = _manifest(temperatures={"lid": 1.7}, review_thresholds={"lid": 0.82},
                         calibration={"target_precision": 0.95, "attributes": {"lid": {"ece_after": 0.03}}})
    registry.upload_version(manifest, b"w")
    again = registry.manifest("pans", "v1")
    assert again.temperatures == {"lid": 1.7} and again.review_thresholds == {"lid": 0.82}
    assert again.calibration["attributes"]["lid"]["ece_after"] == 0.03
    old = json.loads(_manifest().model_dump_json())
    for name in ("temperatures", "review_thresholds", "calibration"):
        old.pop(name)
    store.put("b", "models/pans/v0/manifest.json", json.dumps({**old, "version": "v0"}).encode())
    legacy = registry.manifest("pans", "v0")
    assert legacy.temperatures == {} and legacy.review_thresholds == {} and legacy.calibration == {}


def test_the_signature_covers_temperatures_and_thresholds() -> None:
    key = SecretStr("signing-key-for-tests-0123456789")
    signed = sign_manifest(_manifest(temperatures={"lid": 1.7}, review_thresholds={"lid": 0.82}), key)
    stored = json.loads(signed.model_dump_json(indent=2))
    verify_signature(stored, key)
    for field, value in [("temperatures", {"lid": 0.2}), ("review_thresholds", {"lid": 0.1}),
                         ("review_thresholds", {}), ("calibration", {"forged": True})]:
        tampered = {**stored, field: value}
        with pytest.raises(ManifestSignatureError, match="does not match"):
            verify_signature(tampered, key)
