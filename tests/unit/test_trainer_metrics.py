"""Trainer metrics: runs by outcome, durations, last test macro-F1, promotions and refusals."""

from __future__ import annotations

from prometheus_client import REGISTRY

from shelfsight.shared.settings import Settings
from shelfsight.shared.taxonomy import load_taxonomy
from shelfsight.trainer.metrics import record_run


def _value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_runs_are_counted_by_outcome_with_f1_promotions_and_refusals() -> None:
    taxonomy = load_taxonomy(Settings().taxonomy_path)
    category = sorted(taxonomy.categories)[0]
    runs = {o: _value("shelfsight_training_runs_total", category=category, outcome=o)
            for o in ("promoted", "kept_champion", "skipped", "failed")}
    promotions = _value("shelfsight_model_promotions_total", category=category)
    refusals = _value("shelfsight_model_promotion_refusals_total", category=category)
    durations = _value("shelfsight_training_duration_seconds_count", category=category)

    record_run(taxonomy, category, {"status": "promoted", "test_macro_f1": 0.81}, 120.0, 1000.0)
    record_run(taxonomy, category, {"status": "kept_champion", "test_macro_f1": 0.42}, 90.0, 1001.0)
    record_run(taxonomy, category, {"status": "skipped"}, 0.01, 1002.0)
    record_run(taxonomy, category, None, 5.0, 1003.0)

    for outcome in runs:
        assert _value("shelfsight_training_runs_total", category=category, outcome=outcome) == runs[outcome] + 1
    assert _value("shelfsight_model_promotions_total", category=category) == promotions + 1
    assert _value("shelfsight_model_promotion_refusals_total", category=category) == refusals + 1
    assert _value("shelfsight_training_last_test_macro_f1", category=category) == 0.42
    assert _value("shelfsight_training_duration_seconds_count", category=category) == durations + 3  # not the skip
    assert _value("shelfsight_training_last_finished_timestamp_seconds", category=category, outcome="failed") == 1003.0


def test_a_category_outside_the_taxonomy_is_labelled_unknown() -> None:
    taxonomy = load_taxonomy(Settings().taxonomy_path)
    before = _value("shelfsight_training_runs_total", category="unknown", outcome="failed")
    record_run(taxonomy, "no-such-category-" + "x" * 40, None, 1.0, 1.0)
    assert _value("shelfsight_training_runs_total", category="unknown", outcome="failed") == before + 1
