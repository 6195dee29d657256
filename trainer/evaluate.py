"""Running a model over labeled images: the one batched pass that validation and test scoring share.

`score_images` runs the model over preprocessed images in batches and returns the mean loss and
the predicted value per attribute; `fit` calls it for the validation loss of each epoch, and
`evaluate` for test metrics: loss, accuracy, macro-F1 and a confusion matrix per attribute.
The math itself (loss, logits, confusion, F1) lives in shelfsight.shared.clip_math.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch

from shelfsight.shared.clip_math import (
    IGNORE,
    accuracy_and_macro_f1,
    attribute_logits,
    confusion_matrix,
    multi_attribute_loss,
    normalize,
)
from shelfsight.shared.model_factory import ClipBundle
from shelfsight.trainer.dataset import LabeledImages

EVAL_BATCH_SIZE = 64  # images per forward pass when scoring (no gradients, so larger than training's)
_CACHE_LIMIT_BYTES = 1 << 30  # preprocessed eval tensors kept in memory up to this size


@dataclass(frozen=True)
class HeadSpec:
    """The classifier a model is trained for: per attribute, value names and caption texts."""

    values: dict[str, list[str]]
    captions: dict[str, list[str]]

    def all_captions(self) -> list[str]:
        return [c for attr in self.values for c in self.captions[attr]]


def autocast_for(device: torch.device) -> AbstractContextManager[Any]:
    """bf16 autocast on CUDA (fp32 master weights); plain fp32 elsewhere."""
    if device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return nullcontext()


class PreprocessedImages:
    """Eval-transformed image batches; the tensor is cached when it fits in memory.

    Built once per image set, so `fit` preprocesses its validation images once, not every epoch.
    """

    def __init__(self, images: Sequence[Any], preprocess: Callable[[Any], torch.Tensor], image_size: int) -> None:
        self.images = images
        self.preprocess = preprocess
        fits = len(images) * 3 * image_size * image_size * 4 <= _CACHE_LIMIT_BYTES
        self.cached = self._all() if fits and len(images) else None

    def __len__(self) -> int:
        return len(self.images)

    def _all(self) -> torch.Tensor:
        return torch.stack([self.preprocess(self.images[i]) for i in range(len(self.images))])

    def get(self, indices: Sequence[int]) -> torch.Tensor:
        if self.cached is not None:
            return self.cached[list(indices)]
        return torch.stack([self.preprocess(self.images[i]) for i in indices])


def text_features(model: Any, tokens: torch.Tensor, spec: HeadSpec) -> dict[str, torch.Tensor]:
    """Normalised caption features per attribute, from the tokens of `spec.all_captions()`."""
    features = normalize(model.encode_text(tokens).float())
    sizes = [len(spec.values[a]) for a in spec.values]
    return dict(zip(spec.values, features.split(sizes), strict=True))


def targets_tensor(
    targets: Mapping[str, Sequence[int]], indices: Sequence[int], device: torch.device
) -> dict[str, torch.Tensor]:
    """The targets of the images at `indices`, per attribute, as tensors on `device`."""
    return {a: torch.tensor([t[i] for i in indices], dtype=torch.long, device=device) for a, t in targets.items()}


@dataclass
class ImageScores:
    """What one pass over an image set gives: mean loss, and the predicted value index per image."""

    loss: float
    predictions: dict[str, list[int]]


@torch.no_grad()
def score_images(
    bundle: ClipBundle,
    tokens: torch.Tensor,
    spec: HeadSpec,
    images: PreprocessedImages,
    targets: Mapping[str, Sequence[int]],
    batch_size: int,
) -> ImageScores:
    """Run the model (in eval mode) over `images` in batches of `batch_size`.

    `tokens` are the tokenized `spec.all_captions()`; `targets` index into `spec.values`. The loss
    is clip_math.multi_attribute_loss averaged over images; each prediction is the value whose
    caption is most similar to the image.
    """
    model: Any = bundle.model
    device = bundle.device
    model.eval()
    size = len(images)
    total = 0.0
    predictions: dict[str, list[int]] = {a: [] for a in spec.values}
    with autocast_for(device):
        features = text_features(model, tokens, spec)
        for start in range(0, size, batch_size):
            indices = list(range(start, min(size, start + batch_size)))
            image_features = model.encode_image(images.get(indices).to(device))
            loss = multi_attribute_loss(image_features, features, targets_tensor(targets, indices, device),
                                        model.logit_scale.exp())
            total += float(loss) * len(indices)
            for a, feats in features.items():  # fp32 logits, as at serving (clip_math.attribute_logits)
                predictions[a].extend(attribute_logits(image_features, feats, 1.0).argmax(-1).tolist())
    return ImageScores(loss=total / max(1, size), predictions=predictions)


# --- test metrics ---------------------------------------------------------------------------------


@dataclass
class EvalResult:
    """Loss and per-attribute accuracy, macro-F1 and confusion matrix ([true][predicted]).

    `targets` and `predictions` keep the per-image outcome, in the data's value space (a
    predicted value the data's taxonomy lacks is len(values), "(other)"; None: the model has
    no head for the attribute), so that two models scored on the same images can be compared
    image by image (trainer.bootstrap).
    """

    loss: float
    attributes: dict[str, dict[str, Any]]
    ids: list[str] = field(default_factory=list)
    targets: dict[str, list[int]] = field(default_factory=dict)
    predictions: dict[str, list[int] | None] = field(default_factory=dict)

    @property
    def macro_f1(self) -> float:
        """Mean over attributes of the attribute's macro-F1."""
        scores = [a["macro_f1"] for a in self.attributes.values()]
        return sum(scores) / len(scores) if scores else 0.0

    @property
    def accuracy(self) -> float:
        scores = [a["accuracy"] for a in self.attributes.values()]
        return sum(scores) / len(scores) if scores else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"loss": self.loss, "macro_f1": self.macro_f1, "accuracy": self.accuracy, "attributes": self.attributes}


def evaluate(
    bundle: ClipBundle,
    spec: HeadSpec,
    data: LabeledImages,
    data_values: Mapping[str, Sequence[str]] | None = None,
    batch_size: int = EVAL_BATCH_SIZE,
) -> EvalResult:
    """Score a model on labeled images.

    `spec` is the model's own classifier (values, captions). `data.targets` index into
    `data_values` (default: spec.values), the value space metrics are reported in; this lets a
    champion trained on an older taxonomy be scored on today's test set. A predicted value that
    today's taxonomy lacks counts as wrong (an extra "(other)" class); an attribute the model
    does not know scores 0.
    """
    data_values = data_values or spec.values
    bundle.model.eval()
    known = [a for a in data_values if a in spec.values]
    head = HeadSpec({a: spec.values[a] for a in known}, {a: spec.captions[a] for a in known})
    scores = ImageScores(loss=0.0, predictions={a: [] for a in known})
    if known and len(data):
        to_model = {a: _index_map(data_values[a], head.values[a]) for a in known}
        model_targets = {a: [to_model[a].get(t, IGNORE) for t in data.targets[a]] for a in known}
        images = PreprocessedImages(data.images, bundle.preprocess, bundle.image_size)
        tokens = bundle.tokenizer(head.all_captions()).to(bundle.device)
        scores = score_images(bundle, tokens, head, images, model_targets, batch_size)
    predictions = {a: _to_data_values(data_values[a], head.values[a], scores.predictions[a]) if a in known else None
                   for a in data_values}
    return EvalResult(
        loss=scores.loss,
        attributes={a: _attribute_metrics(a, data_values[a], data.targets[a], predictions[a]) for a in data_values},
        ids=list(data.ids),
        targets={a: list(data.targets[a]) for a in data_values},
        predictions=predictions,
    )


def _to_data_values(values: Sequence[str], model_values: Sequence[str], predicted: Sequence[int]) -> list[int]:
    """Model value indices -> data value indices; a value the data lacks -> len(values) ("(other)")."""
    back = _index_map(model_values, values)
    return [back.get(p, len(values)) for p in predicted]


def _index_map(source: Sequence[str], target: Sequence[str]) -> dict[int, int]:
    position = {name: i for i, name in enumerate(target)}
    return {i: position[name] for i, name in enumerate(source) if name in position}


def _attribute_metrics(
    attribute: str, values: Sequence[str], targets: Sequence[int], predicted: Sequence[int] | None
) -> dict[str, Any]:
    labeled = sum(1 for t in targets if t != IGNORE)
    if predicted is None:
        return {"accuracy": 0.0, "macro_f1": 0.0, "support": labeled, "values": list(values),
                "confusion": None, "note": f"model has no head for {attribute}"}
    other = len(values)
    classes = len(values) + (1 if other in predicted else 0)
    confusion = confusion_matrix(torch.tensor(list(predicted), dtype=torch.long),
                                 torch.tensor(list(targets), dtype=torch.long), classes)
    accuracy, macro_f1 = accuracy_and_macro_f1(confusion)
    names = list(values) + (["(other)"] if classes > len(values) else [])
    return {"accuracy": accuracy, "macro_f1": macro_f1, "support": labeled, "values": names,
            "confusion": confusion.tolist()}
