"""Splits (deterministic, stratified, frozen) and the balanced sampler."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from shelfsight.shared.clip_math import IGNORE
from shelfsight.shared.events import LabelRecord
from shelfsight.trainer.dataset import (
    BalancedBatchSampler,
    assign_splits,
    balanced_weights,
    target_indices,
)


def _records(n: int, start: int = 0) -> list[LabelRecord]:
    # 4 strata (lid x handle), equally common
    return [
        LabelRecord(product_id=f"p{i:05d}", category="pans", image=f"s3://shelfsight/img/{i}.jpg",
                    attributes={"lid": "yes" if i % 2 else "no", "handle": "yes" if (i // 2) % 2 else "no"})
        for i in range(start, start + n)
    ]


def _split(records: list[LabelRecord], previous: dict[str, str] | None = None, seed: int = 0) -> dict[str, str]:
    return assign_splits(records, previous or {}, val_fraction=0.15, test_fraction=0.2, seed=seed)


def test_split_is_deterministic_and_independent_of_input_order() -> None:
    records = _records(400)
    shuffled = records[:]
    random.Random(1).shuffle(shuffled)
    assert _split(records) == _split(shuffled)
    assert _split(records) != _split(records, seed=1)


def test_split_is_stratified_with_the_requested_fractions() -> None:
    records = _records(400)
    split = _split(records)
    counts = Counter(split.values())
    assert counts["test"] == 80 and abs(counts["val"] - 60) <= 1
    for lid in ("yes", "no"):
        for handle in ("yes", "no"):
            stratum = [r.product_id for r in records if r.attributes == {"lid": lid, "handle": handle}]
            in_test = sum(split[pid] == "test" for pid in stratum)
            assert 19 <= in_test <= 21, (lid, handle, in_test)  # 20% of 100, up to the carry


def test_previous_assignments_are_frozen_and_new_products_get_assigned() -> None:
    first = _split(_records(100))
    grown = _records(150)
    second = _split(grown, previous=first)
    assert {pid: second[pid] for pid in first} == first  # nobody moves, test set included
    new = [r.product_id for r in grown[100:]]
    assert set(new) <= set(second)
    assert 5 <= sum(second[pid] == "test" for pid in new) <= 15  # ~20% of 50
    assert _split(grown, previous=first) == second  # deterministic too


def test_tiny_category_still_gets_a_test_and_a_val_product() -> None:
    split = _split(_records(4))
    assert Counter(split.values()) == {"train": 2, "val": 1, "test": 1}


def test_balanced_sampler_draws_rare_values_as_often_as_common_ones() -> None:
    targets = {"lid": [0] * 90 + [1] * 10}
    sampler = BalancedBatchSampler(targets, batch_size=50, steps=200, seed=0)
    drawn = Counter(targets["lid"][i] for batch in sampler for i in batch)
    share = drawn[1] / sum(drawn.values())
    assert 0.46 < share < 0.54, share  # unbalanced sampling would give 0.10
    again = [b for b in BalancedBatchSampler(targets, batch_size=50, steps=3, seed=0)]
    assert again == [b for b in BalancedBatchSampler(targets, batch_size=50, steps=3, seed=0)]


def test_balanced_weights_balance_each_attribute_and_skip_unlabeled() -> None:
    targets = {"a": [0, 0, 0, 1], "b": [0, 1, IGNORE, IGNORE]}
    weights = balanced_weights(targets)
    mass_a = [float(weights[[i for i, t in enumerate(targets["a"]) if t == v]].sum()) for v in (0, 1)]
    assert mass_a[1] == pytest.approx(mass_a[0], rel=0.5)  # the single "1" carries about half the mass
    assert weights[3] > weights[2]
    assert float(balanced_weights({"a": [IGNORE, IGNORE]}).sum()) == 2.0  # nothing labeled: uniform


def test_targets_use_value_indices_and_ignore_missing_attributes() -> None:
    record = LabelRecord(product_id="p", category="pans", image="s3://shelfsight/x.jpg", attributes={"lid": "no"})
    assert target_indices([record], {"lid": ["yes", "no"], "handle": ["yes", "no"]}) == {"lid": [1], "handle": [IGNORE]}
