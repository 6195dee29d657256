"""A category's training data, gathered from S3: usable labels, their images, frozen splits.

Two steps, because decoding images needs the base model's input size (JPEGs decode at the
same reduced scale as in the worker) and the model is built only once the data is known good:

- `split_labels`: the label log -> labels valid under today's taxonomy (attribute by
  attribute) -> their image bytes (transient S3 errors retried; missing, refused or
  undecodable images skipped and listed) -> groups by image content (sha256 of the bytes) and
  `group_id` -> the frozen, group-aware train/val/test assignment, persisted as a
  content-addressed snapshot ``test-sets/<sha256>.json`` beside the models, which the
  ``TEST_SET`` pointer names;
- `fetch_training_data`: those images -> train/val/test LabeledImages.

Why sha256 of the bytes and not the S3 ETag: an ETag is an MD5 of the bytes only for
single-part uploads without SSE-KMS; the same photo uploaded in parts, or encrypted, gets
another ETag. The trainer downloads every labeled image anyway, so hashing the bytes costs
nothing extra and finds every exact duplicate, whoever uploaded it and how.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

import structlog

from shelfsight.shared.errors import Rejected
from shelfsight.shared.events import LabelRecord
from shelfsight.shared.image_sources import ImageSourcePolicy, ImageSourceRefused
from shelfsight.shared.imaging import decode_image
from shelfsight.shared.settings import Settings
from shelfsight.shared.storage import ObjectMissing, ObjectTooLarge, TransientStorageError
from shelfsight.shared.taxonomy import Taxonomy
from shelfsight.trainer.dataset import (
    EncodedImage,
    LabeledImages,
    LazyImages,
    assign_splits,
    target_indices,
    untestable_values,
)
from shelfsight.trainer.evaluate import HeadSpec
from shelfsight.trainer.labels import LabelSet, load_category_labels
from shelfsight.trainer.resources import TrainerResources

log = structlog.get_logger()

TEST_SETS_DIR = "test-sets"
TEST_SET_POINTER = "TEST_SET"
LEGACY_TEST_SET_NAME = "test-set.json"  # overwritten in place before snapshots; read once, never written
MIN_PRODUCTS = 3
_FETCH_THREADS = 16
_CHECK_DRAFT = 64  # decode check of each labeled image: JPEGs at a reduced scale (any defect still shows)
T = TypeVar("T")


class TrainingError(Exception):
    """Training cannot run for a reason the operator can fix (too few labels, bad category)."""


class TransientFetchError(RuntimeError):
    """S3 kept failing (5xx, timeouts, denied credentials) after every retry: the run fails, nothing is promoted."""


def head_spec(taxonomy: Taxonomy, category: str, caption_template: str | None = None) -> HeadSpec:
    """Value names and captions of every attribute (bare values unless a template is given)."""
    attributes = taxonomy.category(category).attributes
    if caption_template is not None and "{}" not in caption_template:
        raise ValueError(f"caption template {caption_template!r} must contain '{{}}' where the value goes")
    return HeadSpec(
        values={a: attr.value_names for a, attr in attributes.items()},
        captions={a: attr.captions(caption_template) for a, attr in attributes.items()},
    )


def zero_shot_spec(taxonomy: Taxonomy, category: str) -> HeadSpec:
    """The classifier the worker serves before any promotion: the taxonomy's zero-shot template."""
    return head_spec(taxonomy, category, taxonomy.category(category).zero_shot_template)


def with_retries(settings: Settings, what: str, call: Callable[[], T]) -> T:
    """`call()`, retried on TransientStorageError settings.max_retries times with capped exponential backoff.

    Raises TransientFetchError once the retries are spent.
    """
    delay = settings.retry_backoff_s
    for attempt in range(settings.max_retries + 1):
        try:
            return call()
        except TransientStorageError as exc:
            if attempt == settings.max_retries:
                raise TransientFetchError(f"{what}: {exc} (after {attempt + 1} attempts)") from exc
            log.warning("train.s3_retry", what=what, attempt=attempt + 1, error=str(exc)[:200])
            time.sleep(delay)
            delay = min(delay * 2, settings.retry_backoff_max_s)
    raise AssertionError("unreachable")


# --- labels, images and splits -------------------------------------------------------------------


@dataclass(frozen=True)
class SplitLabels:
    """A category's labels, the ones usable today, their images, and the split of every product."""

    label_set: LabelSet  # as read from the label log; its snapshot goes into the manifest
    records: list[LabelRecord]  # valid under today's taxonomy, with a usable image
    stale: int  # (product, attribute) labels dropped because the taxonomy no longer has them
    assignments: dict[str, str]  # {product_id: "train" | "val" | "test"}
    test_set_key: str  # the content-addressed snapshot of the split and the test set
    test_set_sha256: str
    images: dict[str, bytes] = field(repr=False, default_factory=dict)  # {product_id: image bytes}
    image_sha256: dict[str, str] = field(default_factory=dict)  # {product_id: sha256 of its image}
    skipped: list[str] = field(default_factory=list)  # one message per labeled image not usable
    untestable: dict[str, list[str]] = field(default_factory=dict)  # values too rare to test: kept in train


def split_labels(resources: TrainerResources, category: str) -> SplitLabels:
    """Read the category's labels, keep the valid ones, fetch their images, extend the frozen split.

    Raises TrainingError when fewer than MIN_PRODUCTS labeled products are usable, and
    TransientFetchError when S3 keeps failing.
    """
    settings = resources.settings
    labels = with_retries(settings, f"labels of {category}", lambda: load_category_labels(
        resources.store, settings.bucket, settings.labels_prefix, category))
    records, stale = valid_labels(resources.taxonomy, category, labels.records)
    _enough(category, records)
    images, skipped = _fetch_images(resources, records)
    records = [r for r in records if r.product_id in images]
    _enough(category, records)
    digests = {pid: hashlib.sha256(body).hexdigest() for pid, body in images.items()}
    links = {r.product_id: [f"sha256:{digests[r.product_id]}"] + ([f"group:{r.group_id}"] if r.group_id else [])
             for r in records}
    previous = load_assignments(resources, category)
    assignments = assign_splits(records, previous, val_fraction=settings.train_val_fraction,
                                test_fraction=settings.train_test_fraction, seed=settings.train_split_seed,
                                links=links, min_value_examples=settings.train_min_value_examples)
    untestable = untestable_values(records, settings.train_min_value_examples)
    key, digest = persist_test_set(resources, category, assignments, records, digests)
    return SplitLabels(labels, records, stale, assignments, key, digest, images, digests, skipped, untestable)


def _enough(category: str, records: Sequence[LabelRecord]) -> None:
    if len(records) < MIN_PRODUCTS:
        raise TrainingError(
            f"{category} has {len(records)} usable labeled products; at least {MIN_PRODUCTS} are needed. "
            "Import labels with `shelfsight labels import FILE.jsonl`."
        )


def valid_labels(taxonomy: Taxonomy, category: str, records: Sequence[LabelRecord]) -> tuple[list[LabelRecord], int]:
    """Labels under today's taxonomy, attribute by attribute, and how many (product, attribute) were dropped.

    An attribute (or a value) that has left the taxonomy since import is dropped alone: the
    product's other attributes stay. A product with no valid attribute left is dropped.
    """
    attributes = taxonomy.category(category).attributes
    kept, dropped = [], 0
    for record in records:
        valid = {a: v for a, v in record.attributes.items() if a in attributes and v in attributes[a].value_names}
        dropped += len(record.attributes) - len(valid)
        if valid:
            kept.append(record if len(valid) == len(record.attributes)
                        else record.model_copy(update={"attributes": valid}))
    return kept, dropped


def _fetch_images(resources: TrainerResources, records: Sequence[LabelRecord]) -> tuple[dict[str, bytes], list[str]]:
    """{product_id: image bytes} of the usable images, and one message per skipped one.

    Skipped, and listed: images outside the allowlist, missing, too large, or that do not
    decode. Transient S3 errors are retried; if they persist the run fails (TransientFetchError)
    rather than train or test on a silently smaller set.
    """
    settings = resources.settings
    sources = ImageSourcePolicy.from_settings(settings)

    def fetch(record: LabelRecord) -> bytes | str:
        try:  # labels stored before the allowlist (or under another one) are checked again here
            bucket, key = sources.check(record.image)
        except ImageSourceRefused as exc:
            return f"{record.product_id}: {exc}"
        try:
            body = with_retries(settings, record.image, lambda: resources.store.get(
                bucket, key, max_bytes=settings.max_image_bytes).body)
        except (ObjectMissing, ObjectTooLarge) as exc:
            return f"{record.product_id}: {exc}"
        try:  # once here, so one bad image is skipped instead of failing every epoch that draws it
            decode_image(body, max_bytes=settings.max_image_bytes, max_pixels=settings.max_image_pixels,
                         draft_size=_CHECK_DRAFT)
        except Rejected as exc:
            return f"{record.product_id}: {record.image}: {exc.code}: {exc}"
        return body

    with ThreadPoolExecutor(max_workers=_FETCH_THREADS) as pool:
        fetched = list(pool.map(fetch, records))
    images = {r.product_id: f for r, f in zip(records, fetched, strict=True) if isinstance(f, bytes)}
    skipped = [f for f in fetched if isinstance(f, str)]
    for message in skipped:
        log.warning("train.image_skipped", reason=message[:300])
    return images, skipped


# --- the frozen split: content-addressed snapshots ------------------------------------------------


def load_assignments(resources: TrainerResources, category: str) -> dict[str, str]:
    """The persisted split assignment {product_id: split}, empty for a new category.

    Read from the snapshot the TEST_SET pointer names; categories split before snapshots
    existed fall back to the legacy test-set.json once.
    """
    registry, settings = resources.registry, resources.settings

    def read(key: str) -> dict[str, Any] | None:
        try:
            body = with_retries(settings, key, lambda: resources.store.get(registry.bucket, key).body)
        except ObjectMissing:
            return None
        payload: dict[str, Any] = json.loads(body)
        return payload

    pointer = read(registry.key(category, TEST_SET_POINTER))
    if pointer is not None:
        snapshot = read(pointer["key"])
        if snapshot is None:
            raise TrainingError(f"{category}: the TEST_SET pointer names {pointer['key']}, which does not exist")
        return dict(snapshot["assignments"])
    legacy = read(registry.key(category, LEGACY_TEST_SET_NAME))
    return dict(legacy.get("assignments", {})) if legacy else {}


def split_snapshot(
    category: str, settings: Settings, assignments: Mapping[str, str], records: Sequence[LabelRecord],
    digests: Mapping[str, str],
) -> dict[str, Any]:
    """What the snapshot holds: the split parameters, every assignment, and each test example in full."""
    test = sorted((r for r in records if assignments.get(r.product_id) == "test"), key=lambda r: r.product_id)
    return {
        "category": category,
        "split_seed": settings.train_split_seed,
        "val_fraction": settings.train_val_fraction,
        "test_fraction": settings.train_test_fraction,
        "min_value_examples": settings.train_min_value_examples,
        "assignments": dict(sorted(assignments.items())),
        "test": [{"product_id": r.product_id, "image": r.image, "image_sha256": digests.get(r.product_id),
                  "attributes": dict(sorted(r.attributes.items()))} for r in test],
    }


def persist_test_set(
    resources: TrainerResources, category: str, assignments: Mapping[str, str], records: Sequence[LabelRecord],
    digests: Mapping[str, str],
) -> tuple[str, str]:
    """Write test-sets/<sha256>.json (never overwritten: the name is the content's hash) and point
    TEST_SET at it; returns (key, sha256)."""
    registry, settings = resources.registry, resources.settings
    snapshot = split_snapshot(category, settings, assignments, records, digests)
    body = json.dumps(snapshot, sort_keys=True, separators=(",", ":")).encode()
    digest = hashlib.sha256(body).hexdigest()
    key = registry.key(category, TEST_SETS_DIR, f"{digest}.json")
    if not with_retries(settings, key, lambda: resources.store.exists(registry.bucket, key)):
        with_retries(settings, key, lambda: resources.store.put(registry.bucket, key, body))
    pointer_key = registry.key(category, TEST_SET_POINTER)
    try:
        current = json.loads(with_retries(settings, pointer_key, lambda: resources.store.get(
            registry.bucket, pointer_key).body))
    except ObjectMissing:
        current = {}
    if current.get("key") != key:  # the pointer moves only when the split or the test set changed
        pointer = json.dumps({"key": key, "sha256": digest, "previous": current.get("key"),
                              "updated_at": datetime.now(UTC).isoformat()}).encode()
        with_retries(settings, pointer_key, lambda: resources.store.put(registry.bucket, pointer_key, pointer))
    return key, digest


# --- images per split -----------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainingData:
    """The labeled images of each split, and what could not be used."""

    labels: SplitLabels
    splits: dict[str, LabeledImages]  # "train", "val", "test"
    skipped: list[str]  # one message per labeled image that could not be used

    @property
    def sizes(self) -> dict[str, int]:
        return {split: len(images) for split, images in self.splits.items()}


def fetch_training_data(
    resources: TrainerResources, category: str, labels: SplitLabels, spec: HeadSpec, draft_size: int | None = None
) -> TrainingData:
    """The images of `labels` grouped by split, targets indexing into `spec.values`.

    `draft_size` is the model's input size. Raises TrainingError when the train or test split
    has no usable image.
    """
    settings = resources.settings
    out = {}
    for split in ("train", "val", "test"):
        chosen = [r for r in labels.records if labels.assignments.get(r.product_id) == split]
        out[split] = LabeledImages(
            images=LazyImages([EncodedImage(labels.images[r.product_id], settings.max_image_bytes,
                                            settings.max_image_pixels, draft_size) for r in chosen]),
            targets=target_indices(chosen, spec.values),
            ids=[r.product_id for r in chosen],
        )
    data = TrainingData(labels, out, labels.skipped)
    sizes = data.sizes
    log.info("train.data", category=category, labels=len(labels.records), stale=labels.stale,
             skipped=len(labels.skipped), untestable=labels.untestable, **sizes)
    if sizes["train"] == 0 or sizes["test"] == 0:
        raise TrainingError(f"{category}: split sizes {sizes}; need at least one training and one test product")
    return data
