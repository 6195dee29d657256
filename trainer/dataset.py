"""Training data: targets from labels, deterministic group-aware stratified splits, a tempered sampler.

Splits
------
Each product is assigned once to ``train``, ``val`` or ``test`` and keeps that assignment:
the assignment map is persisted beside the models (a content-addressed
``models/<category>/test-sets/<sha256>.json``) so the test set stays fixed across retrains,
and champion and challenger are scored on the same images.

Products are first grouped: products whose images have the same bytes (sha256), or that
share a label's ``group_id`` (variants of one product), form one group, and a group never
spans splits. A group that gains a member already assigned goes wholly to the most held-out
split of its members (test, then val, then train), so a duplicate found later never leaves a
copy of a test image in train.

New groups are assigned by stratified systematic sampling: sort them by (stratum,
hash(seed, group)), where the stratum lists the group's (count, attribute, value) pairs rarest
first, then walk the list and send every 1/test_fraction-th group to test (and likewise for
val among the rest), starting at a hash-derived phase. Products with the same values sit
together and rare values lead, so each value gets its proportional share; the result depends
only on the seed and the data. Groups carrying a value labeled on fewer than
``min_value_examples`` products (3 by default) stay in train: such values are reported as
untestable rather than left out of training a third of the time.

Sampler
-------
Tempered inverse-frequency sampling with replacement: an example's weight is the mean, over
the attributes it has a label for, of ``n_a(v)^-p / sum_u n_a(u)^(1-p)``, where ``n_a(v)`` is
how many training examples carry its value ``v`` of attribute ``a``. With ``p = 1`` every
value of an attribute is drawn equally often (``1 / (K_a n_a(v))``); with ``p = 0.5`` (the
default, `train_sampler_power`) a value's share grows with the square root of its count. No
example is drawn more than `train_sampler_max_ratio` times as often as under uniform
sampling, so a value with a single example is not drawn about a hundred times per epoch. We
chose inverse frequency over cycling the rarest attribute's values because it needs no choice
of "the" attribute and degrades gracefully when attributes are partially labeled.
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
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


def value_counts(records: Iterable[LabelRecord]) -> Counter[tuple[str, str]]:
    """How many products carry each (attribute, value)."""
    return Counter((a, v) for r in records for a, v in r.attributes.items())


def stratum(record: LabelRecord, counts: Mapping[tuple[str, str], int] | None = None) -> tuple[Any, ...]:
    """Sort key of a product for stratified sampling: its (count, attribute, value) pairs, rarest first.

    Products with the same values sit together, and the rarest values lead, so the systematic
    walk gives each value its proportional share, rare values included.
    """
    counts = counts or {}
    return tuple(sorted((counts.get((a, v), 0), a, v) for a, v in record.attributes.items()))


def untestable_values(records: Iterable[LabelRecord], min_examples: int) -> dict[str, list[str]]:
    """{attribute: values} labeled on fewer than `min_examples` products: kept in train, not testable."""
    out: dict[str, list[str]] = {}
    for (attribute, value), count in sorted(value_counts(records).items()):
        if count < min_examples:
            out.setdefault(attribute, []).append(value)
    return out


def group_products(records: Sequence[LabelRecord], links: Mapping[str, Iterable[str]]) -> dict[str, str]:
    """{product_id: group}: products that share any link key (image content hash, group_id) form one group.

    The group's name is its smallest product id, so it depends only on the data.
    """
    parent = {r.product_id: r.product_id for r in records}

    def root(pid: str) -> str:
        while parent[pid] != pid:
            parent[pid] = parent[parent[pid]]
            pid = parent[pid]
        return pid

    first_with: dict[str, str] = {}
    for record in records:
        for key in links.get(record.product_id, ()):
            other = first_with.setdefault(key, record.product_id)
            a, b = root(other), root(record.product_id)
            if a != b:
                parent[max(a, b)] = min(a, b)
    return {pid: root(pid) for pid in parent}


_HELD_OUT_RANK = {"train": 0, "val": 1, "test": 2}


def assign_splits(
    records: Sequence[LabelRecord],
    previous: Mapping[str, str],
    *,
    val_fraction: float,
    test_fraction: float,
    seed: int,
    links: Mapping[str, Iterable[str]] | None = None,
    min_value_examples: int = 0,
) -> dict[str, str]:
    """Split assignment of every product: previous assignments kept, new groups assigned.

    Deterministic in (product ids, labels, links, previous, fractions, seed). See the module
    docstring. `links` maps a product to its group keys (image content hash, group_id): a group
    never spans splits. A group of which some products were assigned before goes wholly to
    the most held-out of their splits (test, then val): a duplicate found later never leaves a
    copy in train. New groups that carry a value labeled on fewer than `min_value_examples`
    products stay in train. When a category is first split with at least 3 groups, val and
    test each get at least one.
    """
    groups = group_products(records, links or {})
    members: dict[str, list[LabelRecord]] = {}
    for record in records:
        members.setdefault(groups[record.product_id], []).append(record)
    assignment = {pid: split for pid, split in previous.items() if split in SPLITS}
    counts = value_counts(records)
    new: list[str] = []
    for group, products in members.items():
        before = [assignment[r.product_id] for r in products if r.product_id in assignment]
        if before:
            split = max(before, key=_HELD_OUT_RANK.__getitem__)
            for r in products:
                assignment[r.product_id] = split
        elif any(counts[(a, v)] < min_value_examples for r in products for a, v in r.attributes.items()):
            for r in products:
                assignment[r.product_id] = "train"
        else:
            new.append(group)
    if not new:
        return assignment
    keys = {g: min(stratum(r, counts) for r in members[g]) for g in new}
    ordered = sorted(new, key=lambda g: (keys[g], _unit_hash(seed, g)))
    batch = _unit_hash(seed, "phase", *sorted(ordered))
    test = _systematic(ordered, test_fraction, batch)
    rest = [g for g in ordered if g not in test]
    val_share = val_fraction / max(1e-9, 1.0 - test_fraction)
    val = _systematic(rest, min(1.0, val_share), _unit_hash(seed, "val-phase", batch))
    chosen = {g: "test" if g in test else "val" if g in val else "train" for g in ordered}
    for group, split in chosen.items():
        for r in members[group]:
            assignment[r.product_id] = split
    if len(members) >= 3:
        _ensure_nonempty(assignment, {g: members[g] for g in ordered}, val_fraction, test_fraction, seed)
    return assignment


def _ensure_nonempty(
    assignment: dict[str, str], new: Mapping[str, Sequence[LabelRecord]], val_fraction: float,
    test_fraction: float, seed: int,
) -> None:
    """Give val and test one new group each if they are empty and train keeps at least one group."""
    for split, fraction in (("test", test_fraction), ("val", val_fraction)):
        in_split = {assignment[r.product_id] for g in new for r in new[g]} | set(assignment.values())
        train_groups = [g for g in new if assignment[new[g][0].product_id] == "train"]
        if fraction <= 0 or split in in_split or len(train_groups) < 2:
            continue
        chosen = min(train_groups, key=lambda g: _unit_hash(seed, split, g))
        for r in new[chosen]:
            assignment[r.product_id] = split


# --- balanced sampling ----------------------------------------------------------------------------


def balanced_weights(
    targets: Mapping[str, Sequence[int]], power: float = 1.0, max_ratio: float | None = None
) -> torch.Tensor:
    """Per-example sampling weights that balance each attribute's values (see module docstring).

    `power` tempers the balancing (1: each value equally often, 0: as labeled); `max_ratio` caps
    any example at that many times its share under uniform sampling.
    """
    size = len(next(iter(targets.values()))) if targets else 0
    total = torch.zeros(size, dtype=torch.float64)
    labeled = torch.zeros(size, dtype=torch.float64)
    for column in targets.values():
        counts = Counter(t for t in column if t != IGNORE)
        if not counts:
            continue
        mass = sum(n ** (1.0 - power) for n in counts.values())
        for i, t in enumerate(column):
            if t != IGNORE:
                total[i] += counts[t] ** (-power) / mass
                labeled[i] += 1
    weights = torch.where(labeled > 0, total / labeled.clamp(min=1), torch.zeros_like(total))
    if float(weights.sum()) == 0.0:
        return torch.ones(size, dtype=torch.float64)
    if max_ratio is not None:
        weights = _cap(weights / weights.sum(), max(1.0, max_ratio) / size)
    return weights


def _cap(p: torch.Tensor, cap: float) -> torch.Tensor:
    """Probabilities with none above `cap`: the excess is spread over the rest in proportion (water-filling)."""
    fixed = torch.zeros_like(p, dtype=torch.bool)
    for _ in range(len(p)):
        free = p[~fixed].sum()
        q = torch.where(fixed, torch.full_like(p, cap), p * (1.0 - cap * float(fixed.sum())) / free)
        over = (q > cap * (1 + 1e-12)) & ~fixed
        if not bool(over.any()):
            return q
        fixed |= over
    return p


class BalancedBatchSampler:
    """Yields `steps` batches of indices drawn with replacement by balanced_weights. Seeded."""

    def __init__(
        self, targets: Mapping[str, Sequence[int]], batch_size: int, steps: int, seed: int,
        power: float = 1.0, max_ratio: float | None = None,
    ) -> None:
        self.weights = balanced_weights(targets, power, max_ratio)
        self.batch_size = batch_size
        self.steps = steps
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[list[int]]:
        for _ in range(self.steps):
            drawn = torch.multinomial(self.weights, self.batch_size, replacement=True, generator=self.generator)
            yield drawn.tolist()
