"""The plain training loop and evaluation, on tensors and tiny in-memory images."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from shelfsight.shared.model_factory import create_clip
from shelfsight.shared.settings import Settings
from shelfsight.trainer.dataset import LabeledImages
from shelfsight.trainer.evaluate import HeadSpec, evaluate
from shelfsight.trainer.optim import set_trainable, warmup_cosine
from shelfsight.trainer.train import TrainConfig, fit

SPEC = HeadSpec({"colour": ["red", "blue"]}, {"colour": ["red", "blue"]})


def _separable(n: int = 16) -> LabeledImages:
    images = [Image.new("RGB", (64, 64), (220, 30, 30) if i % 2 == 0 else (30, 30, 220)) for i in range(n)]
    return LabeledImages(images, {"colour": [i % 2 for i in range(n)]}, [f"p{i}" for i in range(n)])


def test_fit_reduces_training_loss_and_keeps_the_best_epoch() -> None:
    bundle = create_clip("shelfsight-tiny", "none")
    data = _separable()
    before = evaluate(bundle, SPEC, data)
    steps: list[dict] = []
    config = TrainConfig.from_settings(Settings(), epochs=4, batch_size=8, lr=1e-3, warmup_steps=2, min_steps_per_epoch=1)
    result = fit(bundle, SPEC, data, data, config, progress=steps.append)
    after = evaluate(bundle, SPEC, data)
    assert result.history[-1].train_loss < result.history[0].train_loss / 2
    assert after.loss < before.loss / 2
    assert after.attributes["colour"]["accuracy"] == 1.0
    assert after.attributes["colour"]["confusion"] == [[8, 0], [0, 8]]
    best = min(result.history, key=lambda h: h.val_loss)
    assert result.best_epoch == best.epoch and result.best_val_loss == best.val_loss
    # the model holds the kept weights
    assert all(torch.equal(v, result.state_dict[k]) for k, v in bundle.model.state_dict().items())
    assert [s["global_step"] for s in steps if s["phase"] == "step"] == list(range(1, 9))
    assert [s["epoch"] for s in steps if s["phase"] == "epoch"] == [1, 2, 3, 4]


def test_early_stopping_stops_after_patience_epochs_without_improvement() -> None:
    bundle = create_clip("shelfsight-tiny", "none")
    data = _separable(8)
    # lr 0: the val loss never improves after epoch 1, so training stops at 1 + patience
    config = TrainConfig.from_settings(Settings(), epochs=10, batch_size=8, lr=0.0, patience=2)
    result = fit(bundle, SPEC, data, data, config)
    assert len(result.history) == 3 and result.stopped_early and result.best_epoch == 1


@pytest.mark.parametrize("mode", ["full", "last_n", "frozen_text"])
def test_train_modes_select_the_right_weights(mode: str) -> None:
    model = create_clip("shelfsight-tiny", "none").model
    total = sum(p.numel() for p in model.parameters())
    trainable = set_trainable(model, mode, last_n_blocks=1)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    if mode == "full":
        assert trainable == total
    elif mode == "frozen_text":
        assert not any(n.startswith(("transformer.", "token_embedding", "ln_final", "text_projection")) for n in names)
        assert "visual.conv1.weight" in names and "logit_scale" in names
    else:
        assert "visual.transformer.resblocks.1.mlp.c_fc.weight" in names
        assert "visual.transformer.resblocks.0.mlp.c_fc.weight" not in names
        assert "transformer.resblocks.1.attn.in_proj_weight" in names
        assert "transformer.resblocks.0.attn.in_proj_weight" not in names
        assert {"visual.proj", "text_projection", "logit_scale", "ln_final.weight"} <= names
        assert "visual.conv1.weight" not in names and "token_embedding.weight" not in names
        assert trainable < total


def test_last_n_finds_the_blocks_of_the_timm_image_tower() -> None:
    model = create_clip("shelfsight-effnet-lite0", "none").model
    set_trainable(model, "last_n", last_n_blocks=1)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(n.startswith("visual.trunk.blocks.6.") for n in names)
    assert not any(n.startswith("visual.trunk.blocks.5.") for n in names)
    assert {"visual.trunk.conv_head.weight", "visual.head.proj.weight"} <= names


def test_warmup_then_cosine_decay() -> None:
    factor = warmup_cosine(warmup_steps=10, total_steps=100)
    assert factor(0) == pytest.approx(0.1) and factor(9) == pytest.approx(1.0)
    assert factor(55) == pytest.approx(0.5) and factor(100) == pytest.approx(0.0)
    assert warmup_cosine(warmup_steps=20, total_steps=8)(1) == pytest.approx(1.0)  # warm-up capped for short runs


def test_evaluate_maps_a_champion_with_other_values_onto_todays_values() -> None:
    bundle = create_clip("shelfsight-tiny", "none")
    data = _separable(8)
    fit(bundle, SPEC, data, None,
        TrainConfig.from_settings(Settings(), epochs=4, batch_size=8, lr=1e-3, warmup_steps=1))
    # the model scores values in another order; metrics still come out in data order
    swapped = HeadSpec({"colour": ["blue", "red"]}, {"colour": ["blue", "red"]})
    same = evaluate(bundle, swapped, data, data_values=SPEC.values)
    direct = evaluate(bundle, SPEC, data)
    assert same.attributes["colour"]["confusion"] == direct.attributes["colour"]["confusion"]
    # a model without the attribute scores 0 for it
    other = HeadSpec({"shape": ["round", "square"]}, {"shape": ["round", "square"]})
    missing = evaluate(bundle, other, data, data_values=SPEC.values)
    assert missing.attributes["colour"]["macro_f1"] == 0.0 and missing.macro_f1 == 0.0
