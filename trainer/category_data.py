"""A category's training data, gathered from S3: usable labels, frozen splits, fetched images.

Two steps, because fetching images needs the base model's input size (JPEGs decode at the
same reduced scale as in the worker) and the model is built only once there are enough labels:

- `split_labels`: the label log -> labels valid under today's taxonomy -> the frozen
  train/val/test assignment (persisted as test-set.json beside the models);
- `fetch_training_data`: those labels' images -> train/val/test LabeledImages.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime

import structlog

from shelfsight.shared.events import LabelRecord
from shelfsight.shared.image_sources import ImageSourcePolicy, ImageSourceRefused
from shelfsight.shared.storage import ObjectMissing, ObjectTooLarge
from shelfsight.shared.taxonomy import Taxonomy
from shelfsight.trainer.dataset import (
    EncodedImage,
    LabeledImages,
    LazyImages,
    assign_splits,
    target_indices,
)
from shelfsight.trainer.evaluate import HeadSpec
from shelfsight.trainer.labels import LabelSet, load_category_labels
from shelfsight.trainer.resources import TrainerResources

log = structlog.get_logger()

TEST_SET_NAME = "test-set.json"
MIN_PRODUCTS = 3
_FETCH_THREADS = 16


class TrainingError(Exception):
    """Training cannot run for a reason the operator can fix (too few labels, bad category)."""


def head_spec(taxonomy: Taxonomy, category: str, caption_template: str | None = None) -> HeadSpec:
    """Value names and captions of every attribute (bare values unless a template is given)."""
    attributes = taxonomy.category(category).attributes
    if caption_template is not None and "{}" not in caption_template:
        raise ValueError(f"caption template {caption_template!r} must contain '{{}}' where the value goes")
    return HeadSpec(
        values={a: attr.value_names for a, attr in attributes.items()},
        captions={a: attr.captions(caption_template) for a, attr in attributes.items()},
    )


# --- labels and splits ----------------------------------------------------------------------------


@dataclass(frozen=True)
class SplitLabels:
    """A category's labels, the ones still usable, and the split of every product."""

    label_set: LabelSet  # as read from the label log; its snapshot goes into the manifest
    records: list[LabelRecord]  # valid under today's taxonomy
    stale: int  # labels dropped because the taxonomy lost their value since import
    assignments: dict[str, str]  # {product_id: "train" | "val" | "test"}
    test_set_key: str  # where the assignment is persisted


def split_labels(resources: TrainerResources, category: str) -> SplitLabels:
    """Read the category's labels, keep the valid ones, and extend the frozen split to new products.

    Raises TrainingError when fewer than MIN_PRODUCTS labeled products are usable.
    """
    settings = resources.settings
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
    if assignments != previous:
        test_set_key = persist_assignments(resources, category, assignments)
    else:
        test_set_key = resources.registry.key(category, TEST_SET_NAME)
    return SplitLabels(labels, records, stale, assignments, test_set_key)


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


# --- images ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainingData:
    """The labeled images of each split, and what could not be used."""

    labels: SplitLabels
    splits: dict[str, LabeledImages]  # "train", "val", "test"
    skipped: list[str]  # one message per image that could not be fetched

    @property
    def sizes(self) -> dict[str, int]:
        return {split: len(images) for split, images in self.splits.items()}


def fetch_training_data(
    resources: TrainerResources, category: str, labels: SplitLabels, spec: HeadSpec, draft_size: int | None = None
) -> TrainingData:
    """Fetch the images of `labels` and group them by split, targets indexing into `spec.values`.

    `draft_size` is the model's input size. Raises TrainingError when the train or test split
    has no usable image.
    """
    images, skipped = _fetch_images(resources, labels.records, draft_size=draft_size)
    data = TrainingData(labels, _split_data(labels.records, images, labels.assignments, spec), skipped)
    sizes = data.sizes
    log.info("train.data", category=category, labels=len(labels.records), stale=labels.stale,
             skipped=len(skipped), **sizes)
    if sizes["train"] == 0 or sizes["test"] == 0:
        raise TrainingError(f"{category}: split sizes {sizes}; need at least one training and one test product")
    return data


def _fetch_images(
    resources: TrainerResources, records: Sequence[LabelRecord], draft_size: int | None = None
) -> tuple[list[EncodedImage | None], list[str]]:
    """Image bytes per record (None where unusable now) and one message per skipped image.

    `draft_size` is the model's input size: JPEGs decode at the same reduced scale as in the worker.
    """
    settings = resources.settings
    sources = ImageSourcePolicy.from_settings(settings)

    def fetch(record: LabelRecord) -> EncodedImage | str:
        try:  # labels stored before the allowlist (or under another one) are checked again here
            bucket, key = sources.check(record.image)
        except ImageSourceRefused as exc:
            return f"{record.product_id}: {exc}"
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
