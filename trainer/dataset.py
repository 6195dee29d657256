"""Training data: targets from labels, deterministic stratified splits, a balanced sampler.

Splits
------
Each product is assigned once to ``train``, ``val`` or ``test`` and keeps that assignment
forever: the assignment map is persisted beside the models (``models/<category>/test-set.json``)
so the test set stays fixed across retrains, and champion and challenger are scored on the
same images. Products seen for the first time are assigned by stratified systematic sampling:
sort the new products by (stratum, hash(seed, product_id)), where the stratum is the tuple of
their attribute values, then walk the list and send every 1/test_fraction-th product to test
(and likewise for val among the rest), starting at a hash-derived phase. Every stratum thus
gets its proportional share, and the result depends only on the seed and the product ids.

Sampler
-------
Inverse-frequency sampling with replacement: an example's weight is the mean, over the
attributes it has a label for, of ``1 / (K_a * n_a(v))`` where ``n_a(v)`` is how many training
examples carry its value ``v`` of attribute ``a`` and ``K_a`` the number of values present.
With one attribute every value is drawn equally often; with several, each attribute is
balanced as far as their joint distribution allows. We chose this over cycling the rarest
attribute's values because it needs no choice of "the" attribute and degrades gracefully
when attributes are partially labeled.
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, overload

import torch
from PIL import Image

from shelfsight.shared.clip_math import IGNORE
from shelfsight.shared.events import LabelRecord
from shelfsight.shared.imaging import decode_image

SPLITS = ("train", "val", "test")


@dataclass
class LabeledImages:
    """Images (anything indexable yielding PIL images) and per-attribute target indices.

    ``targets[attribute][i]`` is the value index of image i, or IGNORE if unlabeled.
    """

    images: Sequence[Any]
    targets: dict[str, list[int]]
    ids: list[str]

    def __len__(self) -> int:
        return len(self.ids)


class EncodedImage:
    """Image bytes decoded on demand with shared.imaging.decode_image (what the worker uses)."""

    __slots__ = ("data", "max_bytes", "max_pixels", "draft_size")

    def __init__(self, data: bytes, max_bytes: int, max_pixels: int, draft_size: int | None = None) -> None:
        self.data = data
        self.max_bytes = max_bytes
        self.max_pixels = max_pixels
        self.draft_size = draft_size  # the worker decodes JPEGs at this reduced scale too

    def decode(self) -> Image.Image:
        return decode_image(self.data, max_bytes=self.max_bytes, max_pixels=self.max_pixels,
                            draft_size=self.draft_size)


class LazyImages(Sequence[Image.Image]):
    """A sequence of EncodedImage that decodes on access: holds JPEG bytes, not pixels."""

    def __init__(self, items: Sequence[EncodedImage]) -> None:
        self._items = list(items)

    def __len__(self) -> int:
        return len(self._items)

    @overload
    def __getitem__(self, index: int) -> Image.Image: ...

    @overload
    def __getitem__(self, index: slice) -> LazyImages: ...

    def __getitem__(self, index: int | slice) -> Image.Image | LazyImages:
        if isinstance(index, slice):
            return LazyImages(self._items[index])
        return self._items[index].decode()


def target_indices(records: Sequence[LabelRecord], values: Mapping[str, Sequence[str]]) -> dict[str, list[int]]:
    """Per attribute, each record's value index, or IGNORE where not labeled (or no longer valid)."""
    targets: dict[str, list[int]] = {}
    for attribute, names in values.items():
        index = {name: i for i, name in enumerate(names)}
        targets[attribute] = [index.get(r.attributes.get(attribute, ""), IGNORE) for r in records]
    return targets


# --- splits ---------------------------------------------------------------------------------------


def _unit_hash(*parts: object) -> float:
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def _systematic(ordered: Sequence[str], fraction: float, phase: float) -> set[str]:
    """Every 1/fraction-th item of an ordered list, starting at `phase` (expected share = fraction)."""
    chosen = set()
    for i, item in enumerate(ordered):
        if math.floor((i + 1) * fraction + phase) > math.floor(i * fraction + phase):
            chosen.add(item)
    return chosen


def stratum(record: LabelRecord) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(record.attributes.items()))


def assign_splits(
    records: Sequence[LabelRecord],
    previous: Mapping[str, str],
    *,
    val_fraction: float,
    test_fraction: float,
    seed: int,
) -> dict[str, str]:
    """Split assignment of every product: previous assignments kept, new products assigned.

    Deterministic in (product ids, labels, previous, fractions, seed). See the module docstring.
    When a category is first split with at least 3 products, val and test each get at least one.
    """
    assignment = {pid: split for pid, split in previous.items() if split in SPLITS}
    new = [r for r in records if r.product_id not in assignment]
    if not new:
        return assignment
    ordered = [r.product_id for r in sorted(new, key=lambda r: (stratum(r), _unit_hash(seed, r.product_id)))]
    batch = _unit_hash(seed, "phase", *sorted(ordered))
    test = _systematic(ordered, test_fraction, batch)
    rest = [pid for pid in ordered if pid not in test]
    val_share = val_fraction / max(1e-9, 1.0 - test_fraction)
    val = _systematic(rest, min(1.0, val_share), _unit_hash(seed, "val-phase", batch))
    for pid in ordered:
        assignment[pid] = "test" if pid in test else "val" if pid in val else "train"
    _ensure_nonempty(assignment, ordered, val_fraction, test_fraction, seed)
    return assignment


def _ensure_nonempty(
    assignment: dict[str, str], new: Sequence[str], val_fraction: float, test_fraction: float, seed: int
) -> None:
    """Give val and test one product each if they are empty and there are enough products."""
    if len(assignment) < 3:
        return
    for split, fraction in (("test", test_fraction), ("val", val_fraction)):
        counts = Counter(assignment.values())
        if fraction <= 0 or counts[split] > 0 or counts["train"] < 2:
            continue
        candidates = sorted((pid for pid in new if assignment[pid] == "train"), key=lambda p: _unit_hash(seed, split, p))
        if candidates:
            assignment[candidates[0]] = split


# --- balanced sampling ----------------------------------------------------------------------------


def balanced_weights(targets: Mapping[str, Sequence[int]]) -> torch.Tensor:
    """Per-example sampling weights that balance each attribute's values (see module docstring)."""
    size = len(next(iter(targets.values()))) if targets else 0
    total = torch.zeros(size, dtype=torch.float64)
    labeled = torch.zeros(size, dtype=torch.float64)
    for column in targets.values():
        counts = Counter(t for t in column if t != IGNORE)
        if not counts:
            continue
        for i, t in enumerate(column):
            if t != IGNORE:
                total[i] += 1.0 / (len(counts) * counts[t])
                labeled[i] += 1
    weights = torch.where(labeled > 0, total / labeled.clamp(min=1), torch.zeros_like(total))
    if float(weights.sum()) == 0.0:
        return torch.ones(size, dtype=torch.float64)
    return weights


class BalancedBatchSampler:
    """Yields `steps` batches of indices drawn with replacement by balanced_weights. Seeded."""

    def __init__(self, targets: Mapping[str, Sequence[int]], batch_size: int, steps: int, seed: int) -> None:
        self.weights = balanced_weights(targets)
        self.batch_size = batch_size
        self.steps = steps
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[list[int]]:
        for _ in range(self.steps):
            drawn = torch.multinomial(self.weights, self.batch_size, replacement=True, generator=self.generator)
            yield drawn.tolist()
