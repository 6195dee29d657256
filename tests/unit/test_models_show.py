"""`shelfsight models show` lines for the calibration fields of a manifest."""

from __future__ import annotations

from shelfsight.trainer.cli import describe_manifest


def test_models_show_prints_each_attributes_temperature_threshold_and_ece() -> None:
    manifest = {
        "review_thresholds": {"lid": 0.8123, "handle": 1.01},
        "calibration": {
            "target_precision": 0.95, "ece_before": 0.12, "ece_after": 0.03,
            "attributes": {
                "lid": {"status": "ok", "temperature": 1.7, "ece_before": 0.2, "ece_after": 0.05},
                "handle": {"status": "target_not_reached", "temperature": 2.5, "ece_before": 0.04, "ece_after": 0.01},
                "colour": {"status": "no_validation_labels", "temperature": 1.0, "ece_before": None, "ece_after": None},
            },
        },
    }
    lines = "\n".join(describe_manifest(manifest))
    assert "mean test ECE 0.120 -> 0.030" in lines
    assert "T=1.700, review below 0.812, test ECE 0.200 -> 0.050 (ok)" in lines
    assert "T=2.500, always reviewed" in lines
    assert "T=1.000, never reviewed, test ECE n/a -> n/a (no_validation_labels)" in lines


def test_a_manifest_from_before_calibration_says_so() -> None:
    assert any("trained before calibration" in line for line in describe_manifest({}))
