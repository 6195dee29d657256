"""Publishing a trained version: weights, manifest and report into the registry as a new
immutable version, then, when the gate promoted it, flip the category's pointer and announce it
to the extraction workers.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import structlog
from safetensors.torch import save as save_safetensors

from shelfsight.shared.model_factory import ClipBundle, sha256_bytes
from shelfsight.shared.model_signing import sign_manifest
from shelfsight.shared.registry import Manifest, Pointer, new_version
from shelfsight.shared.streams import announce_model
from shelfsight.trainer.category_data import TrainingData
from shelfsight.trainer.evaluate import HeadSpec
from shelfsight.trainer.gate import GateOutcome
from shelfsight.trainer.report import REPORT_NAME, render_report
from shelfsight.trainer.resources import TrainerResources
from shelfsight.trainer.train import FitResult

log = structlog.get_logger()


def publish(
    resources: TrainerResources,
    category: str,
    caption_template: str | None,
    spec: HeadSpec,
    bundle: ClipBundle,
    data: TrainingData,
    outcome: GateOutcome,
) -> str:
    """Upload the challenger (weights, manifest, report and plots); promote and announce it if
    the gate said so. Returns the new version."""
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
        labels_snapshot=snapshot, test_set_key=data.labels.test_set_key, parent_version=outcome.champion_version,
        training={**outcome.fit.summary(), "splits": data.sizes, "report": report_key(resources, category, version)},
    )
    if settings.model_signing_key is not None and settings.model_signing_key.get_secret_value():
        manifest = sign_manifest(manifest, settings.model_signing_key)  # last: it covers every field
    registry.upload_version(manifest, weights, extra_files=files)
    if outcome.promote:
        promote_and_announce(resources, category, version, outcome.reason)
    log.info("train.done", category=category, version=version, promoted=outcome.promote, reason=outcome.reason,
             test_macro_f1=round(outcome.challenger.macro_f1, 4))
    return version


def promote_and_announce(resources: TrainerResources, category: str, version: str, reason: str) -> Pointer:
    """Serve `version` now: flip the category's pointer, then tell the workers."""
    pointer = resources.registry.promote(category, version, reason=reason)
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
    """What report.json records: model, decision, splits, labels, training curve, test results."""
    return {
        "category": category, "version": version, "created_at": datetime.now(UTC).isoformat(),
        "architecture": bundle.architecture, "base_weights": bundle.weights,
        "decision": decision, "splits": data.sizes,
        "labels": {"count": label_count, "stale": data.labels.stale, "skipped_images": data.skipped},
        "training": outcome.fit.summary(),
        "test": {"challenger": outcome.challenger.as_dict(),
                 "champion": outcome.champion.as_dict() if outcome.champion else None,
                 "champion_version": outcome.champion_version, "test_set_key": data.labels.test_set_key},
    }
