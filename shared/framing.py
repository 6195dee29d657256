"""One framing for training, evaluation and serving: letterbox.

A product photo is padded to a square with white (as product photos and transparent images
composited on white expect) and resized whole to the model's input size. Nothing is cropped
at serving: a centre crop of a wide photo cut off sleeves and handles, while training saw them.
Training augments the same letterboxed square with a mild random resized crop (area
`crop_scale`-1, as open_clip's default 0.9) and, if asked, a horizontal flip.

The PIL path (shared.imaging.decode_image with a draft size, then `eval_transform`: CPU decode
in the worker, the trainer, the gate) and the tensor path (`preprocess_tensor`:
worker/gpu_decode.py on nvJPEG, which decodes at full size, then reduces like the DCT draft,
letterboxes and resizes) compute the same thing; tests/unit/test_training_decode_parity.py
checks pixels and features on real photos.
"""

from __future__ import annotations

import functools
import threading
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import structlog
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torchvision import transforms as T

from shelfsight.shared.imaging import jpeg_draft_factor
from shelfsight.shared.torch_threads import one_intra_op_thread

log = structlog.get_logger()

FRAMING = "letterbox"
FILL = (255, 255, 255)


def letterbox_box(width: int, height: int) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) padding that centres a width x height image in a square."""
    side = max(width, height)
    left, top = (side - width) // 2, (side - height) // 2
    return left, top, side - width - left, side - height - top


class Letterbox:
    """PIL image -> the same image centred on a white square (no resampling)."""

    def __call__(self, image: Image.Image) -> Image.Image:
        image = image.convert("RGB") if image.mode != "RGB" else image
        width, height = image.size
        if width == height:
            return image
        left, top, _, _ = letterbox_box(width, height)
        square = Image.new("RGB", (max(width, height),) * 2, FILL)
        square.paste(image, (left, top))
        return square

    def __repr__(self) -> str:
        return f"Letterbox(fill={FILL})"


def eval_transform(size: int, mean: Sequence[float], std: Sequence[float]) -> Callable[[Any], torch.Tensor]:
    """PIL image -> normalised [3, size, size]: letterbox, bicubic resize, normalise (serving, val, test)."""
    return T.Compose([
        Letterbox(),
        T.Resize((size, size), interpolation=T.InterpolationMode.BICUBIC, antialias=True),
        T.ToTensor(),
        T.Normalize(list(mean), list(std)),
    ])


def train_transform(
    size: int, mean: Sequence[float], std: Sequence[float], crop_scale: float = 0.9, flip: bool = False
) -> Callable[[Any], torch.Tensor]:
    """The training transform: letterbox, random resized crop of area `crop_scale`-1, optional flip."""
    steps: list[Any] = [
        Letterbox(),
        T.RandomResizedCrop(size, scale=(crop_scale, 1.0), interpolation=T.InterpolationMode.BICUBIC, antialias=True),
    ]
    if flip:
        steps.append(T.RandomHorizontalFlip())
    steps += [T.ToTensor(), T.Normalize(list(mean), list(std))]
    return T.Compose(steps)


def letterbox_tensor(image: torch.Tensor) -> torch.Tensor:
    """uint8 [3, H, W] -> [3, S, S] centred on white, S = max(H, W) (the tensor twin of Letterbox)."""
    height, width = image.shape[-2:]
    if height == width:
        return image
    left, top, right, bottom = letterbox_box(int(width), int(height))
    return TF.pad(image, [left, top, right, bottom], fill=list(FILL))


def draft_like(image: torch.Tensor, draft_size: int | None) -> torch.Tensor:
    """A full-size decoded JPEG [3, H, W] (or a batch [B, 3, H, W] of one size) uint8 reduced as PIL's
    draft decode would (box average per factor x factor block, which is what the DCT-domain
    downscale amounts to)."""
    factor = jpeg_draft_factor(int(image.shape[-1]), int(image.shape[-2]), draft_size)
    if factor == 1:
        return image
    batched = image.dim() == 4
    pooled = torch.nn.functional.avg_pool2d(image.float() if batched else image.float()[None], factor, ceil_mode=True)
    return (pooled if batched else pooled[0]).round_().clamp_(0, 255).to(torch.uint8)


def preprocess_pil(image: Image.Image, size: int, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """A decoded PIL image -> `preprocess_array` of its pixels."""
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    return preprocess_array(np.array(rgb), size, mean, std)


def preprocess_array(rgb: np.ndarray, size: int, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Decoded H x W x 3 uint8 pixels (`shared.imaging.decode_rgb`) -> `preprocess_tensor` of them: what
    `eval_transform` computes (within one 8-bit level: torch's antialiased bicubic against PIL's), at
    about a third of the CPU, because torch resizes uint8 channels-last images with vectorised
    kernels. The extraction worker's CPU path, called from many task threads at once.

    The steps run as one TorchScript call (`letterbox_resize_normalise_hwc`, scripted once per
    process), which gives the GIL up once per image instead of once per torch op: from 16 task
    threads on 2 cores the op-by-op path cost 1.2 ms per image against 0.7 from one thread, as one
    call 0.8 (bench/decode_cost.py, docs/performance.md). Same pixels, bit for bit.
    """
    scaled_mean, scaled_std = _normalizer(tuple(map(float, mean)), tuple(map(float, std)), torch.device("cpu"))
    with one_intra_op_thread():  # called from many task threads at once: no OpenMP team each
        return _hwc_preprocessor()(torch.from_numpy(rgb), size, scaled_mean, scaled_std)


def warm_up_preprocessing() -> None:
    """Script the CPU preprocessing and let TorchScript profile it now (the first call scripts,
    about 0.15 s, and the first two run slow while it profiles: tens of ms each), not on the first
    events. Later image sizes reuse the optimised graph."""
    blank = np.full((16, 16, 3), 255, dtype=np.uint8)
    for _ in range(3):
        preprocess_array(blank, 16, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def letterbox_resize_normalise_hwc(
    rgb: torch.Tensor, size: int, scaled_mean: torch.Tensor, scaled_std: torch.Tensor
) -> torch.Tensor:
    """uint8 [H, W, 3] -> normalised float [3, size, size]: `preprocess_tensor` (no draft) of the
    channels-last view, in plain torch ops that TorchScript compiles. `scaled_mean`/`scaled_std`:
    255 mean and 255 std as [3, 1, 1] (`_normalizer`)."""
    image = rgb.permute(2, 0, 1)  # [3, H, W] view of HWC: channels-last
    if image.shape[1] != image.shape[2]:  # letterbox_tensor: centred on white
        left, top, right, bottom = letterbox_box(image.shape[2], image.shape[1])
        image = torch.nn.functional.pad(image, [left, right, top, bottom], value=255.0)  # FILL, white
    channels, height, width = image.shape[0], image.shape[1], image.shape[2]
    # As torchvision's resize: a 1CHW view with the batch stride spelled out, so that interpolate
    # keeps the channels-last layout (its uint8 kernels) and allocates the output that way.
    batch = image.as_strided([1, channels, height, width],
                             [channels * height * width, image.stride(0), image.stride(1), image.stride(2)])
    resized = torch.nn.functional.interpolate(batch, size=[size, size], mode="bicubic", align_corners=False,
                                              antialias=True)
    return normalised(resized[0], scaled_mean, scaled_std)


def normalised(resized: torch.Tensor, scaled_mean: torch.Tensor, scaled_std: torch.Tensor) -> torch.Tensor:
    """Resized uint8 pixels -> contiguous float (x - 255 mean) / (255 std), in one pass from the
    uint8 (channels-last strides included) to float, then in place: eval_transform's
    (x / 255 - mean) / std within float rounding (2e-7), at under half the CPU of
    .contiguous().float().div_(255).clamp_() and TF.normalize (0.18 against 0.41 ms per 224 px
    image, one thread)."""
    pixels = torch.empty(resized.shape, dtype=torch.float32, device=resized.device)
    pixels.copy_(resized)
    return pixels.sub_(scaled_mean).div_(scaled_std)


_script_lock = threading.Lock()


@functools.cache
def _hwc_preprocessor() -> Callable[[torch.Tensor, int, torch.Tensor, torch.Tensor], torch.Tensor]:
    """What `preprocess_array` runs: `letterbox_resize_normalise_hwc` scripted, scripted once per
    process (threads that ask at the same time wait for the first)."""
    with _script_lock:
        return _scripted_or_eager()


@functools.cache
def _scripted_or_eager() -> Callable[[torch.Tensor, int, torch.Tensor, torch.Tensor], torch.Tensor]:
    """`letterbox_resize_normalise_hwc` scripted, or the function itself where this torch cannot
    script it (logged)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated, still shipped and working
            scripted: Callable[..., torch.Tensor] = torch.jit.script(letterbox_resize_normalise_hwc)
        return scripted
    except Exception as exc:  # noqa: BLE001 - any failure to script: the same ops, run eagerly
        log.warning("framing.torchscript_unavailable", error=str(exc)[:200])
        return letterbox_resize_normalise_hwc


def preprocess_tensor(
    image: torch.Tensor, size: int, mean: Sequence[float], std: Sequence[float], draft_size: int | None = None
) -> torch.Tensor:
    """uint8 [3, H, W] -> normalised float [3, size, size], as `eval_transform` on the same pixels
    (or a batch [B, 3, H, W] of one size -> [B, 3, size, size], the same per image).

    `draft_size`: the image is a full-size JPEG decode that the PIL path decodes with this draft
    size; it is first reduced the same way (`draft_like`), so both paths see the same pixels.
    """
    square = letterbox_tensor(draft_like(image, draft_size))
    resized = TF.resize(square, [size, size], interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
    scaled_mean, scaled_std = _normalizer(tuple(map(float, mean)), tuple(map(float, std)), resized.device)
    return normalised(resized, scaled_mean, scaled_std)


@functools.lru_cache(maxsize=64)
def _normalizer(mean: tuple[float, ...], std: tuple[float, ...], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """255 mean and 255 std as [C, 1, 1] float tensors on `device` (built once per model's stats).
    On CUDA the copy is waited for here: every lane's stream then reads them, whichever built them."""
    scaled_mean = (torch.tensor(mean, dtype=torch.float32) * 255.0).view(-1, 1, 1).to(device)
    scaled_std = (torch.tensor(std, dtype=torch.float32) * 255.0).view(-1, 1, 1).to(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return scaled_mean, scaled_std
