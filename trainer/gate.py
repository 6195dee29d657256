"""The champion/challenger gate: train a challenger, score it and the serving champion on the
frozen test set, and decide whether the challenger replaces the champion.

The criterion is test macro-F1 (mean over attributes): the challenger is promoted when it
scores at least settings.promotion_margin above the champion, or when there is no champion
(or it cannot be loaded).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import structlog

from shelfsight.shared.model_factory import ClipBundle, WeightsError, create_clip
from shelfsight.shared.model_signing import load_trusted_manifest
from shelfsight.shared.storage import ObjectMissing
from shelfsight.trainer.category_data import TrainingData
from shelfsight.trainer.dataset import LabeledImages
from shelfsight.trainer.evaluate import EvalResult, HeadSpec, evaluate
from shelfsight.trainer.resources import TrainerResources
from shelfsight.trainer.train import FitResult, Progress, TrainConfig, fit

log = structlog.get_logger()


@dataclass(frozen=True)
class GateOutcome:
    """A trained challenger, both test results, and the promotion decision with its reason."""

    fit: FitResult
    challenger: EvalResult
    champion: EvalResult | None  # None: no champion, or it could not be loaded
    champion_version: str | None
    promote: bool
    reason: str

    def decision(self, margin: float) -> dict[str, Any]:
        """The decision as recorded in the manifest and the report."""
        return {"promoted": self.promote, "reason": self.reason, "champion_version": self.champion_version,
                "challenger_macro_f1": self.challenger.macro_f1,
                "champion_macro_f1": self.champion.macro_f1 if self.champion else None,
                "margin": margin}


def train_and_gate(
    resources: TrainerResources,
    category: str,
    spec: HeadSpec,
    bundle: ClipBundle,
    data: TrainingData,
    progress: Progress,
) -> GateOutcome:
    """Fine-tune `bundle` on the train split, then score challenger and champion on the test split."""
    settings = resources.settings
    config = TrainConfig.from_settings(settings)
    result = fit(bundle, spec, data.splits["train"], data.splits["val"], config, progress)
    progress({"phase": "evaluating"})
    challenger = evaluate(bundle, spec, data.splits["test"], batch_size=config.eval_batch_size)
    champion_version, champion, champion_error = evaluate_champion(resources, category, data.splits["test"], spec)
    promote, reason = decide_promotion(challenger, champion, champion_version, champion_error,
                                       settings.promotion_margin)
    return GateOutcome(result, challenger, champion, champion_version, promote, reason)


def evaluate_champion(
    resources: TrainerResources, category: str, test: LabeledImages, spec: HeadSpec
) -> tuple[str | None, EvalResult | None, str | None]:
    """(champion version, its test result, error) — all None for a category with no champion."""
    pointer = resources.registry.current(category)
    if pointer is None:
        return None, None, None
    settings = resources.settings
    try:
        manifest, _ = load_trusted_manifest(resources.registry, category, pointer.version,  # as a worker would
                                            taxonomy=resources.taxonomy, settings=settings)
        bundle = create_clip(
            manifest.architecture, resources.registry.weights_uri(category, pointer.version),
            device=settings.device, precision="fp32", store=resources.store,
            expected_sha256=manifest.weights_sha256,
        )
    except (WeightsError, ObjectMissing, ValueError) as exc:
        log.error("train.champion_unloadable", category=category, version=pointer.version, error=str(exc))
        return pointer.version, None, f"champion {pointer.version} could not be loaded: {exc}"
    result = evaluate(bundle, HeadSpec(manifest.values, manifest.captions), test, data_values=spec.values)
    return pointer.version, result, None


def decide_promotion(challenger: EvalResult, champion: EvalResult | None, champion_version: str | None,
                     champion_error: str | None, margin: float) -> tuple[bool, str]:
    """Promotion decision and its reason (test macro-F1, mean over attributes)."""
    if champion_version is None:
        return True, "first model of the category (no champion)"
    if champion is None:
        return True, f"{champion_error}; promoting the challenger"
    threshold = champion.macro_f1 + margin
    verdict = "≥" if challenger.macro_f1 >= threshold else "<"
    reason = (f"challenger test macro-F1 {challenger.macro_f1:.4f} {verdict} champion {champion_version} "
              f"{champion.macro_f1:.4f} + margin {margin:.4f}")
    return challenger.macro_f1 >= threshold, reason
