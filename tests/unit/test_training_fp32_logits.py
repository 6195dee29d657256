"""Logits are fp32 in training (under autocast) and at serving (outside it): one number, both sides."""

from __future__ import annotations

import torch

from shelfsight.shared import clip_math


def _features(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(16, 64, generator=generator)
    text = clip_math.normalize(torch.randn(5, 64, generator=generator))
    return images, text


def test_logits_under_low_precision_autocast_are_the_fp32_logits() -> None:
    images, text = _features()
    reference = clip_math.attribute_logits(images, text, torch.tensor(100.0))
    # CPU autocast puts `@` on bf16 just like CUDA autocast does; the logits must not follow it
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        logits = clip_math.attribute_logits(images, text, torch.tensor(100.0))
    assert logits.dtype == torch.float32
    assert torch.equal(logits, reference)  # not bf16 steps of 0.25-0.5 near 100


def test_training_loss_under_autocast_equals_the_serving_side_fp32_loss() -> None:
    images, text = _features(1)
    targets = {"a": torch.arange(16) % 5}
    serving = clip_math.multi_attribute_loss(images, {"a": text}, targets, 100.0)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        training = clip_math.multi_attribute_loss(images.bfloat16(), {"a": text.bfloat16()}, targets, 100.0)
    # the features arrive in bf16 (the towers ran under autocast); the logits are fp32 all the same
    expected = clip_math.multi_attribute_loss(images.bfloat16().float(), {"a": text.bfloat16().float()},
                                              targets, 100.0)
    assert training.dtype == torch.float32
    assert torch.allclose(training, expected, atol=1e-6)
    assert torch.allclose(serving, expected, rtol=0.05)
    probabilities = clip_math.score_heads(images, (clip_math.AttributeHead("a", tuple("vwxyz"), text),), 100.0)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        under = clip_math.score_heads(images, (clip_math.AttributeHead("a", tuple("vwxyz"), text),), 100.0)
    assert torch.equal(probabilities["a"], under["a"])
