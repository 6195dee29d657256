"""Pure CLIP classifier math: text features, per-attribute logits, probabilities and loss.

No I/O here: no boto3, no celery, no files. Everything is testable with tensors alone.
A category's classifier is, per attribute, a matrix of L2-normalised caption embeddings;
an image's score for each value is the scaled cosine similarity, softmaxed over that
attribute's values.
"""

from __future__ import annotations

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
) -> dict[str, torch.Tensor]:
    """Probabilities [B, V] per attribute: softmax over that attribute's candidate values."""
    return {
        head.name: attribute_logits(image_features, head.text_features, logit_scale).softmax(dim=-1)
        for head in heads
    }


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
