"""The training loop: a plain function over in-memory data. No Celery, no S3, no files.

`fit` fine-tunes a CLIP model so that each image's features score highest against the
caption of its labeled value, per attribute (clip_math.multi_attribute_loss), and returns
the weights of the epoch with the lowest validation loss. `evaluate` scores a model on a
labeled set: loss, accuracy, macro-F1 and a confusion matrix per attribute.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import structlog
import torch
from torch import nn

from shelfsight.shared.clip_math import (
    IGNORE,
    accuracy_and_macro_f1,
    confusion_matrix,
    multi_attribute_loss,
    normalize,
)
from shelfsight.shared.model_factory import ClipBundle
from shelfsight.shared.settings import Settings
from shelfsight.trainer.dataset import BalancedBatchSampler, LabeledImages

log = structlog.get_logger()

TrainMode = Literal["full", "last_n", "frozen_text"]
Progress = Callable[[dict[str, Any]], None]
_CACHE_LIMIT_BYTES = 1 << 30  # preprocessed eval tensors kept in memory up to this size


@dataclass
class TrainConfig:
    """Hyper-parameters of one fine-tuning run (defaults from Settings via `from_settings`)."""

    epochs: int = 15
    batch_size: int = 32
    lr: float = 1e-4
    weight_decay: float = 0.05
    warmup_steps: int = 20
    patience: int = 4
    mode: TrainMode = "full"
    last_n_blocks: int = 2
    seed: int = 0
    head_lr_scale: float = 1.0
    """LR multiplier for the text tower, both projections and the logit scale. A value > 1
    helps when the text tower starts from random init (the offline default model)."""
    augment: bool = True
    """Apply the bundle's preprocess_train (random resized crop) to training images; False
    preprocesses each training image once with the eval transform (faster on CPU)."""
    freeze_batchnorm: bool = True
    """Keep BatchNorm running statistics frozen (pretrained ones); small batches make them noisy."""
    steps_per_epoch: int | None = None
    """Default: ceil(len(train) / batch_size)."""
    eval_batch_size: int = 64

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: Any) -> TrainConfig:
        base = cls(
            epochs=settings.train_epochs,
            batch_size=settings.train_batch_size,
            lr=settings.train_lr,
            weight_decay=settings.train_weight_decay,
            warmup_steps=settings.train_warmup_steps,
            patience=settings.train_patience,
            mode=settings.train_mode,
            last_n_blocks=settings.train_last_n_blocks,
            seed=settings.train_seed,
        )
        for key, value in overrides.items():
            if value is not None:
                setattr(base, key, value)
        return base


@dataclass(frozen=True)
class HeadSpec:
    """The classifier a model is trained for: per attribute, value names and caption texts."""

    values: dict[str, list[str]]
    captions: dict[str, list[str]]

    def all_captions(self) -> list[str]:
        return [c for attr in self.values for c in self.captions[attr]]


@dataclass
class EpochStats:
    epoch: int
    train_loss: float
    val_loss: float
    lr: float
    seconds: float


@dataclass
class FitResult:
    """The best checkpoint (CPU state dict) and how training went."""

    state_dict: dict[str, torch.Tensor]
    history: list[EpochStats]
    best_epoch: int
    best_val_loss: float
    stopped_early: bool
    steps: int
    seconds: float
    config: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        return {
            "best_epoch": self.best_epoch,
            "best_val_loss": self.best_val_loss,
            "stopped_early": self.stopped_early,
            "epochs_run": len(self.history),
            "steps": self.steps,
            "seconds": round(self.seconds, 2),
            "history": [asdict(h) for h in self.history],
            "config": self.config,
        }


# --- which weights train --------------------------------------------------------------------------


def _text_module(model: Any) -> Any:
    """The text tower's owner: open_clip.CLIP keeps it on the model, CustomTextCLIP in `.text`."""
    return getattr(model, "text", model)


def _visual_blocks_and_head(visual: Any) -> tuple[Sequence[nn.Module], list[nn.Module], list[nn.Parameter]]:
    """(blocks, modules after the blocks, loose parameters after the blocks) of the image tower."""
    if hasattr(visual, "transformer"):  # open_clip VisionTransformer
        modules = [m for m in (getattr(visual, "ln_post", None), getattr(visual, "attn_pool", None)) if m is not None]
        params = [p for p in (getattr(visual, "proj", None),) if isinstance(p, nn.Parameter)]
        return list(visual.transformer.resblocks), modules, params
    if hasattr(visual, "trunk"):  # open_clip TimmModel: trunk stages, then trunk head, then projection
        trunk = visual.trunk
        name = "blocks" if hasattr(trunk, "blocks") else "stages"
        children = list(trunk.named_children())
        after = [m for n, m in children[[n for n, _ in children].index(name) + 1:]]
        return list(getattr(trunk, name)), [*after, visual.head], []
    raise ValueError(f"train_mode=last_n does not know the blocks of {type(visual).__name__}; use full or frozen_text")


def _text_blocks_and_head(model: Any) -> tuple[Sequence[nn.Module], list[nn.Module], list[nn.Parameter]]:
    text = _text_module(model)
    if not hasattr(text, "transformer"):
        raise ValueError(f"train_mode=last_n does not know the text blocks of {type(text).__name__}")
    projection = getattr(text, "text_projection", None)
    modules = [text.ln_final] + ([projection] if isinstance(projection, nn.Module) else [])
    params = [projection] if isinstance(projection, nn.Parameter) else []
    return list(text.transformer.resblocks), modules, params


def set_trainable(model: Any, mode: TrainMode, last_n_blocks: int = 2) -> int:
    """Freeze/unfreeze parameters for the mode; returns the number of trainable parameters.

    - full: everything;
    - last_n: the last N blocks of each tower, what follows them (final norms, projections), and
      the logit scale;
    - frozen_text: everything but the text tower (token/positional embeddings, transformer,
      final norm, text projection).
    """
    if mode == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    elif mode == "frozen_text":
        text_ids = {id(p) for p in _text_parameters(model)}
        for p in model.parameters():
            p.requires_grad_(id(p) not in text_ids)
    elif mode == "last_n":
        for p in model.parameters():
            p.requires_grad_(False)
        for blocks, modules, params in (_visual_blocks_and_head(model.visual), _text_blocks_and_head(model)):
            for module in [*list(blocks)[-last_n_blocks:], *modules] if last_n_blocks > 0 else modules:
                for p in module.parameters():
                    p.requires_grad_(True)
            for p in params:
                p.requires_grad_(True)
        model.logit_scale.requires_grad_(True)
    else:
        raise ValueError(f"unknown train mode {mode!r}; use full, last_n or frozen_text")
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _text_parameters(model: Any) -> list[nn.Parameter]:
    text = _text_module(model)
    if text is not model:
        return list(text.parameters())
    visual_ids = {id(p) for p in model.visual.parameters()}
    return [p for n, p in model.named_parameters() if id(p) not in visual_ids and not n.startswith("logit_")]


def _is_head(name: str) -> bool:
    """Text tower, projections and logit scale: the parts a random text tower needs to move most."""
    return not name.startswith("visual.") or name.startswith(("visual.proj", "visual.head."))


def param_groups(model: nn.Module, lr: float, weight_decay: float, head_lr_scale: float) -> list[dict[str, Any]]:
    """AdamW groups: decay only matrices (not biases, norms, embeddings, logit scale); head LR scaled."""
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = p.ndim >= 2 and "embedding" not in name
        groups.setdefault((_is_head(name), decay), []).append(p)
    return [
        {"params": params, "lr": lr * (head_lr_scale if head else 1.0), "weight_decay": weight_decay if decay else 0.0}
        for (head, decay), params in sorted(groups.items())
    ]


def warmup_cosine(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """LR factor: linear warm-up, then cosine decay to 0 at total_steps.

    Warm-up is capped at a quarter of the run so that short runs still reach the peak LR.
    """
    warmup = max(0, min(warmup_steps, total_steps // 4))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


# --- helpers --------------------------------------------------------------------------------------


def autocast_for(device: torch.device) -> AbstractContextManager[Any]:
    """bf16 autocast on CUDA (fp32 master weights); plain fp32 elsewhere."""
    if device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return nullcontext()


def _preprocess_all(images: Sequence[Any], preprocess: Callable[[Any], torch.Tensor]) -> torch.Tensor:
    return torch.stack([preprocess(images[i]) for i in range(len(images))])


class _Batches:
    """Eval-transformed image batches; the tensor is cached when it fits in memory."""

    def __init__(self, images: Sequence[Any], preprocess: Callable[[Any], torch.Tensor], image_size: int) -> None:
        self.images = images
        self.preprocess = preprocess
        fits = len(images) * 3 * image_size * image_size * 4 <= _CACHE_LIMIT_BYTES
        self.cached = _preprocess_all(images, preprocess) if fits and len(images) else None

    def get(self, indices: Sequence[int]) -> torch.Tensor:
        if self.cached is not None:
            return self.cached[list(indices)]
        return torch.stack([self.preprocess(self.images[i]) for i in indices])


def _text_features(model: Any, tokens: torch.Tensor, spec: HeadSpec) -> dict[str, torch.Tensor]:
    features = normalize(model.encode_text(tokens).float())
    sizes = [len(spec.values[a]) for a in spec.values]
    return dict(zip(spec.values, features.split(sizes), strict=True))


def _targets_tensor(targets: Mapping[str, Sequence[int]], indices: Sequence[int], device: torch.device) -> dict[str, torch.Tensor]:
    return {a: torch.tensor([t[i] for i in indices], dtype=torch.long, device=device) for a, t in targets.items()}


def _set_train_mode(model: nn.Module, freeze_batchnorm: bool) -> None:
    model.train()
    if freeze_batchnorm:
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()


# --- fit ------------------------------------------------------------------------------------------


def fit(
    bundle: ClipBundle,
    spec: HeadSpec,
    train: LabeledImages,
    val: LabeledImages | None,
    config: TrainConfig,
    progress: Progress | None = None,
) -> FitResult:
    """Fine-tune `bundle.model` in place on `train`; keep the epoch with the lowest val loss.

    Args:
        bundle: from shelfsight.shared.model_factory.create_clip, in fp32 (autocast handles bf16 on CUDA).
        spec: value names and captions per attribute; `train.targets` index into spec.values.
        train, val: images and targets. With no val set (or an empty one), the training loss
            of each epoch stands in for the validation loss.
        config: hyper-parameters.
        progress: called with a dict after each step (phase='step') and epoch (phase='epoch').

    Returns:
        FitResult; the model is left holding the best weights, in eval mode.
    """
    started = time.monotonic()
    if len(train) == 0:
        raise ValueError("no training examples")
    model: Any = bundle.model
    device = bundle.device
    torch.manual_seed(config.seed)
    trainable = set_trainable(model, config.mode, config.last_n_blocks)
    optimizer = torch.optim.AdamW(param_groups(model, config.lr, config.weight_decay, config.head_lr_scale))
    steps_per_epoch = config.steps_per_epoch or max(1, math.ceil(len(train) / config.batch_size))
    total_steps = steps_per_epoch * config.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(config.warmup_steps, total_steps))
    tokens = bundle.tokenizer(spec.all_captions()).to(device)
    sampler = BalancedBatchSampler(train.targets, config.batch_size, steps_per_epoch, config.seed)
    train_images = None if config.augment else _Batches(train.images, bundle.preprocess, bundle.image_size)
    val_batches = _Batches(val.images, bundle.preprocess, bundle.image_size) if val is not None and len(val) else None
    log.info("fit.start", train=len(train), val=len(val) if val else 0, trainable=trainable,
             steps=total_steps, mode=config.mode, device=str(device))

    best_loss, best_epoch, best_state, stale = math.inf, -1, None, 0
    history: list[EpochStats] = []
    step = 0
    stopped_early = False
    for epoch in range(1, config.epochs + 1):
        epoch_start = time.monotonic()
        _set_train_mode(model, config.freeze_batchnorm)
        losses = []
        for batch_step, indices in enumerate(sampler, start=1):
            if train_images is not None:
                pixels = train_images.get(indices)
            else:
                pixels = torch.stack([bundle.preprocess_train(train.images[i]) for i in indices])
            targets = _targets_tensor(train.targets, indices, device)
            with autocast_for(device):
                image_features = model.encode_image(pixels.to(device, non_blocking=True))
                text_features = _text_features(model, tokens, spec)
                loss = multi_attribute_loss(image_features, text_features, targets, model.logit_scale.exp())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))
            step += 1
            losses.append(float(loss.detach()))
            if progress:
                progress({"phase": "step", "epoch": epoch, "epochs": config.epochs, "step": batch_step,
                          "steps_per_epoch": steps_per_epoch, "global_step": step, "total_steps": total_steps,
                          "loss": losses[-1], "lr": scheduler.get_last_lr()[0]})
        train_loss = sum(losses) / len(losses)
        if val_batches is not None and val is not None:
            val_loss = _eval_loss(model, tokens, spec, val_batches, val.targets, device, config.eval_batch_size)
        else:
            val_loss = train_loss
        history.append(EpochStats(epoch, train_loss, val_loss, float(scheduler.get_last_lr()[0]),
                                  time.monotonic() - epoch_start))
        log.info("fit.epoch", epoch=epoch, train_loss=round(train_loss, 4), val_loss=round(val_loss, 4))
        if progress:
            progress({"phase": "epoch", "epoch": epoch, "epochs": config.epochs, "global_step": step,
                      "total_steps": total_steps, "train_loss": train_loss, "val_loss": val_loss})
        if val_loss < best_loss:
            best_loss, best_epoch, stale = val_loss, epoch, 0
            best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        else:
            stale += 1
            if stale >= config.patience:
                stopped_early = epoch < config.epochs
                break
    assert best_state is not None
    model.load_state_dict(best_state)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return FitResult(
        state_dict=best_state, history=history, best_epoch=best_epoch, best_val_loss=best_loss,
        stopped_early=stopped_early, steps=step, seconds=time.monotonic() - started, config=asdict(config),
    )


@torch.no_grad()
def _eval_loss(
    model: Any, tokens: torch.Tensor, spec: HeadSpec, batches: _Batches,
    targets: Mapping[str, Sequence[int]], device: torch.device, batch_size: int,
) -> float:
    model.eval()
    size = len(batches.images)
    total = 0.0
    with autocast_for(device):
        text_features = _text_features(model, tokens, spec)
        for start in range(0, size, batch_size):
            indices = list(range(start, min(size, start + batch_size)))
            image_features = model.encode_image(batches.get(indices).to(device))
            loss = multi_attribute_loss(image_features, text_features, _targets_tensor(targets, indices, device),
                                        model.logit_scale.exp())
            total += float(loss) * len(indices)
    return total / max(1, size)


# --- evaluate -------------------------------------------------------------------------------------


@dataclass
class EvalResult:
    """Loss and per-attribute accuracy, macro-F1 and confusion matrix ([true][predicted])."""

    loss: float
    attributes: dict[str, dict[str, Any]]

    @property
    def macro_f1(self) -> float:
        """Mean over attributes of the attribute's macro-F1 (the promotion criterion)."""
        scores = [a["macro_f1"] for a in self.attributes.values()]
        return sum(scores) / len(scores) if scores else 0.0

    @property
    def accuracy(self) -> float:
        scores = [a["accuracy"] for a in self.attributes.values()]
        return sum(scores) / len(scores) if scores else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"loss": self.loss, "macro_f1": self.macro_f1, "accuracy": self.accuracy, "attributes": self.attributes}


@torch.no_grad()
def evaluate(
    bundle: ClipBundle,
    spec: HeadSpec,
    data: LabeledImages,
    data_values: Mapping[str, Sequence[str]] | None = None,
    batch_size: int = 64,
) -> EvalResult:
    """Score a model on labeled images.

    `spec` is the model's own classifier (values, captions). `data.targets` index into
    `data_values` (default: spec.values), the value space metrics are reported in; this lets a
    champion trained on an older taxonomy be scored on today's test set. A predicted value that
    today's taxonomy lacks counts as wrong (an extra "(other)" class); an attribute the model
    does not know scores 0.
    """
    data_values = data_values or spec.values
    model: Any = bundle.model
    device = bundle.device
    model.eval()
    known = [a for a in data_values if a in spec.values]
    head = HeadSpec({a: spec.values[a] for a in known}, {a: spec.captions[a] for a in known})
    to_model = {a: _index_map(data_values[a], head.values[a]) for a in known}
    model_targets = {a: [to_model[a].get(t, IGNORE) for t in data.targets[a]] for a in known}
    batches = _Batches(data.images, bundle.preprocess, bundle.image_size)
    predictions: dict[str, list[int]] = {a: [] for a in known}
    total = 0.0
    if known and len(data):
        tokens = bundle.tokenizer(head.all_captions()).to(device)
        with autocast_for(device):
            text_features = _text_features(model, tokens, head)
            for start in range(0, len(data), batch_size):
                indices = list(range(start, min(len(data), start + batch_size)))
                image_features = model.encode_image(batches.get(indices).to(device))
                loss = multi_attribute_loss(image_features, text_features, _targets_tensor(model_targets, indices, device),
                                            model.logit_scale.exp())
                total += float(loss) * len(indices)
                for a, feats in text_features.items():
                    predictions[a].extend((normalize(image_features.float()) @ feats.float().T).argmax(-1).tolist())
    return EvalResult(
        loss=total / max(1, len(data)),
        attributes={a: _attribute_metrics(a, data_values[a], data.targets[a], predictions.get(a), head.values.get(a))
                    for a in data_values},
    )


def _index_map(source: Sequence[str], target: Sequence[str]) -> dict[int, int]:
    position = {name: i for i, name in enumerate(target)}
    return {i: position[name] for i, name in enumerate(source) if name in position}


def _attribute_metrics(
    attribute: str, values: Sequence[str], targets: Sequence[int], predicted: Sequence[int] | None,
    model_values: Sequence[str] | None,
) -> dict[str, Any]:
    labeled = sum(1 for t in targets if t != IGNORE)
    if predicted is None or model_values is None:
        return {"accuracy": 0.0, "macro_f1": 0.0, "support": labeled, "values": list(values),
                "confusion": None, "note": f"model has no head for {attribute}"}
    back = _index_map(model_values, values)
    other = len(values)
    mapped = [back.get(p, other) for p in predicted]
    classes = len(values) + (1 if other in mapped else 0)
    confusion = confusion_matrix(torch.tensor(mapped, dtype=torch.long), torch.tensor(list(targets), dtype=torch.long), classes)
    accuracy, macro_f1 = accuracy_and_macro_f1(confusion)
    names = list(values) + (["(other)"] if classes > len(values) else [])
    return {"accuracy": accuracy, "macro_f1": macro_f1, "support": labeled, "values": names,
            "confusion": confusion.tolist()}
