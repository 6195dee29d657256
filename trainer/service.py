"""Trainer services: what the Celery tasks and the CLI call. Knows S3, Redis and the registry;
the training math itself lives in trainer.train.

- `train_category`: labels -> frozen splits -> fit -> test -> champion/challenger gate ->
  registry upload (+ report) -> promote and announce, under a per-category Redis lock.
- `import_and_trigger`: import labels, count new labels per category in Redis, enqueue a
  retrain when settings.retrain_after_labels is reached.
"""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import redis
import structlog
from celery import Celery
from safetensors.torch import save as save_safetensors

from shelfsight.shared.events import LabelRecord, parse_s3_uri
from shelfsight.shared.model_factory import WeightsError, create_clip, sha256_bytes
from shelfsight.shared.registry import Manifest, ModelRegistry, new_version
from shelfsight.shared.settings import Settings
from shelfsight.shared.storage import ObjectMissing, ObjectStore, ObjectTooLarge, S3ObjectStore
from shelfsight.shared.streams import announce_model
from shelfsight.shared.training_jobs import acquire_training_lock, enqueue_training, release_training_lock
from shelfsight.shared.taxonomy import Taxonomy, load_taxonomy
from shelfsight.trainer.dataset import EncodedImage, LabeledImages, LazyImages, assign_splits, target_indices
from shelfsight.trainer.labels import (
    ImportResult,
    LabelFileTooLarge,
    import_labels,
    label_categories,
    load_category_labels,
)
from shelfsight.trainer.report import REPORT_NAME, render_report
from shelfsight.trainer.evaluate import EvalResult, HeadSpec, evaluate
from shelfsight.trainer.train import TrainConfig, fit

log = structlog.get_logger()

TEST_SET_NAME = "test-set.json"
MIN_PRODUCTS = 3
_FETCH_THREADS = 16

Progress = Callable[[dict[str, Any]], None]


class TrainingError(Exception):
    """Training cannot run for a reason the operator can fix (too few labels, bad category)."""


# --- per-process resources ------------------------------------------------------------------------


@dataclass
class TrainerResources:
    """The trainer's clients, built once per process by its composition root and passed down."""

    settings: Settings
    store: ObjectStore
    redis: redis.Redis
    taxonomy: Taxonomy
    registry: ModelRegistry

    @classmethod
    def build(cls, settings: Settings, store: ObjectStore | None = None) -> TrainerResources:
        store = store or S3ObjectStore(settings)
        return cls(
            settings=settings,
            store=store,
            redis=redis.Redis.from_url(settings.broker_url),
            taxonomy=load_taxonomy(settings.taxonomy_path),
            registry=ModelRegistry(store, settings.bucket, settings.models_prefix),
        )


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


# --- labels ---------------------------------------------------------------------------------------


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
    resources: TrainerResources, source: bytes | str | Sequence[Mapping[str, Any]], app: Celery | None = None
) -> dict[str, Any]:
    """Import labels (see trainer.labels.import_labels), then count them towards retraining.

    `source`: JSONL bytes, an s3:// URI of a JSONL object, or a list of label dicts. When a
    category reaches settings.retrain_after_labels new labels and `app` is given, a training is
    enqueued (or the pending one reported) and the count starts again.
    """
    settings = resources.settings
    data = read_label_source(resources, source) if isinstance(source, str) else source
    result: ImportResult = import_labels(
        data, store=resources.store, bucket=settings.bucket, labels_prefix=settings.labels_prefix,
        taxonomy=resources.taxonomy, max_bytes=settings.max_label_file_bytes,
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


def head_spec(taxonomy: Taxonomy, category: str, caption_template: str | None = None) -> HeadSpec:
    """Value names and captions of every attribute (bare values unless a template is given)."""
    attributes = taxonomy.category(category).attributes
    if caption_template is not None and "{}" not in caption_template:
        raise ValueError(f"caption template {caption_template!r} must contain '{{}}' where the value goes")
    return HeadSpec(
        values={a: attr.value_names for a, attr in attributes.items()},
        captions={a: attr.captions(caption_template) for a, attr in attributes.items()},
    )


def _valid_labels(taxonomy: Taxonomy, records: Sequence[LabelRecord]) -> tuple[list[LabelRecord], int]:
    """Labels still valid under today's taxonomy (values may have been removed since import)."""
    kept = []
    for record in records:
        try:
            taxonomy.check_labels(record.category, record.attributes)
            kept.append(record)
        except (KeyError, ValueError):
            continue
    return kept, len(records) - len(kept)


def load_assignments(resources: TrainerResources, category: str) -> dict[str, str]:
    """The persisted split assignment {product_id: split}, empty for a new category."""
    registry = resources.registry
    try:
        body = resources.store.get(registry.bucket, registry.key(category, TEST_SET_NAME)).body
    except ObjectMissing:
        return {}
    return dict(json.loads(body).get("assignments", {}))


def persist_assignments(resources: TrainerResources, category: str, assignments: Mapping[str, str]) -> str:
    """Write test-set.json (all assignments, test ids listed); returns its key."""
    settings = resources.settings
    test_ids = sorted(pid for pid, split in assignments.items() if split == "test")
    resources.registry.put_json(category, TEST_SET_NAME, {
        "category": category,
        "seed": settings.train_seed,
        "val_fraction": settings.train_val_fraction,
        "test_fraction": settings.train_test_fraction,
        "test_product_ids": test_ids,
        "assignments": dict(sorted(assignments.items())),
        "updated_at": datetime.now(UTC).isoformat(),
    })
    return resources.registry.key(category, TEST_SET_NAME)


def _fetch_images(
    resources: TrainerResources, records: Sequence[LabelRecord], draft_size: int | None = None
) -> tuple[list[EncodedImage | None], list[str]]:
    """Image bytes per record (None where unusable now) and one message per skipped image.

    `draft_size` is the model's input size: JPEGs decode at the same reduced scale as in the worker.
    """
    settings = resources.settings

    def fetch(record: LabelRecord) -> EncodedImage | str:
        bucket, key = parse_s3_uri(record.image)
        try:
            body = resources.store.get(bucket, key, max_bytes=settings.max_image_bytes).body
        except (ObjectMissing, ObjectTooLarge) as exc:
            return f"{record.product_id}: {exc}"
        return EncodedImage(body, settings.max_image_bytes, settings.max_image_pixels, draft_size)

    with ThreadPoolExecutor(max_workers=_FETCH_THREADS) as pool:
        fetched = list(pool.map(fetch, records))
    images = [f if isinstance(f, EncodedImage) else None for f in fetched]
    skipped = [f for f in fetched if isinstance(f, str)]
    return images, skipped


def _split_data(
    records: Sequence[LabelRecord], images: Sequence[EncodedImage | None], assignments: Mapping[str, str], spec: HeadSpec
) -> dict[str, LabeledImages]:
    out = {}
    for split in ("train", "val", "test"):
        chosen = [(r, im) for r, im in zip(records, images, strict=True) if im is not None and assignments.get(r.product_id) == split]
        out[split] = LabeledImages(
            images=LazyImages([im for _, im in chosen if im is not None]),
            targets=target_indices([r for r, _ in chosen], spec.values),
            ids=[r.product_id for r, _ in chosen],
        )
    return out


def evaluate_champion(
    resources: TrainerResources, category: str, test: LabeledImages, spec: HeadSpec
) -> tuple[str | None, EvalResult | None, str | None]:
    """(champion version, its test result, error) — all None for a category with no champion."""
    pointer = resources.registry.current(category)
    if pointer is None:
        return None, None, None
    settings = resources.settings
    try:
        manifest = resources.registry.manifest(category, pointer.version)
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


def gate(challenger: EvalResult, champion: EvalResult | None, champion_version: str | None,
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


def train_category(
    resources: TrainerResources,
    category: str,
    *,
    owner: str | None = None,
    caption_template: str | None = None,
    progress: Progress | None = None,
    config_overrides: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Train a challenger for `category`, gate it against the champion, publish the result.

    Holds the category's training lock for `owner` (the task id) for the whole run. If another
    owner holds it, returns {"status": "skipped", ...} without training.
    """
    settings = resources.settings
    owner = owner or uuid.uuid4().hex
    holder = acquire_training_lock(resources.redis, category, owner, settings.training_lock_ttl_s)
    if holder is not None:
        log.warning("train.locked", category=category, holder=holder)
        return {"status": "skipped", "category": category,
                "reason": f"a training for {category} is already queued or running (task {holder})",
                "holder": holder}
    report = progress or (lambda _: None)

    def progress_and_keep_lock(meta: dict[str, Any]) -> None:
        if meta.get("phase") != "step":  # refresh the TTL, so a run longer than it keeps its lock
            acquire_training_lock(resources.redis, category, owner, settings.training_lock_ttl_s)
        report(meta)

    try:
        return _train(resources, category, caption_template, progress_and_keep_lock, config_overrides or {})
    finally:
        release_training_lock(resources.redis, category, owner)


def _train(
    resources: TrainerResources, category: str, caption_template: str | None, progress: Progress,
    config_overrides: Mapping[str, Any],
) -> dict[str, Any]:
    settings, registry = resources.settings, resources.registry
    spec = head_spec(resources.taxonomy, category, caption_template)
    progress({"phase": "loading"})
    labels = load_category_labels(resources.store, settings.bucket, settings.labels_prefix, category)
    records, stale = _valid_labels(resources.taxonomy, labels.records)
    if len(records) < MIN_PRODUCTS:
        raise TrainingError(
            f"{category} has {len(records)} usable labeled products; at least {MIN_PRODUCTS} are needed. "
            "Import labels with `shelfsight labels import FILE.jsonl`."
        )
    previous = load_assignments(resources, category)
    assignments = assign_splits(records, previous, val_fraction=settings.train_val_fraction,
                                test_fraction=settings.train_test_fraction, seed=settings.train_seed)
    test_set_key = persist_assignments(resources, category, assignments) if assignments != previous else registry.key(category, TEST_SET_NAME)
    bundle = create_clip(settings.model_arch, settings.model_weights, device=settings.device,
                         precision="fp32", store=resources.store)
    images, skipped = _fetch_images(resources, records, draft_size=bundle.image_size)
    data = _split_data(records, images, assignments, spec)
    sizes = {k: len(v) for k, v in data.items()}
    log.info("train.data", category=category, labels=len(records), stale=stale, skipped=len(skipped), **sizes)
    if sizes["train"] == 0 or sizes["test"] == 0:
        raise TrainingError(f"{category}: split sizes {sizes}; need at least one training and one test product")

    config = TrainConfig.from_settings(settings, **dict(config_overrides))
    result = fit(bundle, spec, data["train"], data["val"], config, progress)
    progress({"phase": "evaluating"})
    challenger = evaluate(bundle, spec, data["test"], batch_size=config.eval_batch_size)
    champion_version, champion, champion_error = evaluate_champion(resources, category, data["test"], spec)
    promote, reason = gate(challenger, champion, champion_version, champion_error, settings.promotion_margin)

    progress({"phase": "uploading"})
    version = new_version()
    state = {k: v.contiguous() for k, v in result.state_dict.items()}
    weights = save_safetensors(state, metadata={"category": category, "version": version})
    decision = {"promoted": promote, "reason": reason, "champion_version": champion_version,
                "challenger_macro_f1": challenger.macro_f1,
                "champion_macro_f1": champion.macro_f1 if champion else None,
                "margin": settings.promotion_margin}
    snapshot = labels.snapshot()
    report = {
        "category": category, "version": version, "created_at": datetime.now(UTC).isoformat(),
        "architecture": bundle.architecture, "base_weights": bundle.weights,
        "decision": decision, "splits": sizes, "labels": {"count": snapshot["count"], "stale": stale, "skipped_images": skipped},
        "training": result.summary(),
        "test": {"challenger": challenger.as_dict(), "champion": champion.as_dict() if champion else None,
                 "champion_version": champion_version, "test_set_key": test_set_key},
    }
    files = render_report(report)
    manifest = Manifest(
        category=category, version=version, architecture=bundle.architecture, base_weights=bundle.weights,
        taxonomy_version=resources.taxonomy.version, values=spec.values, captions=spec.captions,
        caption_template=caption_template, weights_sha256=sha256_bytes(weights), weights_bytes=len(weights),
        metrics={"test_macro_f1": challenger.macro_f1, "test_accuracy": challenger.accuracy,
                 "test": challenger.as_dict(), "val_loss": result.best_val_loss, "decision": decision},
        labels_snapshot=snapshot, test_set_key=test_set_key, parent_version=champion_version,
        training={**result.summary(), "splits": sizes, "report": registry.key(category, version, REPORT_NAME)},
    )
    registry.upload_version(manifest, weights, extra_files=files)
    if promote:
        registry.promote(category, version, reason=reason)
        announce_model(resources.redis, settings.model_events_channel, category, version)
    log.info("train.done", category=category, version=version, promoted=promote, reason=reason,
             test_macro_f1=round(challenger.macro_f1, 4))
    return {
        "status": "promoted" if promote else "kept_champion",
        "category": category, "version": version, "promoted": promote, "reason": reason,
        "champion_version": champion_version, "test_macro_f1": challenger.macro_f1,
        "champion_test_macro_f1": champion.macro_f1 if champion else None,
        "splits": sizes, "report": registry.key(category, version, REPORT_NAME),
    }


def promote_version(resources: TrainerResources, category: str, version: str, reason: str) -> dict[str, Any]:
    """Operator promotion: flip CURRENT and announce."""
    pointer = resources.registry.promote(category, version, reason=reason)
    announce_model(resources.redis, resources.settings.model_events_channel, category, version)
    return pointer.model_dump(mode="json")


def rollback_category(resources: TrainerResources, category: str) -> dict[str, Any]:
    """Serve the previous version again, and announce it."""
    pointer = resources.registry.rollback(category)
    announce_model(resources.redis, resources.settings.model_events_channel, category, pointer.version)
    return pointer.model_dump(mode="json")
