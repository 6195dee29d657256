"""Pure CLIP classifier math: text features, per-attribute logits, probabilities and loss.

No I/O here: no boto3, no celery, no files. Everything is testable with tensors alone.
A category's classifier is, per attribute, a matrix of L2-normalised caption embeddings;
an image's score for each value is the scaled cosine similarity, softmaxed over that
attribute's values.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

IGNORE = -100  # target index for "this attribute is not labeled on this image"


@dataclass(frozen=True)
class AttributeHead:
    """One attribute's classifier: value names and their caption embeddings [V, D]."""

    name: str
    values: tuple[str, ...]
    text_features: torch.Tensor


def normalize(features: torch.Tensor) -> torch.Tensor:
    return F.normalize(features, dim=-1)


def encode_captions(
    encode_text: Callable[[torch.Tensor], torch.Tensor],
    tokenizer: Callable[[Sequence[str]], torch.Tensor],
    captions: Sequence[str],
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """L2-normalised text features [len(captions), D] for the captions, in order."""
    tokens = tokenizer(list(captions)).to(device)
    return normalize(encode_text(tokens).float())


def attribute_logits(
    image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor | float
) -> torch.Tensor:
    """Scaled cosine similarities [B, V] between images [B, D] and one attribute's values [V, D], in fp32.

    Computed with autocast switched off: under CUDA autocast `@` runs in bf16/fp16 whatever
    its inputs' dtype, and logits near 100 would land on steps of 0.25-0.5. Training (under
    autocast) and serving (outside it) thus get the same fp32 logits from the same features.
    """
    with torch.autocast(device_type=image_features.device.type, enabled=False):
        scale = logit_scale.float() if isinstance(logit_scale, torch.Tensor) else float(logit_scale)
        return scale * (normalize(image_features.float()) @ text_features.float().T)


def score_heads(
    image_features: torch.Tensor,
    heads: Sequence[AttributeHead],
    logit_scale: torch.Tensor | float,
    temperatures: Mapping[str, float] | None = None,
) -> dict[str, torch.Tensor]:
    """Probabilities [B, V] per attribute: softmax over that attribute's candidate values.

    With `temperatures`, each attribute's logits are divided by its temperature first
    (`calibrated_probabilities`); an attribute without one keeps T = 1, the raw softmax.
    """
    temperatures = temperatures or {}
    return {
        head.name: calibrated_probabilities(
            attribute_logits(image_features, head.text_features, logit_scale), temperatures.get(head.name, 1.0)
        )
        for head in heads
    }


def calibrated_probabilities(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """softmax(logits / T) over the last dimension: the one definition trainer and worker share."""
    if temperature == 1.0:
        return logits.softmax(dim=-1)
    return (logits / temperature).softmax(dim=-1)


def top_values(probabilities: torch.Tensor, values: Sequence[str]) -> list[tuple[str, float]]:
    """(best value, its probability) for each row of a [B, V] probability matrix."""
    confidence, index = probabilities.max(dim=-1)
    return [(values[int(i)], float(c)) for i, c in zip(index.tolist(), confidence.tolist(), strict=True)]


def margin_uncertainty(probabilities: torch.Tensor) -> torch.Tensor:
    """Review priority per row of a [B, V] probability matrix: 1 - (top-1 - top-2 probability).

    0 for a sure prediction, 1 for a tie between the two best values. The margin, not the
    entropy: it is comparable across attributes with 2 or 12 values (entropy grows with log V),
    it asks the question a reviewer answers ("is it this or that?"), and margin sampling is the
    strong simple baseline of the active-learning literature. A product's priority is the
    largest over its attributes (`product_uncertainty`).
    """
    if probabilities.shape[-1] < 2:
        return torch.zeros(probabilities.shape[:-1], dtype=probabilities.dtype, device=probabilities.device)
    top = probabilities.topk(2, dim=-1).values
    return 1.0 - (top[..., 0] - top[..., 1])


def product_uncertainty(per_attribute: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """[B] review priority of each image: the largest `margin_uncertainty` over its attributes."""
    stacked = torch.stack([margin_uncertainty(p) for p in per_attribute.values()])
    return stacked.max(dim=0).values


def multi_attribute_loss(
    image_features: torch.Tensor,
    text_features: Mapping[str, torch.Tensor],
    targets: Mapping[str, torch.Tensor],
    logit_scale: torch.Tensor | float,
) -> torch.Tensor:
    """Cross-entropy of images against each attribute's caption features, summed over attributes.

    `targets[name]` holds value indices [B], or IGNORE where that attribute is unlabeled.
    An attribute with no labeled image in the batch contributes nothing.
    """
    total = image_features.new_zeros((), dtype=torch.float32)
    for name, feats in text_features.items():
        target = targets[name]
        if bool((target != IGNORE).any()):
            logits = attribute_logits(image_features, feats, logit_scale)
            total = total + F.cross_entropy(logits, target, ignore_index=IGNORE)
    return total


def confusion_matrix(predicted: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """[true, predicted] counts, ignoring IGNORE targets."""
    keep = target != IGNORE
    index = target[keep] * num_classes + predicted[keep]
    return torch.bincount(index, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def accuracy_and_macro_f1(confusion: torch.Tensor) -> tuple[float, float]:
    """Accuracy and macro-F1 (mean over classes that occur in truth or prediction)."""
    confusion = confusion.double()
    total = confusion.sum()
    if total == 0:
        return 0.0, 0.0
    tp = confusion.diag()
    support = confusion.sum(dim=1)
    predicted = confusion.sum(dim=0)
    f1 = 2 * tp / (support + predicted).clamp(min=1)
    present = (support + predicted) > 0
    return float(tp.sum() / total), float(f1[present].mean())


# --- calibration and abstention (issue 11) -------------------------------------------------------

TEMPERATURE_BOUNDS = (0.1, 10.0)
"""The temperature search's range. Beyond it the validation split is saying something other than
"rescale": T -> 0 when every validation prediction is right (the NLL keeps falling as the model
grows surer), T -> inf when they are all wrong. A fitted T at a bound is reported as such."""
ECE_BINS = 15
MIN_THRESHOLD_SUPPORT = 10
"""A review threshold must leave at least this many validation predictions at or above it: the
precision of 2 predictions says nothing (at 10 a 0.95 target means 10 out of 10 right)."""
REVIEW_ALL = 1.01
"""The threshold recorded when no threshold reaches the target precision on validation: above
any confidence, so every prediction of that attribute carries needs_review=true (JSON has no
infinity)."""


def labeled_rows(logits_or_probs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows of [N, V] scores and [N] targets whose target is labeled (not IGNORE)."""
    keep = targets != IGNORE
    return logits_or_probs[keep], targets[keep]


def fit_temperature(logits: torch.Tensor, targets: torch.Tensor, iterations: int = 60) -> float:
    """The T minimising the NLL of softmax(logits [N, V] / T) on `targets` [N] (temperature scaling).

    IGNORE targets are left out; with no labeled row, 1.0 (no change). A golden-section search
    over log T within TEMPERATURE_BOUNDS: the NLL is convex in 1/T, hence unimodal in log T, so
    the search is exact to its tolerance, deterministic, and needs no optimiser state (LBFGS on
    a handful of validation images can step outside any sensible range).
    """
    logits, targets = labeled_rows(logits.double(), targets.long())
    if not len(targets):
        return 1.0
    low, high = math.log(TEMPERATURE_BOUNDS[0]), math.log(TEMPERATURE_BOUNDS[1])
    ratio = (math.sqrt(5) - 1) / 2

    def nll(log_t: float) -> float:
        return float(F.cross_entropy(logits / math.exp(log_t), targets))

    a, b = high - ratio * (high - low), low + ratio * (high - low)
    fa, fb = nll(a), nll(b)
    for _ in range(iterations):
        if fa <= fb:  # the minimum lies in [low, b]
            high, b, fb = b, a, fa
            a = high - ratio * (high - low)
            fa = nll(a)
        else:
            low, a, fa = a, b, fb
            b = low + ratio * (high - low)
            fb = nll(b)
    return math.exp((low + high) / 2)


@dataclass(frozen=True)
class ReliabilityBin:
    """One confidence bin [lower, upper): how many predictions, their mean confidence and accuracy."""

    lower: float
    upper: float
    count: int
    confidence: float
    accuracy: float


def reliability_bins(probabilities: torch.Tensor, targets: torch.Tensor, bins: int = ECE_BINS) -> list[ReliabilityBin]:
    """Equal-width bins of top-1 confidence over the labeled rows of `probabilities` [N, V].

    The last bin includes 1.0. Empty bins are kept (count 0), so plots share their x axis.
    """
    probabilities, targets = labeled_rows(probabilities.double(), targets.long())
    confidence, predicted = probabilities.max(dim=-1)
    correct = (predicted.long() == targets).double()
    index = (confidence * bins).long().clamp(max=bins - 1)
    out = []
    for b in range(bins):
        members = index == b
        count = int(members.sum())
        out.append(ReliabilityBin(
            lower=b / bins, upper=(b + 1) / bins, count=count,
            confidence=float(confidence[members].mean()) if count else 0.0,
            accuracy=float(correct[members].mean()) if count else 0.0,
        ))
    return out


def expected_calibration_error(probabilities: torch.Tensor, targets: torch.Tensor, bins: int = ECE_BINS) -> float:
    """ECE: the count-weighted mean |accuracy - confidence| over `reliability_bins` (0 with no labeled row)."""
    table = reliability_bins(probabilities, targets, bins)
    total = sum(b.count for b in table)
    if not total:
        return 0.0
    return sum(b.count / total * abs(b.accuracy - b.confidence) for b in table)


def threshold_for_precision(
    confidences: torch.Tensor, correct: torch.Tensor, target: float, min_support: int = MIN_THRESHOLD_SUPPORT
) -> float | None:
    """The lowest confidence threshold t whose predictions (confidence >= t) reach `target` precision.

    `confidences` [N] are the predictions' top-1 (calibrated) probabilities and `correct` [N]
    whether each was right. Only thresholds that keep at least `min_support` predictions count.
    None when no threshold does (too few predictions, or the target is out of reach): the caller
    decides what that means (the trainer records REVIEW_ALL for a labeled attribute). The lowest
    qualifying t, not the first from the top: precision is not monotone in t, and the lowest
    one sends the fewest predictions to review.
    """
    if len(confidences) == 0:
        return None
    order = torch.argsort(confidences.double(), descending=True)
    conf = confidences.double()[order]
    hits = correct.double()[order].cumsum(0)
    kept = torch.arange(1, len(conf) + 1, dtype=torch.float64)
    precision = hits / kept
    # a threshold t keeps every prediction with confidence >= t: only the last of equal confidences is a cut
    last_of_tie = torch.ones_like(conf, dtype=torch.bool)
    last_of_tie[:-1] = conf[:-1] != conf[1:]
    ok = (precision >= target) & (kept >= min_support) & last_of_tie
    if not bool(ok.any()):
        return None
    return float(conf[ok].min())
