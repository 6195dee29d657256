"""Trainer services: what the Celery tasks and the CLI call. Knows S3, Redis and the registry;
the training math itself lives in trainer.train and trainer.evaluate.

- `train_category`: under a per-category Redis lock claimed per execution, gather the
  category's data (trainer.category_data), train a challenger and gate it against the
  champion, zero-shot included (trainer.gate), publish it to the registry and promote it if it
  won and this execution still holds the lock (trainer.publish).
- `import_and_trigger`: import labels, count new labels per category in Redis, enqueue a
  retrain when settings.retrain_after_labels is reached.
- `promote_version`, `rollback_category`: operator changes to the serving version.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import structlog
from celery import Celery

from shelfsight.shared.backfill import request_backfill
from shelfsight.shared.events import parse_s3_uri
from shelfsight.shared.image_sources import ImageSourcePolicy
from shelfsight.shared.model_factory import ClipBundle, create_clip
from shelfsight.shared.storage import ObjectTooLarge
from shelfsight.shared.streams import announce_model
from shelfsight.shared.training_jobs import (
    EXECUTION_SEPARATOR,
    claim_training_lock,
    enqueue_training,
    execution_lock_value,
    holds_training_lock,
    release_training_lock,
)
from shelfsight.trainer.category_data import (
    TrainingData,
    fetch_training_data,
    head_spec,
    split_labels,
)
from shelfsight.trainer.evaluate import HeadSpec
from shelfsight.trainer.gate import GateOutcome, train_and_gate
from shelfsight.trainer.labels import LabelFileTooLarge, import_labels, label_categories
from shelfsight.trainer.publish import Published, promote_and_announce, publish, report_key
from shelfsight.trainer.resources import TrainerResources
from shelfsight.trainer.train import Progress

log = structlog.get_logger()


# --- retrain after N new labels -------------------------------------------------------------------

# Add n to the category's new-label count; when it reaches the threshold, reset it and return 1.
_COUNT = """
local total = redis.call('INCRBY', KEYS[1], ARGV[1])
if tonumber(ARGV[2]) > 0 and total >= tonumber(ARGV[2]) then
  redis.call('SET', KEYS[1], 0)
  return {1, total}
end
return {0, total}
"""


def new_labels_key(category: str) -> str:
    return f"shelfsight:new-labels:{category}"


def read_label_source(resources: TrainerResources, source: str | Sequence[Mapping[str, Any]]) -> bytes | Sequence[Mapping[str, Any]]:
    """A list of label dicts as is, or the bytes of an s3:// JSONL object (size-limited)."""
    if isinstance(source, str):
        bucket, key = parse_s3_uri(source)
        try:
            return resources.store.get(bucket, key, max_bytes=resources.settings.max_label_file_bytes).body
        except ObjectTooLarge as exc:
            raise LabelFileTooLarge(str(exc)) from exc
    return source


def import_and_trigger(
    resources: TrainerResources, source: bytes | str | Sequence[Mapping[str, Any]], app: Celery | None = None,
    label_format: str = "jsonl",
) -> dict[str, Any]:
    """Import labels (see trainer.labels.import_labels), then count them towards retraining.

    `source`: file bytes in `label_format` (jsonl, csv, label-studio), an s3:// URI of such an
    object, or a list of label dicts. Every format takes this one path, so a CSV or a Label
    Studio export counts towards a retrain like JSONL does. When a
    category reaches settings.retrain_after_labels new labels and `app` is given, a training is
    enqueued (or the pending one reported) and the count starts again.
    """
    settings = resources.settings
    data = read_label_source(resources, source) if isinstance(source, str) else source
    result = import_labels(
        data, store=resources.store, bucket=settings.bucket, labels_prefix=settings.labels_prefix,
        taxonomy=resources.taxonomy, max_bytes=settings.max_label_file_bytes,
        sources=ImageSourcePolicy.from_settings(settings), max_future_skew_s=settings.max_future_skew_s,
        label_format=label_format,
    )
    summary = result.as_dict()
    summary["retrain"] = {}
    for category, count in result.per_category.items():
        triggered, total = resources.redis.eval(
            _COUNT, 1, new_labels_key(category), count, settings.retrain_after_labels
        )
        if triggered and app is not None:
            enqueued = enqueue_training(app, resources.redis, resources.taxonomy, category, reason=f"{total} new labels")
            if not enqueued.queued:  # the pending run may predate these labels: count them again
                resources.redis.incrby(new_labels_key(category), total)
            summary["retrain"][category] = {"task_id": enqueued.task_id, "queued": enqueued.queued}
    return summary


def retrain_all(app: Celery, resources: TrainerResources) -> dict[str, Any]:
    """Enqueue a training for every taxonomy category that has labels."""
    settings = resources.settings
    categories = [
        c for c in label_categories(resources.store, settings.bucket, settings.labels_prefix)
        if c in resources.taxonomy.categories
    ]
    out = {}
    for category in categories:
        enqueued = enqueue_training(app, resources.redis, resources.taxonomy, category, reason="schedule")
        out[category] = {"task_id": enqueued.task_id, "queued": enqueued.queued}
    return out


# --- the training run -----------------------------------------------------------------------------


class TrainingLockLost(RuntimeError):
    """Another execution holds the category's lock now (this run stalled past the lock's TTL)."""


def finished_key(task_id: str) -> str:
    return f"shelfsight:train-finished:{task_id}"


def _finished_ttl_s(resources: TrainerResources) -> int:
    """Long enough to outlive any redelivery of the task (its visibility timeout, twice)."""
    settings = resources.settings
    return max(2 * settings.training_visibility_timeout_s, settings.delivery_tracking_ttl_s)


def train_category(
    resources: TrainerResources,
    category: str,
    *,
    owner: str | None = None,
    caption_template: str | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Train a challenger for `category`, gate it against the champion, publish the result.

    One run per category, also across redelivery: `owner` is the task id, whose lock the
    enqueue took; this execution claims it with a token of its own and keeps it refreshed. A
    copy of the task redelivered while this one runs finds another token and is skipped; one
    redelivered after this one finished finds the task's finished marker and is skipped. The
    marker is set just before promotion, and only while the lock is held, so two executions
    of one task can never both promote. Returns {"status": "skipped", ...} without training
    when the lock belongs to someone else or the task already finished.
    """
    settings = resources.settings
    owner = owner or uuid.uuid4().hex
    done = resources.redis.get(finished_key(owner))
    if done is not None:
        log.warning("train.already_finished", category=category, task_id=owner)
        return {"status": "skipped", "category": category, "holder": owner,
                "reason": f"task {owner} already ran to its end for {category}; a redelivered copy does not train "
                          "or promote again"}
    token = uuid.uuid4().hex
    lock_value = execution_lock_value(owner, token)
    holder = claim_training_lock(resources.redis, category, owner, token, settings.training_lock_ttl_s)
    if holder is not None:
        log.warning("train.locked", category=category, holder=holder)
        same_task = holder.startswith(owner + EXECUTION_SEPARATOR)
        what = f"another execution of task {owner}" if same_task else f"task {holder.split(EXECUTION_SEPARATOR)[0]}"
        return {"status": "skipped", "category": category,
                "reason": f"a training for {category} is already queued or running ({what})",
                "holder": holder.split(EXECUTION_SEPARATOR)[0]}
    report = progress or (lambda _: None)

    def progress_and_keep_lock(meta: dict[str, Any]) -> None:
        if meta.get("phase") != "step":  # refresh the TTL, so a run longer than it keeps its lock
            other = claim_training_lock(resources.redis, category, owner, token, settings.training_lock_ttl_s)
            if other is not None:
                raise TrainingLockLost(f"{category}: the training lock now belongs to {other}; this run stops")
        report(meta)

    def entitled_to_promote() -> bool:
        """Still our lock, and no other execution of this task got to its end first (atomic marker)."""
        if not holds_training_lock(resources.redis, category, lock_value):
            return False
        marker = json.dumps({"token": token, "status": "promoting"})
        if resources.redis.set(finished_key(owner), marker, nx=True, ex=_finished_ttl_s(resources)):
            return True
        current = resources.redis.get(finished_key(owner))
        return current is not None and json.loads(current).get("token") == token

    try:
        summary = _train(resources, category, caption_template, progress_and_keep_lock, entitled_to_promote)
        resources.redis.set(finished_key(owner), json.dumps({"token": token, "status": summary["status"],
                                                              "version": summary["version"]}),
                            ex=_finished_ttl_s(resources))
        if summary["promoted"]:  # settings.backfill_after_promotion: re-extract behind live uploads
            request_backfill(settings, category, summary["version"])
        return summary
    finally:
        release_training_lock(resources.redis, category, lock_value)


def _train(
    resources: TrainerResources, category: str, caption_template: str | None, progress: Progress,
    entitled: Callable[[], bool],
) -> dict[str, Any]:
    """One run, lock held: gather data, train and gate, publish; returns the run's summary."""
    spec = head_spec(resources.taxonomy, category, caption_template)
    progress({"phase": "loading"})
    bundle, data = _gather_data(resources, category, spec)
    outcome = train_and_gate(resources, category, spec, bundle, data, progress)
    progress({"phase": "uploading"})
    published = publish(resources, category, caption_template, spec, bundle, data, outcome, entitled)
    return _run_summary(resources, category, published, data, outcome)


def _gather_data(resources: TrainerResources, category: str, spec: HeadSpec) -> tuple[ClipBundle, TrainingData]:
    """The base model to fine-tune and the category's train/val/test images.

    The labels are read, their images fetched and checked, and the split extended before the
    model is built (too few usable labels fails fast, before any model load); the images then
    decode at its input size.
    """
    settings = resources.settings
    labels = split_labels(resources, category)
    bundle = create_clip(settings.model_arch, settings.model_weights, device=settings.device,
                         precision="fp32", store=resources.store, image_size=settings.train_image_size or None)
    return bundle, fetch_training_data(resources, category, labels, spec, draft_size=bundle.image_size)


def _run_summary(
    resources: TrainerResources, category: str, published: Published, data: TrainingData, outcome: GateOutcome
) -> dict[str, Any]:
    """What the train task returns (and `shelfsight train --wait` prints)."""
    bootstrap = outcome.decision_.checks.get("bootstrap", {}).get("mean", {})
    return {
        "status": "promoted" if published.promoted else "kept_champion",
        "category": category, "version": published.version, "promoted": published.promoted,
        "reason": published.reason, "champion_version": outcome.champion_version,
        "test_macro_f1": outcome.challenger.macro_f1, "champion_test_macro_f1": outcome.champion.macro_f1,
        "macro_f1_gain_interval": [bootstrap["lower"], bootstrap["upper"]] if bootstrap else None,
        "splits": data.sizes, "skipped_images": data.skipped, "report": report_key(resources, category,
                                                                                   published.version),
        "calibration": _calibration_summary(outcome),
    }


def _calibration_summary(outcome: GateOutcome) -> dict[str, Any]:
    """Per attribute: temperature, review threshold and test ECE before/after (the report has the bins)."""
    if outcome.calibration is None:
        return {}
    keys = ("status", "temperature", "review_threshold", "ece_before", "ece_after")
    return {a: {k: e[k] for k in keys} for a, e in outcome.calibration.report["attributes"].items()}


# --- operator changes to the serving version ------------------------------------------------------


def promote_version(resources: TrainerResources, category: str, version: str, reason: str) -> dict[str, Any]:
    """Operator promotion: flip CURRENT and announce (then the backfill, when configured)."""
    pointer = promote_and_announce(resources, category, version, reason).model_dump(mode="json")
    request_backfill(resources.settings, category, version)
    return pointer


def rollback_category(resources: TrainerResources, category: str) -> dict[str, Any]:
    """Serve the previous version again, and announce it."""
    pointer = resources.registry.rollback(category)
    announce_model(resources.redis, resources.settings.model_events_channel, category, pointer.version)
    request_backfill(resources.settings, category, pointer.version)  # results back to the version serving
    return pointer.model_dump(mode="json")
