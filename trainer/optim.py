"""Which weights train, and how fast: train modes, AdamW parameter groups, the LR schedule.

`set_trainable` freezes or unfreezes the towers for a train mode, `param_groups` gives the text
tower, projections and logit scale their own LR, and `warmup_cosine` is the LR factor per step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

from torch import nn

TrainMode = Literal["full", "last_n", "frozen_text", "head"]


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
      final norm, text projection);
    - head: only the text tower, both projections and the logit scale (the image trunk frozen):
      the linear-probe stage of LP-FT (`TrainConfig.lp_epochs`).
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
    elif mode == "head":
        for name, p in model.named_parameters():
            p.requires_grad_(_is_head(name))
    else:
        raise ValueError(f"unknown train mode {mode!r}; use full, last_n, frozen_text or head")
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

