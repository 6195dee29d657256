"""A training run's report: JSON plus PNG plots (loss curves, confusion matrices, champion vs challenger,
reliability diagram of the calibration).

Pure rendering: takes dicts, returns bytes. The caller decides where they go (the registry
uploads them beside the checkpoint).
"""

from __future__ import annotations

import io
import json
import re
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.figure import Figure

REPORT_NAME = "report.json"
LOSS_PLOT = "loss_curves.png"
COMPARISON_PLOT = "champion_vs_challenger.png"
RELIABILITY_PLOT = "reliability.png"


def confusion_plot_name(attribute: str) -> str:
    return f"confusion_{re.sub(r'[^A-Za-z0-9_-]', '_', attribute)}.png"


def _png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def loss_curves(history: list[dict[str, Any]], best_epoch: int, title: str) -> bytes:
    """Train and validation loss per epoch, the kept (best) epoch marked."""
    fig, ax = plt.subplots(figsize=(6, 4))
    epochs = [h["epoch"] for h in history]
    ax.plot(epochs, [h["train_loss"] for h in history], marker="o", label="train")
    ax.plot(epochs, [h["val_loss"] for h in history], marker="o", label="validation")
    if best_epoch > 0:
        ax.axvline(best_epoch, color="grey", linestyle="--", label=f"kept (epoch {best_epoch})")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss (sum over attributes)")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    return _png(fig)


def confusion_plot(attribute: str, metrics: dict[str, Any], title: str) -> bytes:
    """One attribute's test confusion matrix, counts in the cells."""
    matrix = metrics.get("confusion") or [[0]]
    names = metrics.get("values") or ["?"]
    size = max(3.5, 0.6 * len(names) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    peak = max((max(row) for row in matrix), default=0)
    for i, row in enumerate(matrix):
        for j, count in enumerate(row):
            ax.text(j, i, str(count), ha="center", va="center", color="white" if count > peak / 2 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"{title}\n{attribute}: acc {metrics['accuracy']:.3f}, macro-F1 {metrics['macro_f1']:.3f}")
    return _png(fig)


def comparison_plot(challenger: dict[str, Any], champion: dict[str, Any] | None, title: str) -> bytes:
    """Per-attribute test macro-F1, champion vs challenger (challenger alone for a first model)."""
    attributes = list(challenger["attributes"])
    fig, ax = plt.subplots(figsize=(max(5, 1.4 * len(attributes) + 2), 4))
    xs = range(len(attributes))
    width = 0.38
    if champion is not None:
        champ = [champion["attributes"].get(a, {}).get("macro_f1", 0.0) for a in attributes]
        ax.bar([x - width / 2 for x in xs], champ, width, label=f"champion (mean {champion['macro_f1']:.3f})")
    chall = [challenger["attributes"][a]["macro_f1"] for a in attributes]
    offset = width / 2 if champion is not None else 0.0
    ax.bar([x + offset for x in xs], chall, width, label=f"challenger (mean {challenger['macro_f1']:.3f})")
    ax.set_xticks(list(xs), attributes)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("test macro-F1")
    ax.set_title(title)
    ax.legend(loc="lower right")
    ax.grid(axis="y", alpha=0.3)
    return _png(fig)


def reliability_plot(calibration: dict[str, Any], title: str) -> bytes:
    """Per attribute, test accuracy against confidence per bin, before and after temperature scaling.

    A calibrated model sits on the diagonal. Marker area follows the bin's count; the legend
    gives each curve's ECE and the fitted temperature.
    """
    attributes = {a: e for a, e in calibration.get("attributes", {}).items() if e.get("test_support")}
    columns = max(1, len(attributes))
    fig, axes = plt.subplots(1, columns, figsize=(4 * columns, 4.2), squeeze=False)
    for ax, (attribute, entry) in zip(axes[0], attributes.items(), strict=False):
        ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="perfect calibration")
        for when, colour in (("before", "tab:red"), ("after", "tab:blue")):
            bins = [b for b in entry["reliability"][when] if b["count"]]
            label = (f"{when} (ECE {entry[f'ece_{when}']:.3f})" if when == "before"
                     else f"after, T={entry['temperature']:.2f} (ECE {entry['ece_after']:.3f})")
            ax.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], color=colour, marker="o",
                    markersize=3, label=label)
            ax.scatter([b["confidence"] for b in bins], [b["accuracy"] for b in bins], color=colour, alpha=0.3,
                       s=[12 * b["count"] for b in bins])
        threshold = entry.get("review_threshold")
        if threshold is not None and threshold <= 1:
            ax.axvline(threshold, color="tab:green", linestyle=":", label=f"review below {threshold:.3f}")
        ax.set_xlim(0, 1.02)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("confidence (top-1 probability)")
        ax.set_ylabel("test accuracy")
        ax.set_title(f"{attribute} (n={entry['test_support']}, {entry['status']})", fontsize=9)
        ax.legend(fontsize=7, loc="upper left")
        ax.grid(alpha=0.3)
    if not attributes:
        axes[0][0].text(0.5, 0.5, "no labeled test images", ha="center", va="center")
    fig.suptitle(f"{title}\nreliability on the test split, target precision "
                 f"{calibration.get('target_precision', 0):.2f}", fontsize=10)
    return _png(fig)


def _gain_line(decision: dict[str, Any]) -> str:
    """The gate's evidence under the title: gain and its bootstrap interval, and the verdict."""
    mean = (decision.get("bootstrap") or {}).get("mean")
    if not mean:
        return f"\n{'promoted' if decision.get('promoted') else 'not promoted'}"
    return (f"\nvs {decision.get('champion_version')}: gain {mean['delta']:+.3f} "
            f"[{mean['lower']:+.3f}, {mean['upper']:+.3f}], {'promoted' if decision.get('promoted') else 'not promoted'}")


def render_report(report: dict[str, Any]) -> dict[str, tuple[bytes, str]]:
    """report.json and every plot, as {file name: (bytes, content type)}."""
    title = f"{report['category']} {report['version']}"
    files: dict[str, tuple[bytes, str]] = {
        LOSS_PLOT: (loss_curves(report["training"]["history"], report["training"]["best_epoch"], title), "image/png"),
        COMPARISON_PLOT: (
            comparison_plot(report["test"]["challenger"], report["test"].get("champion"),
                            title + _gain_line(report.get("decision") or {})),
            "image/png",
        ),
    }
    if report.get("calibration"):
        files[RELIABILITY_PLOT] = (reliability_plot(report["calibration"], title), "image/png")
    for attribute, metrics in report["test"]["challenger"]["attributes"].items():
        if metrics.get("confusion"):
            files[confusion_plot_name(attribute)] = (confusion_plot(attribute, metrics, title), "image/png")
    report = {**report, "files": sorted([REPORT_NAME, *files])}
    files[REPORT_NAME] = (json.dumps(report, indent=2, default=str).encode(), "application/json")
    return files
