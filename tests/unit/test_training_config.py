"""One configuration path: the options the benchmark needs are settings production reads too."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
from PIL import Image

from shelfsight.shared.model_factory import WeightsError, create_clip
from shelfsight.shared.settings import Settings
from shelfsight.trainer.dataset import LabeledImages
from shelfsight.trainer.evaluate import HeadSpec
from shelfsight.trainer.train import TrainConfig, fit

ROOT = Path(__file__).resolve().parents[2]


def test_flip_min_steps_crop_and_sampler_come_from_settings() -> None:
    settings = Settings(train_flip=True, train_min_steps_per_epoch=7, train_augment=False, train_crop_scale=0.7,
                        train_sampler_power=0.25, train_sampler_max_ratio=3.0)
    config = TrainConfig.from_settings(settings)
    assert (config.flip, config.min_steps_per_epoch, config.augment, config.crop_scale) == (True, 7, False, 0.7)
    assert (config.sampler_power, config.sampler_max_ratio) == (0.25, 3.0)


def test_a_tiny_category_gets_the_minimum_steps_per_epoch() -> None:
    spec = HeadSpec({"colour": ["red", "blue"]}, {"colour": ["red", "blue"]})
    images = [Image.new("RGB", (32, 32), (200, 20, 20) if i % 2 else (20, 20, 200)) for i in range(6)]
    data = LabeledImages(images, {"colour": [i % 2 for i in range(6)]}, [str(i) for i in range(6)])
    config = TrainConfig.from_settings(Settings(train_epochs=2, train_batch_size=32, train_min_steps_per_epoch=5))
    result = fit(create_clip("shelfsight-tiny", "none"), spec, data, None, config)
    assert result.steps == 10  # not 2 x ceil(6 / 32) = 2


def test_the_image_size_setting_reaches_the_model_and_is_refused_where_it_cannot_work() -> None:
    bundle = create_clip("shelfsight-effnet-lite0", "none", image_size=96)
    assert bundle.image_size == 96
    assert bundle.preprocess(Image.new("RGB", (300, 200))).shape == (3, 96, 96)
    assert bundle.preprocess_train(Image.new("RGB", (300, 200))).shape == (3, 96, 96)
    with pytest.raises(WeightsError, match="takes 64 px images only"):
        create_clip("shelfsight-tiny", "none", image_size=96)  # a ViT's patch grid is fixed


def test_the_benchmark_builds_its_config_through_settings_only() -> None:
    spec = importlib.util.spec_from_file_location("learning_curve", ROOT / "bench" / "learning_curve.py")
    assert spec and spec.loader
    bench = importlib.util.module_from_spec(spec)
    sys.modules["learning_curve"] = bench
    spec.loader.exec_module(bench)
    args = bench.parse_args(["--quick", "--flip", "--min-steps-per-epoch", "6", "--image-size", "80"])
    settings = bench.bench_settings(args, seed=3)
    assert (settings.train_flip, settings.train_min_steps_per_epoch, settings.train_image_size) == (True, 6, 80)
    assert (settings.train_seed, settings.train_split_seed) == (3, 3)
    assert args.seeds >= 5
    source = (ROOT / "bench" / "learning_curve.py").read_text()
    assert "TrainConfig.from_settings(settings)" in source and "from_settings(settings," not in source
