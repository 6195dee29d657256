"""The champion/challenger gate: a challenger is promoted only when it is at least `margin` better."""

from __future__ import annotations

from shelfsight.trainer.evaluate import EvalResult
from shelfsight.trainer.gate import decide_promotion


def _result(*f1s: float) -> EvalResult:
    return EvalResult(loss=0.0, attributes={f"a{i}": {"macro_f1": f, "accuracy": f} for i, f in enumerate(f1s)})


def test_gate_promotes_only_a_challenger_at_least_margin_better() -> None:
    assert decide_promotion(_result(0.5), None, None, None, 0.0) == (True, "first model of the category (no champion)")
    promote, reason = decide_promotion(_result(0.8, 0.6), _result(0.7, 0.7), "v1", None, 0.0)
    assert promote and "0.7000 ≥ champion v1 0.7000" in reason  # mean over attributes: 0.7 vs 0.7
    promote, reason = decide_promotion(_result(0.72), _result(0.7), "v1", None, 0.05)
    assert not promote and "0.7200 < champion v1 0.7000 + margin 0.0500" in reason
    promote, reason = decide_promotion(_result(0.5), None, "v1", "champion v1 could not be loaded: bad sha", 0.0)
    assert promote and "could not be loaded" in reason
