"""The active-learning bench's label choice: top review-queue priority, never a labeled image twice, within budget."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import torch

from shelfsight.shared.clip_math import product_uncertainty

ROOT = Path(__file__).resolve().parents[2]


def _bench() -> ModuleType:
    if "learning_curve" not in sys.modules:
        spec = importlib.util.spec_from_file_location("learning_curve", ROOT / "bench" / "learning_curve.py")
        assert spec and spec.loader
        module = importlib.util.module_from_spec(spec)
        sys.modules["learning_curve"] = module
        spec.loader.exec_module(module)
    return sys.modules["learning_curve"]


def test_a_round_picks_the_most_uncertain_unlabeled_images_within_the_budget() -> None:
    probabilities = torch.tensor([[0.9, 0.1], [0.5, 0.5], [0.6, 0.4], [0.99, 0.01], [0.55, 0.45]])
    uncertainty = product_uncertainty({"type": probabilities}).tolist()  # the review queue's own ordering
    picked = _bench().pick_uncertain(uncertainty, labeled=[1], budget=2)
    assert picked == [4, 2]  # 1 is the most uncertain but already labeled; then 0.9, 0.8


def test_rounds_never_repick_and_stop_when_the_pool_runs_out() -> None:
    bench = _bench()
    uncertainty = [0.3, 0.9, 0.1, 0.7]
    labeled: list[int] = []
    for budget in (1, 2, 5):
        new = bench.pick_uncertain(uncertainty, labeled, budget)
        assert len(new) <= budget and not set(new) & set(labeled)
        labeled += new
    assert labeled == [1, 3, 0, 2]
    assert bench.pick_uncertain(uncertainty, labeled, 3) == []
    assert bench.pick_uncertain(uncertainty, [], 0) == []


def test_ties_go_to_the_lower_position() -> None:
    assert _bench().pick_uncertain([0.5, 0.5, 0.5], [], 2) == [0, 1]


def test_random_choice_follows_its_fixed_order_and_skips_labeled_images() -> None:
    bench = _bench()
    assert bench.pick_random([3, 0, 2, 1], labeled=[0], budget=2) == [3, 2]


def test_tip_adapter_cache_pulls_towards_the_nearest_labeled_image() -> None:
    bench = _bench()
    classes = torch.eye(2)  # caption features: class 0 along x, class 1 along y
    feature = torch.nn.functional.normalize(torch.tensor([[1.0, 0.9]]), dim=-1)  # leans to class 0
    keys = torch.nn.functional.normalize(torch.tensor([[0.8, 1.0]]), dim=-1)  # a labeled class-1 image nearby
    values = torch.tensor([[0.0, 1.0]])
    plain = bench.tip_adapter_logits(feature, classes, 10.0, keys, values, alpha=0.0, beta=5.0)
    cached = bench.tip_adapter_logits(feature, classes, 10.0, keys, values, alpha=5.0, beta=5.0)
    assert plain.argmax().item() == 0 and cached.argmax().item() == 1
