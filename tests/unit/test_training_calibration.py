"""A trained model is published with per-attribute temperatures and review thresholds in its
manifest, and its report carries the test ECE before/after and a reliability diagram (issue 11)."""

from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path
from typing import cast

import pytest
import redis
import torch
from PIL import Image

from shelfsight.shared import clip_math
from shelfsight.shared.model_factory import create_clip
from shelfsight.trainer import gate
from shelfsight.trainer.calibration import calibrate_attribute, served_logits
from shelfsight.trainer.category_data import fetch_training_data, head_spec, split_labels
from shelfsight.trainer.dataset import LabeledImages
from shelfsight.trainer.evaluate import HeadSpec
from shelfsight.trainer.publish import publish
from shelfsight.trainer.report import RELIABILITY_PLOT
from shelfsight.worker.model_cache import _category_model, build_heads
from tests.unit.training_helpers import BUCKET, add_cups, cup_png, resources


class _Announcements:
    """Stands in for Redis pub/sub: a promotion announces the new version."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, str]] = []

    def publish(self, channel: str, message: str) -> int:
        self.sent.append((channel, message))
        return 0


def test_a_trained_model_is_published_with_temperatures_thresholds_and_ece(tmp_path: Path) -> None:
    res = resources(tmp_path, train_epochs=2, train_augment=False, train_val_fraction=0.3,
                    promotion_min_test_examples=5)
    res = dataclasses.replace(res, redis=cast(redis.Redis, _Announcements()))
    add_cups(res, 60)
    spec = head_spec(res.taxonomy, "cups")
    bundle = create_clip("shelfsight-tiny", "none")
    data = fetch_training_data(res, "cups", split_labels(res, "cups"), spec, draft_size=bundle.image_size)
    assert len(data.splits["val"]) >= clip_math.MIN_THRESHOLD_SUPPORT
    outcome = gate.train_and_gate(res, "cups", spec, bundle, data, lambda _: None)
    published = publish(res, "cups", None, spec, bundle, data, outcome)

    manifest = res.registry.manifest("cups", published.version)
    assert set(manifest.temperatures) == {"colour", "handle"}
    low, high = clip_math.TEMPERATURE_BOUNDS
    assert all(low <= t <= high for t in manifest.temperatures.values())
    assert set(manifest.review_thresholds) == {"colour", "handle"}  # both labeled in validation
    for attribute, entry in manifest.calibration["attributes"].items():
        assert entry["status"] in {"ok", "target_not_reached"}
        assert entry["temperature"] == manifest.temperatures[attribute]
        assert entry["review_threshold"] == manifest.review_thresholds[attribute]
        assert entry["ece_before"] is not None and entry["ece_after"] is not None
        assert "reliability" not in entry  # the bins go to the report only
    assert manifest.calibration["target_precision"] == res.settings.review_target_precision

    report_key = f"models/cups/{published.version}/report.json"
    report = json.loads(res.store.get(BUCKET, report_key).body)
    calibration = report["calibration"]
    assert calibration["ece_before"] is not None and calibration["ece_after"] is not None
    for entry in calibration["attributes"].values():
        assert sum(b["count"] for b in entry["reliability"]["before"]) == entry["test_support"] > 0
        assert sum(b["count"] for b in entry["reliability"]["after"]) == entry["test_support"]
    assert RELIABILITY_PLOT in report["files"]
    png = res.store.get(BUCKET, f"models/cups/{published.version}/{RELIABILITY_PLOT}").body
    assert png.startswith(b"\x89PNG")


def _logits(n: int, seed: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, 3, generator=generator) * 2
    targets = torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(1)
    return logits * scale, targets


def test_calibrate_attribute_rules_when_validation_cannot_say() -> None:
    val, val_t = _logits(400, 0, scale=4.0)  # overconfident
    test, test_t = _logits(400, 1, scale=4.0)
    t, threshold, entry = calibrate_attribute(val, val_t, test, test_t, target_precision=0.9)
    assert entry["status"] == "ok" and 3.0 < t < 5.5 and threshold is not None and threshold < 1
    assert entry["ece_after"] < entry["ece_before"]
    assert entry["validation"]["precision_auto_accepted"] >= 0.9  # what the threshold promises, on validation

    unlabeled = torch.full((400,), clip_math.IGNORE)
    t, threshold, entry = calibrate_attribute(val, unlabeled, test, test_t, target_precision=0.9)
    assert (t, threshold, entry["status"]) == (1.0, None, "no_validation_labels")  # T = 1, never reviewed

    t, threshold, entry = calibrate_attribute(val[:5], val_t[:5], test, test_t, target_precision=0.9)
    assert (t, threshold, entry["status"]) == (1.0, clip_math.REVIEW_ALL, "too_few_validation_labels")

    separable = val.argmax(-1)  # every validation prediction right: the fit runs to T's lower bound
    t, threshold, entry = calibrate_attribute(val, separable, test, test_t, target_precision=0.9)
    assert entry["temperature_at_bound"] and entry["fitted_temperature"] == pytest.approx(0.1, rel=1e-3)
    assert t == 1.0 and entry["status"] == "ok" and threshold is not None and threshold <= 1

    wrong = (val.argmax(-1) + 1) % 3  # every prediction wrong: no threshold reaches any precision
    t, threshold, entry = calibrate_attribute(val, wrong, test, test_t, target_precision=0.9)
    assert entry["status"] == "target_not_reached" and threshold == clip_math.REVIEW_ALL




def test_the_trainer_calibrates_the_probabilities_a_worker_serves() -> None:
    """Temperatures fitted on the trainer's logits apply to the worker's: same logits, same softmax(./T)."""
    bundle = create_clip("shelfsight-tiny", "none")
    spec = HeadSpec({"colour": ["red", "blue"], "handle": ["yes", "no"]},
                    {"colour": ["a red cup", "a blue cup"], "handle": ["a cup with a handle", "a cup"]})
    images = [Image.open(io.BytesIO(cup_png("red" if i % 2 else "blue", i))).convert("RGB") for i in range(5)]
    data = LabeledImages(images, {"colour": [0] * 5, "handle": [0] * 5}, [str(i) for i in range(5)])
    temperatures = {"colour": 2.5, "handle": 0.4}
    trainer_side = {a: clip_math.calibrated_probabilities(logits, temperatures[a])
                    for a, logits in served_logits(bundle, spec, data).items()}
    model = _category_model(bundle, "cups", "v1", "fine_tuned", build_heads(bundle, spec.values, spec.captions),
                            "t", None, False, temperatures=temperatures)
    worker_side = model.score(torch.stack([bundle.preprocess(image) for image in images]))
    for attribute in spec.values:
        assert torch.allclose(worker_side[attribute], trainer_side[attribute], atol=1e-5), attribute
