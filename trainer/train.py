"""The training loop: a plain function over in-memory data. No Celery, no S3, no files.

`fit` fine-tunes a CLIP model so that each image's features score highest against the
caption of its labeled value, per attribute (clip_math.multi_attribute_loss), and returns
the weights of the epoch with the lowest validation loss. Scoring a model (the validation
loss here, test metrics for the gate) lives in trainer.evaluate; which weights train and the
LR schedule in trainer.optim.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import structlog
import torch
from torch import nn

from shelfsight.shared.clip_math import multi_attribute_loss
from shelfsight.shared.framing import train_transform
from shelfsight.shared.model_factory import ClipBundle
from shelfsight.shared.settings import Settings
from shelfsight.trainer.dataset import BalancedBatchSampler, LabeledImages
from shelfsight.trainer.evaluate import (
    EVAL_BATCH_SIZE,
    HeadSpec,
    PreprocessedImages,
    autocast_for,
    score_images,
    targets_tensor,
    text_features,
)
from shelfsight.trainer.optim import TrainMode, param_groups, set_trainable, warmup_cosine

log = structlog.get_logger()

Progress = Callable[[dict[str, Any]], None]

# Knobs that Settings does not carry: production always trains with these values; tests
# override them through TrainConfig.from_settings. (The learning-curve benchmark leaves them.)
HEAD_LR_SCALE = 1.0
FREEZE_BATCHNORM = True


@dataclass
class TrainConfig:
    """Hyper-parameters of one fine-tuning run. Build it with `from_settings`: Settings hold the defaults."""

    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    warmup_steps: int
    patience: int
    mode: TrainMode
    last_n_blocks: int
    seed: int
    head_lr_scale: float
    """LR multiplier for the text tower, both projections and the logit scale. A value > 1
    helps when the text tower starts from random init (the offline default model)."""
    augment: bool
    """Random resized crops of the letterboxed image (shared.framing.train_transform); False
    preprocesses each training image once with the eval transform (faster on CPU)."""
    crop_scale: float
    """Smallest random crop area, with augment."""
    flip: bool
    """Random horizontal flips, with augment."""
    freeze_batchnorm: bool
    """Keep BatchNorm running statistics frozen (pretrained ones); small batches make them noisy."""
    steps_per_epoch: int | None
    """None: max(min_steps_per_epoch, ceil(len(train) / batch_size))."""
    min_steps_per_epoch: int
    sampler_power: float
    """Sampler tempering (trainer.dataset.balanced_weights)."""
    sampler_max_ratio: float | None
    """Cap on any image's draws relative to uniform sampling."""
    eval_batch_size: int
    lp_epochs: int = 0
    """LP-FT (Kumar et al. 2022): epochs of a first stage that trains only the head (train mode
    `head`: text tower, projections, logit scale; image trunk frozen) at `lp_lr`, before the
    `mode` stage at `lr`. 0: no first stage."""
    lp_lr: float = 1e-3
    """Peak LR of the head-only stage."""

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: Any) -> TrainConfig:
        """Settings' train_* fields and the trainer's constants above, then `overrides` by field name.

        An override of None keeps the default, so optional flags can be passed straight through.
        """
        values: dict[str, Any] = {
            "epochs": settings.train_epochs,
            "batch_size": settings.train_batch_size,
            "lr": settings.train_lr,
            "weight_decay": settings.train_weight_decay,
            "warmup_steps": settings.train_warmup_steps,
            "patience": settings.train_patience,
            "mode": settings.train_mode,
            "last_n_blocks": settings.train_last_n_blocks,
            "seed": settings.train_seed,
            "head_lr_scale": HEAD_LR_SCALE,
            "augment": settings.train_augment,
            "crop_scale": settings.train_crop_scale,
            "flip": settings.train_flip,
            "freeze_batchnorm": FREEZE_BATCHNORM,
            "steps_per_epoch": None,
            "min_steps_per_epoch": settings.train_min_steps_per_epoch,
            "sampler_power": settings.train_sampler_power,
            "sampler_max_ratio": settings.train_sampler_max_ratio,
            "eval_batch_size": EVAL_BATCH_SIZE,
            "lp_epochs": settings.train_lp_epochs,
            "lp_lr": settings.train_lp_lr,
        }
        values.update({key: value for key, value in overrides.items() if value is not None})
        return cls(**values)


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
    lp_state_dict: dict[str, torch.Tensor] | None = None
    """With lp_epochs: the weights the second stage started from (the end of the head-only stage)."""

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

    With config.lp_epochs > 0 a head-only stage runs first (LP-FT): the randomly initialised
    head is fitted to the pretrained image features before their own gradients flow, so the
    first steps of full fine-tuning do not distort them. Each stage keeps its best epoch.

    Returns:
        FitResult; the model is left holding the best weights, in eval mode.
    """
    started = time.monotonic()
    if len(train) == 0:
        raise ValueError("no training examples")
    lp_state = None
    if config.lp_epochs > 0:
        head_config = replace(config, mode="head", epochs=config.lp_epochs, lr=config.lp_lr, lp_epochs=0)
        lp_state = _fit_stage(bundle, spec, train, val, head_config, progress).state_dict
    result = _fit_stage(bundle, spec, train, val, config, progress)
    result.seconds, result.lp_state_dict = time.monotonic() - started, lp_state
    return result


def _fit_stage(
    bundle: ClipBundle,
    spec: HeadSpec,
    train: LabeledImages,
    val: LabeledImages | None,
    config: TrainConfig,
    progress: Progress | None,
) -> FitResult:
    """One training stage in `config.mode`: epochs until patience runs out; the best epoch kept."""
    started = time.monotonic()
    run = _set_up(bundle, spec, train, config, progress)
    validation = _Validation.of(bundle, val)
    log.info("fit.start", train=len(train), val=len(val) if val else 0, trainable=run.trainable,
             steps=run.total_steps, mode=config.mode, device=str(bundle.device))
    best = _BestEpoch(config.patience)
    history: list[EpochStats] = []
    stopped_early = False
    for epoch in range(1, config.epochs + 1):
        history.append(_epoch(run, epoch, validation))
        if best.out_of_patience(history[-1], bundle.model):
            stopped_early = epoch < config.epochs
            break
    state = best.restore(bundle.model)
    return FitResult(
        state_dict=state, history=history, best_epoch=best.epoch, best_val_loss=best.loss,
        stopped_early=stopped_early, steps=run.step, seconds=time.monotonic() - started, config=asdict(config),
    )


@dataclass
class _Run:
    """One fit's moving parts: set up once, carried across epochs."""

    bundle: ClipBundle
    spec: HeadSpec
    train: LabeledImages
    config: TrainConfig
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    tokens: torch.Tensor
    sampler: BalancedBatchSampler
    train_images: PreprocessedImages | None  # eval-transformed once, when not augmenting
    augment: Callable[[Any], torch.Tensor]  # the training transform, when augmenting
    trainable: int
    steps_per_epoch: int
    total_steps: int
    progress: Progress | None
    step: int = 0


@dataclass
class _Validation:
    """The validation images, preprocessed once for the whole run, and their targets."""

    images: PreprocessedImages
    targets: dict[str, list[int]]

    @classmethod
    def of(cls, bundle: ClipBundle, val: LabeledImages | None) -> _Validation | None:
        """None without validation images (the training loss then stands in)."""
        if val is None or not len(val):
            return None
        return cls(PreprocessedImages(val.images, bundle.preprocess, bundle.image_size), val.targets)


def _set_up(
    bundle: ClipBundle, spec: HeadSpec, train: LabeledImages, config: TrainConfig, progress: Progress | None
) -> _Run:
    """Seed, choose the trainable weights, and build the optimizer, LR schedule and batch sampler."""
    model: Any = bundle.model
    torch.manual_seed(config.seed)
    trainable = set_trainable(model, config.mode, config.last_n_blocks)
    optimizer = torch.optim.AdamW(param_groups(model, config.lr, config.weight_decay, config.head_lr_scale))
    steps_per_epoch = config.steps_per_epoch or max(config.min_steps_per_epoch, 1,
                                                    math.ceil(len(train) / config.batch_size))
    total_steps = steps_per_epoch * config.epochs
    return _Run(
        bundle=bundle, spec=spec, train=train, config=config, optimizer=optimizer,
        scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(config.warmup_steps, total_steps)),
        tokens=bundle.tokenizer(spec.all_captions()).to(bundle.device),
        sampler=BalancedBatchSampler(train.targets, config.batch_size, steps_per_epoch, config.seed,
                                     config.sampler_power, config.sampler_max_ratio),
        train_images=None if config.augment else PreprocessedImages(train.images, bundle.preprocess, bundle.image_size),
        augment=train_transform(bundle.image_size, bundle.mean, bundle.std, config.crop_scale, config.flip),
        trainable=trainable, steps_per_epoch=steps_per_epoch, total_steps=total_steps, progress=progress,
    )


def _epoch(run: _Run, epoch: int, validation: _Validation | None) -> EpochStats:
    """Train one epoch, then score the validation set; log and report the epoch."""
    started = time.monotonic()
    train_loss = _train_epoch(run, epoch)
    if validation is not None:
        val_loss = score_images(run.bundle, run.tokens, run.spec, validation.images, validation.targets,
                                run.config.eval_batch_size).loss
    else:
        val_loss = train_loss
    stats = EpochStats(epoch, train_loss, val_loss, float(run.scheduler.get_last_lr()[0]), time.monotonic() - started)
    log.info("fit.epoch", epoch=epoch, train_loss=round(train_loss, 4), val_loss=round(val_loss, 4))
    if run.progress:
        run.progress({"phase": "epoch", "epoch": epoch, "epochs": run.config.epochs, "global_step": run.step,
                      "total_steps": run.total_steps, "train_loss": train_loss, "val_loss": val_loss})
    return stats


def _train_epoch(run: _Run, epoch: int) -> float:
    """`steps_per_epoch` optimizer steps on balanced batches; returns the mean training loss."""
    _set_train_mode(run.bundle.model, run.config.freeze_batchnorm)
    losses = []
    for batch_step, indices in enumerate(run.sampler, start=1):
        losses.append(_train_step(run, indices))
        if run.progress:
            run.progress({"phase": "step", "epoch": epoch, "epochs": run.config.epochs, "step": batch_step,
                          "steps_per_epoch": run.steps_per_epoch, "global_step": run.step,
                          "total_steps": run.total_steps, "loss": losses[-1], "lr": run.scheduler.get_last_lr()[0]})
    return sum(losses) / len(losses)


def _train_step(run: _Run, indices: Sequence[int]) -> float:
    """One AdamW step on the images at `indices`; returns the batch loss."""
    model: Any = run.bundle.model
    device = run.bundle.device
    if run.train_images is not None:
        pixels = run.train_images.get(indices)
    else:
        pixels = torch.stack([run.augment(run.train.images[i]) for i in indices])
    targets = targets_tensor(run.train.targets, indices, device)
    with autocast_for(device):
        image_features = model.encode_image(pixels.to(device, non_blocking=True))
        features = text_features(model, run.tokens, run.spec)
        loss = multi_attribute_loss(image_features, features, targets, model.logit_scale.exp())
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    run.optimizer.step()
    run.scheduler.step()
    with torch.no_grad():
        model.logit_scale.clamp_(0, math.log(100))
    run.step += 1
    return float(loss.detach())


def _set_train_mode(model: nn.Module, freeze_batchnorm: bool) -> None:
    model.train()
    if freeze_batchnorm:
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()


@dataclass
class _BestEpoch:
    """Early stopping: the epoch with the lowest validation loss so far, its weights, epochs since."""

    patience: int
    loss: float = math.inf
    epoch: int = -1
    state: dict[str, torch.Tensor] | None = None
    stale: int = 0

    def out_of_patience(self, stats: EpochStats, model: nn.Module) -> bool:
        """Keep the model's weights if this epoch is the best; True once `patience` epochs were not."""
        if stats.val_loss < self.loss:
            self.loss, self.epoch, self.stale = stats.val_loss, stats.epoch, 0
            self.state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
            return False
        self.stale += 1
        return self.stale >= self.patience

    def restore(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Load the kept weights into `model`, frozen and in eval mode; returns them."""
        if self.state is None:  # only when every validation loss was NaN (or epochs is 0)
            raise ValueError("training kept no epoch: no validation loss was a number; lower train_lr")
        model.load_state_dict(self.state)
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        return self.state
