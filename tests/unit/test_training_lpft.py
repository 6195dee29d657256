"""LP-FT: the head-only stage trains the head alone, then fine-tuning starts from its weights."""

from __future__ import annotations

import torch
from PIL import Image

from shelfsight.shared.model_factory import create_clip
from shelfsight.shared.settings import Settings
from shelfsight.trainer.dataset import LabeledImages
from shelfsight.trainer.evaluate import HeadSpec
from shelfsight.trainer.optim import set_trainable
from shelfsight.trainer.train import TrainConfig, fit


def _is_trunk(name: str) -> bool:
    return name.startswith("visual.") and not name.startswith(("visual.proj", "visual.head."))


def test_head_mode_trains_the_text_tower_projections_and_logit_scale_only() -> None:
    model = create_clip("shelfsight-tiny", "none").model
    set_trainable(model, "head")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "logit_scale" in trainable and "visual.proj" in trainable
    assert any(n.startswith(("transformer.", "text.")) for n in trainable)
    assert not any(_is_trunk(n) for n in trainable)


def test_lp_epochs_run_a_head_only_stage_before_full_fine_tuning() -> None:
    spec = HeadSpec({"colour": ["red", "blue"]}, {"colour": ["red", "blue"]})
    images = [Image.new("RGB", (32, 32), (200, 20, 20) if i % 2 else (20, 20, 200)) for i in range(8)]
    data = LabeledImages(images, {"colour": [i % 2 for i in range(8)]}, [str(i) for i in range(8)])
    settings = Settings(train_epochs=1, train_batch_size=8, train_min_steps_per_epoch=2, train_lp_epochs=1,
                        train_lp_lr=1e-3, train_augment=False)
    config = TrainConfig.from_settings(settings)
    assert (config.lp_epochs, config.lp_lr) == (1, 1e-3)
    bundle = create_clip("shelfsight-tiny", "none")
    before = {k: v.clone() for k, v in bundle.model.state_dict().items()}
    result = fit(bundle, spec, data, None, config)
    lp, after = result.lp_state_dict, result.state_dict
    assert lp is not None
    trunk = [k for k in before if _is_trunk(k) and before[k].is_floating_point()]
    head = [k for k in before if not _is_trunk(k) and before[k].is_floating_point()]
    assert all(torch.equal(lp[k], before[k]) for k in trunk)  # the first stage left the image trunk alone
    assert any(not torch.equal(lp[k], before[k]) for k in head)
    assert any(not torch.equal(after[k], lp[k]) for k in trunk)  # the second stage fine-tuned it
    assert result.steps == 2  # the result describes the fine-tuning stage


def test_no_lp_stage_by_default() -> None:
    assert TrainConfig.from_settings(Settings()).lp_epochs == 0
