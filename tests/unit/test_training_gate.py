"""The gate decides on evidence: enough test examples, a paired bootstrap lower bound, no attribute left behind."""

from __future__ import annotations

import random

import pytest

from shelfsight.shared.settings import Settings
from shelfsight.trainer.bootstrap import paired_bootstrap
from shelfsight.trainer.evaluate import EvalResult, _attribute_metrics
from shelfsight.trainer.gate import decide_promotion

VALUES = ["yes", "no"]


def _result(targets: dict[str, list[int]], predictions: dict[str, list[int]]) -> EvalResult:
    n = len(next(iter(targets.values())))
    return EvalResult(
        loss=0.0,
        attributes={a: _attribute_metrics(a, VALUES, targets[a], predictions[a]) for a in targets},
        ids=[f"p{i}" for i in range(n)], targets=targets, predictions=dict(predictions),
    )


def _predict(truth: list[int], accuracy: float, seed: int) -> list[int]:
    """Predictions right on exactly round(accuracy * n) images, chosen at random."""
    rng = random.Random(seed)
    wrong = set(rng.sample(range(len(truth)), len(truth) - round(accuracy * len(truth))))
    return [1 - t if i in wrong else t for i, t in enumerate(truth)]


def _truth(n: int, seed: int = 0) -> list[int]:
    return [random.Random(seed + i).randrange(2) for i in range(n)]


SETTINGS = Settings()  # margin 0.01, 95 % one-sided, 2000 resamples, tolerance 0.05, 10 test examples


def test_a_noisy_tie_is_not_promoted() -> None:
    truth = _truth(60)
    champion = _result({"lid": truth}, {"lid": _predict(truth, 0.80, seed=1)})
    challenger = _result({"lid": truth}, {"lid": _predict(truth, 0.83, seed=2)})  # 2 more right of 60
    assert challenger.macro_f1 > champion.macro_f1  # the old gate (point estimates, margin 0) promoted this
    decision = decide_promotion(challenger, champion, "v1", ["lid"], SETTINGS)
    assert not decision.promote
    mean = decision.checks["bootstrap"]["mean"]
    assert mean["lower"] < 0 < mean["delta"] < mean["upper"]
    assert "lower bound" in decision.reason and "< margin 0.0100" in decision.reason
    assert "champion v1" in decision.reason and "interval" in decision.reason


def test_a_clear_gain_is_promoted_and_the_report_shows_the_interval() -> None:
    truth = _truth(80)
    champion = _result({"lid": truth}, {"lid": _predict(truth, 0.6, seed=1)})
    challenger = _result({"lid": truth}, {"lid": _predict(truth, 0.95, seed=2)})
    decision = decide_promotion(challenger, champion, "zero-shot", ["lid"], SETTINGS)
    assert decision.promote, decision.reason
    assert decision.reason.startswith("promoted:") and "zero-shot (the base model)" in decision.reason
    mean = decision.checks["bootstrap"]["mean"]
    assert mean["lower"] >= SETTINGS.promotion_margin and mean["lower"] <= mean["delta"] <= mean["upper"]
    assert decision.checks["attribute_deltas"]["lid"] == pytest.approx(mean["delta"])
    assert decision.checks["bootstrap"]["samples"] == 2000 and decision.checks["bootstrap"]["products"] == 80


def test_a_one_attribute_regression_blocks_promotion_although_the_mean_rises() -> None:
    lid, handle = _truth(100, 0), _truth(100, 500)
    champion = _result({"lid": lid, "handle": handle},
                       {"lid": _predict(lid, 0.60, 1), "handle": _predict(handle, 0.95, 2)})
    challenger = _result({"lid": lid, "handle": handle},
                         {"lid": _predict(lid, 1.00, 3), "handle": _predict(handle, 0.85, 4)})
    assert challenger.macro_f1 > champion.macro_f1 + 0.1
    decision = decide_promotion(challenger, champion, "v3", ["lid", "handle"], SETTINGS)
    assert not decision.promote
    assert "drops beyond the tolerance 0.0500 on handle" in decision.reason
    deltas = decision.checks["attribute_deltas"]
    assert deltas["lid"] > 0.3 and deltas["handle"] < -0.05


def test_too_few_test_examples_refuse_any_promotion_with_a_clear_reason() -> None:
    truth = _truth(30)
    lid = truth[:6] + [-100] * 24  # only 6 test images have a lid label
    champion = _result({"lid": lid, "handle": truth}, {"lid": [0] * 30, "handle": [0] * 30})
    challenger = _result({"lid": lid, "handle": truth}, {"lid": lid[:6] + [0] * 24, "handle": truth})
    decision = decide_promotion(challenger, champion, "zero-shot", ["lid", "handle"], SETTINGS)
    assert not decision.promote
    assert "not enough test evidence" in decision.reason and "lid has 6" in decision.reason
    assert "SHELFSIGHT_PROMOTION_MIN_TEST_EXAMPLES" in decision.reason and "handle" not in decision.reason
    assert decision.checks["test_support"] == {"lid": 6, "handle": 30}


def test_bootstrap_is_deterministic_and_its_point_estimate_is_the_evaluated_macro_f1() -> None:
    lid, handle = _truth(50, 3), _truth(50, 9)
    ours = {"lid": _predict(lid, 0.9, 1), "handle": _predict(handle, 0.7, 2)}
    theirs = {"lid": _predict(lid, 0.8, 3), "handle": None}  # a champion without a handle head scores 0
    challenger = _result({"lid": lid, "handle": handle}, ours)
    targets = {"lid": lid, "handle": handle}
    first = paired_bootstrap(targets, ours, theirs, ["lid", "handle"], samples=500, confidence=0.95, seed=7)
    again = paired_bootstrap(targets, ours, theirs, ["lid", "handle"], samples=500, confidence=0.95, seed=7)
    other = paired_bootstrap(targets, ours, theirs, ["lid", "handle"], samples=500, confidence=0.95, seed=8)
    assert first == again and first != other
    assert first.mean.challenger == pytest.approx(challenger.macro_f1)
    assert first.attributes["handle"].champion == 0.0
    assert first.attributes["lid"].challenger == pytest.approx(challenger.attributes["lid"]["macro_f1"])


def test_results_on_different_test_images_are_refused() -> None:
    truth = _truth(20)
    a = _result({"lid": truth}, {"lid": truth})
    b = _result({"lid": truth}, {"lid": truth})
    b.ids = list(reversed(b.ids))
    with pytest.raises(ValueError, match="different test images"):
        decide_promotion(a, b, "v1", ["lid"], SETTINGS)
