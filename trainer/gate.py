"""The champion/challenger gate: score the serving champion and a fine-tuned challenger on the
frozen test set, and promote the challenger only on evidence.

- **The champion is what the workers serve.** CURRENT if it loads; if it cannot be loaded for
  good (refused manifest, bad sha256), the next loadable version down the serving history, as
  the workers fall back; with none, **zero-shot**: the base model with the taxonomy's
  zero-shot template, exactly what a worker serves before any promotion. The first
  fine-tuned model of a category is therefore gated against zero-shot like any other.
- **Transient errors never skip the gate.** S3 errors while reading the champion are retried;
  if they persist the run fails (TransientFetchError) and nothing is promoted. The champion
  is scored before training starts, so a run does not train for hours to fail here.
- **Enough evidence.** Every labeled attribute needs settings.promotion_min_test_examples
  labeled test images, or the challenger is refused, saying which attribute lacks what.
- **Evidence, not a point estimate.** A paired bootstrap over test products (trainer.bootstrap)
  gives the lower confidence bound of the macro-F1 gain (mean over the labeled attributes); it
  must be at least settings.promotion_margin. A noisy tie is not promoted.
- **No attribute left behind.** A drop of more than settings.promotion_attribute_tolerance in
  any one attribute's macro-F1 refuses the challenger, whatever the mean.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import structlog

from shelfsight.shared.clip_math import IGNORE
from shelfsight.shared.model_factory import ClipBundle, WeightsError, create_clip
from shelfsight.shared.model_signing import load_trusted_manifest
from shelfsight.shared.settings import Settings
from shelfsight.shared.storage import ObjectMissing, TransientStorageError
from shelfsight.trainer.bootstrap import PairedBootstrap, paired_bootstrap
from shelfsight.trainer.calibration import Calibration, calibrate
from shelfsight.trainer.category_data import TrainingData, TransientFetchError, zero_shot_spec
from shelfsight.trainer.dataset import LabeledImages
from shelfsight.trainer.evaluate import EvalResult, HeadSpec, evaluate
from shelfsight.trainer.resources import TrainerResources
from shelfsight.trainer.train import FitResult, Progress, TrainConfig, fit

log = structlog.get_logger()

ZERO_SHOT = "zero-shot"


@dataclass(frozen=True)
class Champion:
    """What the challenger must beat: a registry version, or zero-shot, scored on the test set."""

    version: str  # a registry version, or ZERO_SHOT
    result: EvalResult
    current: str | None  # CURRENT's version when the champion was chosen (None: never promoted)
    notes: list[str] = field(default_factory=list)  # versions passed over, and why


@dataclass(frozen=True)
class Decision:
    """The gate's verdict, its reason, and the evidence behind it."""

    promote: bool
    reason: str
    checks: dict[str, Any]


@dataclass(frozen=True)
class GateOutcome:
    """A trained challenger, both test results, and the promotion decision with its reason."""

    fit: FitResult
    challenger: EvalResult
    champion: EvalResult
    champion_version: str  # a registry version, or "zero-shot"
    current_version: str | None  # CURRENT when the champion was chosen: promotion requires it unchanged
    decision_: Decision
    calibration: Calibration | None = None  # temperatures and review thresholds (trainer.calibration)

    @property
    def promote(self) -> bool:
        return self.decision_.promote

    @property
    def reason(self) -> str:
        return self.decision_.reason

    def decision(self, margin: float) -> dict[str, Any]:
        """The decision as recorded in the manifest and the report."""
        return {"promoted": self.promote, "reason": self.reason, "champion_version": self.champion_version,
                "challenger_macro_f1": self.challenger.macro_f1, "champion_macro_f1": self.champion.macro_f1,
                "margin": margin, **self.decision_.checks}


def train_and_gate(
    resources: TrainerResources,
    category: str,
    spec: HeadSpec,
    bundle: ClipBundle,
    data: TrainingData,
    progress: Progress,
) -> GateOutcome:
    """Score the champion, fine-tune `bundle` on the train split, score it, and decide."""
    settings = resources.settings
    config = TrainConfig.from_settings(settings)
    test = data.splits["test"]
    progress({"phase": "scoring_champion"})
    champion = choose_champion(resources, category, test, spec, base=bundle)  # before `fit` changes `bundle`
    result = fit(bundle, spec, data.splits["train"], data.splits["val"], config, progress)
    progress({"phase": "evaluating"})
    challenger = evaluate(bundle, spec, test, batch_size=config.eval_batch_size)
    progress({"phase": "calibrating"})
    calibration = calibrate(bundle, spec, data.splits["val"], test, settings.review_target_precision,
                            batch_size=config.eval_batch_size)
    labeled = labeled_attributes(data, spec)
    decision = decide_promotion(challenger, champion.result, champion.version, labeled, settings)
    if champion.notes:
        decision = Decision(decision.promote, decision.reason, {**decision.checks, "champion_notes": champion.notes})
    return GateOutcome(result, challenger, champion.result, champion.version, champion.current, decision,
                       calibration)


def labeled_attributes(data: TrainingData, spec: HeadSpec) -> list[str]:
    """Attributes labeled on at least one usable product of the category (the ones the gate judges)."""
    present = {a for r in data.labels.records for a in r.attributes}
    return [a for a in spec.values if a in present]


# --- the champion ---------------------------------------------------------------------------------


def choose_champion(
    resources: TrainerResources, category: str, test: LabeledImages, spec: HeadSpec, base: ClipBundle
) -> Champion:
    """The model the workers serve, scored on `test` (see the module docstring).

    `base` is the untrained base model: with the zero-shot captions it is the zero-shot champion.
    Raises TransientFetchError when S3 keeps failing.
    """
    settings = resources.settings
    registry = resources.registry
    pointer = _retrying(settings, f"CURRENT of {category}", lambda: registry.current(category))
    notes: list[str] = []
    if pointer is not None:
        stack = _retrying(settings, f"history of {category}", lambda: registry.serving_stack(category))
        candidates = [pointer.version] + [v for v in reversed(stack) if v != pointer.version]
        for version in dict.fromkeys(candidates):
            try:
                bundle, head = _retrying(settings, f"{category}/{version}",
                                         partial(_load_version, resources, category, version))
            except (WeightsError, ObjectMissing, ValueError) as exc:  # for good: workers pass over it too
                log.error("train.champion_unloadable", category=category, version=version, error=str(exc)[:300])
                notes.append(f"{version} could not be loaded: {exc}")
                continue
            result = evaluate(bundle, head, test, data_values=spec.values)
            return Champion(version, result, pointer.version, notes)
    zero_shot = zero_shot_spec(resources.taxonomy, category)
    result = evaluate(base, zero_shot, test, data_values=spec.values)
    return Champion(ZERO_SHOT, result, pointer.version if pointer else None, notes)


def _load_version(resources: TrainerResources, category: str, version: str) -> tuple[ClipBundle, HeadSpec]:
    """A registry version as a worker would load it: trusted manifest, sha256-checked weights."""
    settings = resources.settings
    manifest, _ = load_trusted_manifest(resources.registry, category, version, taxonomy=resources.taxonomy,
                                        settings=settings)
    bundle = create_clip(
        manifest.architecture, resources.registry.weights_uri(category, version), device=settings.device,
        precision="fp32", store=resources.store, expected_sha256=manifest.weights_sha256,
        image_size=manifest.image_size or None,
    )
    return bundle, HeadSpec(manifest.values, manifest.captions)


def _is_transient(exc: BaseException) -> bool:
    """A storage error worth retrying, directly or as the cause of a WeightsError."""
    while exc is not None:
        if isinstance(exc, TransientStorageError):
            return True
        exc = exc.__cause__  # type: ignore[assignment]
    return False


def _retrying(settings: Settings, what: str, call: Any) -> Any:
    """`call()`, retried on transient storage errors (also inside WeightsError); TransientFetchError when spent."""
    delay = settings.retry_backoff_s
    for attempt in range(settings.max_retries + 1):
        try:
            return call()
        except Exception as exc:
            if not _is_transient(exc):
                raise
            if attempt == settings.max_retries:
                raise TransientFetchError(
                    f"{what}: {exc} (after {attempt + 1} attempts); the gate cannot run, nothing is promoted"
                ) from exc
            log.warning("train.champion_retry", what=what, attempt=attempt + 1, error=str(exc)[:200])
            time.sleep(delay)
            delay = min(delay * 2, settings.retry_backoff_max_s)
    raise AssertionError("unreachable")


# --- the decision ---------------------------------------------------------------------------------


def labeled_test_counts(result: EvalResult, attributes: list[str]) -> dict[str, int]:
    """Labeled test images per attribute."""
    return {a: sum(1 for t in result.targets.get(a, []) if t != IGNORE) for a in attributes}


def decide_promotion(
    challenger: EvalResult, champion: EvalResult, champion_version: str, attributes: list[str], settings: Settings
) -> Decision:
    """Promote only with enough test evidence, no attribute dropping beyond tolerance, and a bootstrap
    lower bound of the macro-F1 gain (mean over `attributes`) at least settings.promotion_margin.

    Both results must come from the same test images, in the same order.
    """
    if challenger.ids != champion.ids:
        raise ValueError("challenger and champion were scored on different test images")
    name = "zero-shot (the base model)" if champion_version == ZERO_SHOT else f"champion {champion_version}"
    support = labeled_test_counts(challenger, attributes)
    checks: dict[str, Any] = {"attributes": attributes, "test_support": support,
                              "min_test_examples": settings.promotion_min_test_examples}
    if not attributes:
        return Decision(False, "no labeled attribute: nothing to judge the challenger on", checks)
    short = {a: n for a, n in support.items() if n < settings.promotion_min_test_examples}
    if short:
        listed = ", ".join(f"{a} has {n}" for a, n in short.items())
        return Decision(False, (
            f"not enough test evidence to replace {name}: {listed} labeled test images, at least "
            f"{settings.promotion_min_test_examples} per attribute are needed "
            "(SHELFSIGHT_PROMOTION_MIN_TEST_EXAMPLES); label more products"), checks)
    evidence = paired_bootstrap(challenger.targets, challenger.predictions, champion.predictions, attributes,
                                samples=settings.promotion_bootstrap_samples,
                                confidence=settings.promotion_confidence, seed=settings.promotion_bootstrap_seed)
    checks["bootstrap"] = evidence.as_dict()
    checks["attribute_deltas"] = {a: d.delta for a, d in evidence.attributes.items()}
    checks["attribute_tolerance"] = settings.promotion_attribute_tolerance
    return _verdict(evidence, name, settings, checks)


def _verdict(evidence: PairedBootstrap, name: str, settings: Settings, checks: dict[str, Any]) -> Decision:
    mean = evidence.mean
    summary = (f"macro-F1 {mean.challenger:.4f} vs {name} {mean.champion:.4f}: gain {mean.delta:+.4f}, "
               f"{evidence.confidence:.0%} lower bound {mean.lower:+.4f} (interval {mean.lower:+.4f} to "
               f"{mean.upper:+.4f}, {evidence.samples} paired resamples of {evidence.products} test products)")
    drops = {a: d.delta for a, d in evidence.attributes.items() if d.delta < -settings.promotion_attribute_tolerance}
    if drops:
        listed = ", ".join(f"{a} {d:+.4f}" for a, d in drops.items())
        return Decision(False, (f"refused: macro-F1 drops beyond the tolerance "
                                f"{settings.promotion_attribute_tolerance:.4f} on {listed}; {summary}"), checks)
    if mean.lower >= settings.promotion_margin:
        return Decision(True, f"promoted: {summary} ≥ margin {settings.promotion_margin:.4f}", checks)
    return Decision(False, f"refused: {summary} < margin {settings.promotion_margin:.4f}", checks)
