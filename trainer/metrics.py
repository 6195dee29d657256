"""Prometheus metrics of the trainer worker (served on settings.metrics_address:metrics_port).

Categories are label values only if the taxonomy has them (anything else is `unknown`), so a
bad training message cannot grow the series count.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import Counter, Gauge, Histogram

from shelfsight.shared.taxonomy import Taxonomy

RUNS = Counter(
    "shelfsight_training_runs_total",
    "Training runs by outcome: promoted, kept_champion (the gate refused the challenger), "
    "skipped (a run for the category was already queued or running), failed",
    ["category", "outcome"],
)
DURATION = Histogram(
    "shelfsight_training_duration_seconds", "Seconds per training run (failed runs included)", ["category"],
    buckets=(10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400),
)
LAST_TEST_MACRO_F1 = Gauge(
    "shelfsight_training_last_test_macro_f1",
    "Test macro-F1 of the category's last trained challenger on its frozen test set", ["category"],
)
PROMOTIONS = Counter("shelfsight_model_promotions_total", "Challengers promoted by the gate", ["category"])
REFUSALS = Counter(
    "shelfsight_model_promotion_refusals_total", "Challengers the gate refused (the champion stays)",
    ["category"],
)
LAST_FINISHED = Gauge(
    "shelfsight_training_last_finished_timestamp_seconds",
    "Unix time the category's last training run ended, by outcome", ["category", "outcome"],
)


def record_run(taxonomy: Taxonomy, category: str, result: dict[str, Any] | None, seconds: float,
               now: float) -> None:
    """Count one run of `train_category`: its result dict, or None if it raised."""
    label = category if category in taxonomy.categories else "unknown"
    outcome = "failed" if result is None else str(result.get("status", "failed"))
    if outcome not in {"promoted", "kept_champion", "skipped", "failed"}:
        outcome = "failed"
    RUNS.labels(category=label, outcome=outcome).inc()
    LAST_FINISHED.labels(category=label, outcome=outcome).set(now)
    if outcome == "skipped":
        return  # no training happened
    DURATION.labels(category=label).observe(seconds)
    if result is None:
        return
    if isinstance(result.get("test_macro_f1"), int | float):
        LAST_TEST_MACRO_F1.labels(category=label).set(float(result["test_macro_f1"]))
    (PROMOTIONS if outcome == "promoted" else REFUSALS).labels(category=label).inc()
