"""Publishing a trained version: weights, manifest and report into the registry as a new
immutable version, then, when the gate promoted it, flip the category's pointer and announce it
to the extraction workers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import structlog
from safetensors.torch import save as save_safetensors

from shelfsight.shared.framing import FRAMING
from shelfsight.shared.model_factory import ClipBundle, sha256_bytes
from shelfsight.shared.model_signing import sign_manifest
from shelfsight.shared.registry import ChampionChanged, Manifest, Pointer, new_version
from shelfsight.shared.settings import Settings
from shelfsight.shared.streams import announce_model
from shelfsight.trainer.category_data import TrainingData
from shelfsight.trainer.evaluate import HeadSpec
from shelfsight.trainer.gate import ZERO_SHOT, GateOutcome
from shelfsight.trainer.provenance import describe_device, software_versions, training_precision
from shelfsight.trainer.report import REPORT_NAME, render_report
from shelfsight.trainer.resources import TrainerResources
from shelfsight.trainer.train import FitResult

log = structlog.get_logger()


@dataclass(frozen=True)
class Published:
    """The uploaded version, and whether it now serves (the gate said so, and the promotion held)."""

    version: str
    promoted: bool
    reason: str


def publish(
    resources: TrainerResources,
    category: str,
    caption_template: str | None,
    spec: HeadSpec,
    bundle: ClipBundle,
    data: TrainingData,
    outcome: GateOutcome,
    holds_lock: Callable[[], bool] = lambda: True,
) -> Published:
    """Upload the challenger (weights, manifest, report and plots); promote and announce it if
    the gate said so, this run still holds the category's training lock (`holds_lock`), and
    CURRENT still names the champion the gate compared it with."""
    settings, registry = resources.settings, resources.registry
    version = new_version()
    weights = _safetensors(outcome.fit, category, version)
    decision = outcome.decision(settings.promotion_margin)
    snapshot = data.labels.label_set.snapshot()
    files = render_report(_report(category, version, bundle, data, outcome, decision, snapshot["count"]))
    manifest = Manifest(
        category=category, version=version, architecture=bundle.architecture, base_weights=bundle.weights,
        taxonomy_version=resources.taxonomy.version, values=spec.values, captions=spec.captions,
        caption_template=caption_template, weights_sha256=sha256_bytes(weights), weights_bytes=len(weights),
        metrics={"test_macro_f1": outcome.challenger.macro_f1, "test_accuracy": outcome.challenger.accuracy,
                 "test": outcome.challenger.as_dict(), "val_loss": outcome.fit.best_val_loss, "decision": decision},
        labels_snapshot=snapshot, test_set_key=data.labels.test_set_key,
        parent_version=None if outcome.champion_version == ZERO_SHOT else outcome.champion_version,
        training={**outcome.fit.summary(), "splits": data.sizes, "report": report_key(resources, category, version)},
        **provenance(settings, bundle, data), **calibration_fields(outcome),
    )
    if settings.model_signing_key is not None and settings.model_signing_key.get_secret_value():
        manifest = sign_manifest(manifest, settings.model_signing_key)  # last: it covers every field
    registry.upload_version(manifest, weights, extra_files=files)
    promoted, reason = outcome.promote, outcome.reason
    if promoted:
        promoted, reason = _promote_if_still_entitled(resources, category, version, outcome, holds_lock)
    log.info("train.done", category=category, version=version, promoted=promoted, reason=reason,
             test_macro_f1=round(outcome.challenger.macro_f1, 4))
    return Published(version, promoted, reason)


def provenance(settings: Settings, bundle: ClipBundle, data: TrainingData) -> dict[str, Any]:
    """The manifest's reproducibility fields (see shared.registry.Manifest)."""
    return {
        "test_set_sha256": data.labels.test_set_sha256, "base_weights_sha256": bundle.weights_sha256,
        "image_size": bundle.image_size, "framing": FRAMING, "precision": training_precision(bundle.device),
        "device": describe_device(bundle.device), "split_seed": settings.train_split_seed,
        "train_seed": settings.train_seed, "software": software_versions(),
    }


def calibration_fields(outcome: GateOutcome) -> dict[str, Any]:
    """The manifest's temperatures, review thresholds and calibration summary (none: T = 1, never review)."""
    if outcome.calibration is None:
        return {}
    return {"temperatures": outcome.calibration.temperatures,
            "review_thresholds": outcome.calibration.review_thresholds,
            "calibration": outcome.calibration.manifest_summary()}


def _promote_if_still_entitled(
    resources: TrainerResources, category: str, version: str, outcome: GateOutcome, holds_lock: Callable[[], bool]
) -> tuple[bool, str]:
    """Promote unless this run lost its lock or CURRENT moved since the champion was chosen."""
    if not holds_lock():
        log.error("train.lock_lost", category=category, version=version)
        return False, (f"{outcome.reason}; NOT promoted: this run no longer holds the {category} training lock "
                       "(another execution took over)")
    try:
        promote_and_announce(resources, category, version, outcome.reason, expected=outcome.current_version)
    except ChampionChanged as exc:
        log.warning("train.champion_changed", category=category, version=version, error=str(exc))
        return False, f"{outcome.reason}; NOT promoted: {exc}"
    return True, outcome.reason


_ANY: Any = object()


def promote_and_announce(
    resources: TrainerResources, category: str, version: str, reason: str, expected: str | None = _ANY
) -> Pointer:
    """Serve `version` now: flip the category's pointer (only over `expected`, when given), then tell the workers."""
    if expected is _ANY:
        pointer = resources.registry.promote(category, version, reason=reason)
    else:
        pointer = resources.registry.promote_if_current(category, version, reason, expected)
    announce_model(resources.redis, resources.settings.model_events_channel, category, version)
    return pointer


def report_key(resources: TrainerResources, category: str, version: str) -> str:
    """Registry key of a version's report.json."""
    return resources.registry.key(category, version, REPORT_NAME)


def _safetensors(result: FitResult, category: str, version: str) -> bytes:
    state = {k: v.contiguous() for k, v in result.state_dict.items()}
    return save_safetensors(state, metadata={"category": category, "version": version})


def _report(
    category: str, version: str, bundle: ClipBundle, data: TrainingData, outcome: GateOutcome,
    decision: dict[str, Any], label_count: int,
) -> dict[str, Any]:
    """What report.json records: model, decision (bootstrap interval, per-attribute deltas), splits,
    labels (skipped images, untestable values), training curve, test results."""
    return {
        "category": category, "version": version, "created_at": datetime.now(UTC).isoformat(),
        "architecture": bundle.architecture, "base_weights": bundle.weights,
        "decision": decision, "splits": data.sizes,
        "labels": {"count": label_count, "stale": data.labels.stale, "skipped_images": data.skipped,
                   "untestable_values": data.labels.untestable},
        "training": outcome.fit.summary(),
        "test": {"challenger": outcome.challenger.as_dict(), "champion": outcome.champion.as_dict(),
                 "champion_version": outcome.champion_version, "test_set_key": data.labels.test_set_key,
                 "test_set_sha256": data.labels.test_set_sha256},
        "calibration": outcome.calibration.report if outcome.calibration else None,
    }
