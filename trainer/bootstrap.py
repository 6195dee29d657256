"""Paired bootstrap of the macro-F1 difference between two models scored on the same test images.

Pure numpy: no model, no I/O. The gate (trainer.gate) calls `paired_bootstrap` with the
challenger's and the champion's per-image predictions (trainer.evaluate.EvalResult).

Each resample draws the test products with replacement, the same draw for both models (the
pairing removes the products' own difficulty from the noise), computes each attribute's
macro-F1 for both models exactly as `clip_math.accuracy_and_macro_f1` does (mean F1 over the
classes present in truth or prediction), and averages over the gated attributes. The lower
bound is the (1 - confidence) quantile of the resampled differences (one-sided); the
interval reported is [(1 - c), c] quantiles. Seeded: the same inputs give the same bounds.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

IGNORE = -100  # as shelfsight.shared.clip_math.IGNORE (kept local: this module is numpy only)
_CHUNK = 256  # resamples at a time (bounds memory at ~ _CHUNK x products floats)


@dataclass(frozen=True)
class Difference:
    """challenger - champion macro-F1: the point estimate and its bootstrap bounds."""

    challenger: float
    champion: float
    delta: float
    lower: float
    upper: float


@dataclass(frozen=True)
class PairedBootstrap:
    """The mean over attributes, and each attribute alone."""

    mean: Difference
    attributes: dict[str, Difference]
    confidence: float
    samples: int
    products: int

    def as_dict(self) -> dict[str, Any]:
        return {"mean": asdict(self.mean), "attributes": {a: asdict(d) for a, d in self.attributes.items()},
                "confidence": self.confidence, "samples": self.samples, "products": self.products}


def macro_f1_of_confusions(confusions: np.ndarray) -> np.ndarray:
    """Macro-F1 of each [C, C] confusion matrix in a stack [..., C, C] (0 where nothing is counted)."""
    tp = np.diagonal(confusions, axis1=-2, axis2=-1)
    both = confusions.sum(axis=-1) + confusions.sum(axis=-2)  # support + predicted, per class
    present = both > 0
    f1 = np.where(present, 2 * tp / np.maximum(both, 1e-12), 0.0)
    count = present.sum(axis=-1)
    return np.where(count > 0, f1.sum(axis=-1) / np.maximum(count, 1), 0.0)


def _confusions(weights: np.ndarray, targets: np.ndarray, predicted: np.ndarray | None, classes: int) -> np.ndarray:
    """Per resample (rows of `weights`, counts per product), the weighted confusion matrix [B, C, C]."""
    if predicted is None:
        return np.zeros((weights.shape[0], classes, classes))
    labeled = targets != IGNORE
    cells = targets[labeled] * classes + predicted[labeled]
    columns = weights[:, labeled]
    out = np.zeros((weights.shape[0], classes * classes))
    for cell in np.unique(cells):  # a scatter-add of each product's resample count into its cell
        out[:, cell] = columns[:, cells == cell].sum(axis=1)
    return out.reshape(-1, classes, classes)


def paired_bootstrap(
    targets: Mapping[str, Sequence[int]],
    challenger: Mapping[str, Sequence[int] | None],
    champion: Mapping[str, Sequence[int] | None],
    attributes: Sequence[str],
    *,
    samples: int,
    confidence: float,
    seed: int,
) -> PairedBootstrap:
    """Bootstrap the macro-F1 difference over `attributes` (targets and predictions per product, same order).

    Predictions are class indices (a value the data lacks is any index >= the number of
    values); None means the model has no head for the attribute (F1 0).
    """
    products = len(next(iter(targets.values()))) if targets else 0
    rng = np.random.default_rng(seed)
    draws = rng.multinomial(products, np.full(products, 1.0 / products), size=samples) if products else \
        np.zeros((samples, 0))
    weights = np.vstack([np.ones((1, products)), draws]).astype(np.float64)  # row 0: the test set itself
    per_attribute: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for attribute in attributes:
        t = np.asarray(targets[attribute], dtype=np.int64)
        ours, theirs = challenger.get(attribute), champion.get(attribute)
        p1 = None if ours is None else np.asarray(ours, dtype=np.int64)
        p2 = None if theirs is None else np.asarray(theirs, dtype=np.int64)
        classes = 1 + max([int(t.max(initial=0))] + [int(p.max(initial=0)) for p in (p1, p2) if p is not None])
        f1s = []
        for start in range(0, len(weights), _CHUNK):
            chunk = weights[start:start + _CHUNK]
            f1s.append((macro_f1_of_confusions(_confusions(chunk, t, p1, classes)),
                        macro_f1_of_confusions(_confusions(chunk, t, p2, classes))))
        per_attribute[attribute] = (np.concatenate([a for a, _ in f1s]), np.concatenate([b for _, b in f1s]))
    q = (1.0 - confidence, confidence)

    def difference(ours: np.ndarray, theirs: np.ndarray) -> Difference:
        delta = ours - theirs
        lower, upper = np.quantile(delta[1:], q) if len(delta) > 1 else (delta[0], delta[0])
        return Difference(float(ours[0]), float(theirs[0]), float(delta[0]), float(lower), float(upper))

    if attributes:
        mean = difference(np.mean([per_attribute[a][0] for a in attributes], axis=0),
                          np.mean([per_attribute[a][1] for a in attributes], axis=0))
    else:
        mean = Difference(0.0, 0.0, 0.0, 0.0, 0.0)
    return PairedBootstrap(mean, {a: difference(*per_attribute[a]) for a in attributes}, confidence, samples,
                           products)
