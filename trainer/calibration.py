"""Calibrated confidence and abstention for a trained model (issue 11).

After the winning checkpoint is chosen, per attribute:

- **Temperature.** A temperature T is fitted on the validation split (clip_math.fit_temperature:
  minimum NLL of softmax(logits / T)). Workers serve softmax(logits / T), so a result's
  confidence means what it says. The expected calibration error (ECE) before (T = 1) and
  after is measured on the frozen test split, which T never saw.
- **Review threshold.** On the calibrated validation probabilities, the lowest confidence
  whose predictions at or above it reach settings.review_target_precision
  (clip_math.threshold_for_precision, at least MIN_THRESHOLD_SUPPORT predictions kept). A
  prediction below it carries needs_review=true.

The rules where the validation split cannot say (recorded per attribute as `status`):

- `no_validation_labels`: T = 1 and no threshold (never reviewed). The attribute is not
  labeled in this category's validation split; the gate does not judge it either.
- `too_few_validation_labels` (fewer than MIN_THRESHOLD_SUPPORT): T = 1 and the threshold
  REVIEW_ALL: nothing shows that any confidence reaches the target, so all are reviewed.
- `target_not_reached`: the fitted T, and REVIEW_ALL.
- `ok`: the fitted T and the threshold found.

A fitted T at a bound of clip_math.TEMPERATURE_BOUNDS is not used (T = 1, `temperature_at_bound`):
it means the validation predictions are all right (the NLL keeps falling as T -> 0) or all wrong,
which says nothing about how much to rescale. Small, separable validation splits do this.

Logits are fp32 at the logit scale a worker serves with (exp(logit_scale) clamped at 100, as
worker.model_cache does), so the temperatures fitted here apply to the worker's logits.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from shelfsight.shared.clip_math import (
    ECE_BINS,
    MIN_THRESHOLD_SUPPORT,
    REVIEW_ALL,
    TEMPERATURE_BOUNDS,
    attribute_logits,
    calibrated_probabilities,
    expected_calibration_error,
    fit_temperature,
    labeled_rows,
    reliability_bins,
    threshold_for_precision,
)
from shelfsight.shared.model_factory import ClipBundle
from shelfsight.trainer.dataset import LabeledImages
from shelfsight.trainer.evaluate import (
    EVAL_BATCH_SIZE,
    HeadSpec,
    PreprocessedImages,
    autocast_for,
    text_features,
)

MAX_LOGIT_SCALE = 100.0  # the clamp a worker applies (worker.model_cache._category_model)


@dataclass(frozen=True)
class Calibration:
    """What goes into the manifest (temperatures, thresholds, summary) and the report (with bins)."""

    temperatures: dict[str, float]
    review_thresholds: dict[str, float]
    report: dict[str, Any] = field(default_factory=dict)

    def manifest_summary(self) -> dict[str, Any]:
        """The report without its reliability bins: small enough for the manifest."""
        attributes = {a: {k: v for k, v in entry.items() if k != "reliability"}
                      for a, entry in self.report.get("attributes", {}).items()}
        return {**self.report, "attributes": attributes}


@torch.no_grad()
def served_logits(bundle: ClipBundle, spec: HeadSpec, data: LabeledImages,
                  batch_size: int = EVAL_BATCH_SIZE) -> dict[str, torch.Tensor]:
    """fp32 logits [N, V] per attribute of `data`'s images, at the logit scale workers serve with."""
    model: Any = bundle.model
    model.eval()
    out: dict[str, list[torch.Tensor]] = {a: [] for a in spec.values}
    if len(data):
        images = PreprocessedImages(data.images, bundle.preprocess, bundle.image_size)
        tokens = bundle.tokenizer(spec.all_captions()).to(bundle.device)
        scale = float(model.logit_scale.detach().exp().clamp(max=MAX_LOGIT_SCALE))
        with autocast_for(bundle.device):
            features = text_features(model, tokens, spec)
            for start in range(0, len(data), batch_size):
                indices = list(range(start, min(len(data), start + batch_size)))
                image_features = model.encode_image(images.get(indices).to(bundle.device))
                for a, feats in features.items():
                    out[a].append(attribute_logits(image_features, feats, scale).cpu())
    return {a: torch.cat(chunks) if chunks else torch.zeros(0, len(spec.values[a])) for a, chunks in out.items()}


def _targets(data: LabeledImages, attribute: str) -> torch.Tensor:
    return torch.tensor(list(data.targets.get(attribute, [])), dtype=torch.long)


def _review_stats(probabilities: torch.Tensor, targets: torch.Tensor, threshold: float | None) -> dict[str, Any]:
    """Share of predictions not sent to review, and their precision, at `threshold`."""
    if threshold is None or not len(targets):
        return {"auto_accepted": None, "precision_auto_accepted": None}
    confidence, predicted = probabilities.max(dim=-1)
    accepted = confidence >= threshold
    right = (predicted == targets)[accepted]
    return {"auto_accepted": float(accepted.double().mean()),
            "precision_auto_accepted": float(right.double().mean()) if len(right) else None}


def calibrate_attribute(
    val_logits: torch.Tensor, val_targets: torch.Tensor, test_logits: torch.Tensor, test_targets: torch.Tensor,
    target_precision: float, min_support: int = MIN_THRESHOLD_SUPPORT,
) -> tuple[float, float | None, dict[str, Any]]:
    """(temperature, review threshold or None for never, report entry) of one attribute. Pure tensors."""
    val_logits, val_targets = labeled_rows(val_logits, val_targets)
    test_logits, test_targets = labeled_rows(test_logits, test_targets)
    temperature, threshold, fitted, at_bound = 1.0, None, None, False
    if not len(val_targets):
        status = "no_validation_labels"
    elif len(val_targets) < min_support:
        status, threshold = "too_few_validation_labels", REVIEW_ALL
    else:
        fitted = fit_temperature(val_logits, val_targets)
        # at a bound, the validation split is separable (all right: T -> 0) or all wrong (T -> inf); it
        # says nothing about how much to rescale, so T stays 1 rather than sharpening 10 times on 10 images
        at_bound = any(abs(fitted / bound - 1) < 1e-3 for bound in TEMPERATURE_BOUNDS)
        temperature = 1.0 if at_bound else fitted
        probabilities = calibrated_probabilities(val_logits.double(), temperature)
        confidence, predicted = probabilities.max(dim=-1)
        threshold = threshold_for_precision(confidence, predicted == val_targets, target_precision, min_support)
        status = "ok" if threshold is not None else "target_not_reached"
        threshold = REVIEW_ALL if threshold is None else threshold
    raw = test_logits.double().softmax(dim=-1)
    calibrated = calibrated_probabilities(test_logits.double(), temperature)
    entry = {
        "status": status, "temperature": temperature, "review_threshold": threshold,
        "fitted_temperature": fitted, "temperature_at_bound": at_bound,
        "validation_support": len(val_targets), "test_support": len(test_targets),
        "validation": _review_stats(calibrated_probabilities(val_logits.double(), temperature), val_targets,
                                    threshold),
        "test": _review_stats(calibrated, test_targets, threshold),
        "ece_before": expected_calibration_error(raw, test_targets) if len(test_targets) else None,
        "ece_after": expected_calibration_error(calibrated, test_targets) if len(test_targets) else None,
        "reliability": {
            "before": [vars(b) for b in reliability_bins(raw, test_targets)],
            "after": [vars(b) for b in reliability_bins(calibrated, test_targets)],
        },
    }
    return temperature, threshold, entry


def calibrate(
    bundle: ClipBundle, spec: HeadSpec, val: LabeledImages, test: LabeledImages, target_precision: float,
    batch_size: int = EVAL_BATCH_SIZE,
) -> Calibration:
    """Fit temperatures and review thresholds on `val`, measure ECE before/after on `test`.

    `bundle` holds the chosen checkpoint; the targets of both splits index into `spec.values`.
    """
    val_logits = served_logits(bundle, spec, val, batch_size)
    test_logits = served_logits(bundle, spec, test, batch_size)
    temperatures: dict[str, float] = {}
    thresholds: dict[str, float] = {}
    attributes: dict[str, Any] = {}
    for a in spec.values:
        t, threshold, attributes[a] = calibrate_attribute(
            val_logits[a], _targets(val, a), test_logits[a], _targets(test, a), target_precision
        )
        temperatures[a] = t
        if threshold is not None:
            thresholds[a] = threshold
    measured = [e for e in attributes.values() if e["ece_before"] is not None]
    report = {
        "method": "temperature scaling per attribute (NLL on the validation split); ECE on the test split",
        "target_precision": target_precision, "min_support": MIN_THRESHOLD_SUPPORT, "bins": ECE_BINS,
        "temperature_bounds": list(TEMPERATURE_BOUNDS), "review_all_threshold": REVIEW_ALL,
        "ece_before": sum(e["ece_before"] for e in measured) / len(measured) if measured else None,
        "ece_after": sum(e["ece_after"] for e in measured) / len(measured) if measured else None,
        "attributes": attributes,
    }
    return Calibration(temperatures, thresholds, report)
