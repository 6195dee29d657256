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

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torchvision import transforms as T

from shelfsight.shared.torch_threads import one_intra_op_thread

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


def jpeg_draft_factor(width: int, height: int, draft_size: int | None) -> int:
    """The power-of-two DCT scale (1, 2, 4 or 8) at which shared.imaging.decode_image has PIL decode a
    JPEG of this size with `draft_size` (Pillow's JpegImageFile.draft, as decode_image calls it)."""
    if not draft_size:
        return 1
    scale = min(width, height) / draft_size
    if scale < 2:
        return 1
    requested = (max(1, int(width / scale)), max(1, int(height / scale)))
    ratio = min(width // requested[0], height // requested[1])
    return next(f for f in (8, 4, 2, 1) if ratio >= f)


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
    """A decoded PIL image -> `preprocess_tensor` of its pixels: what `eval_transform` computes (within
    one 8-bit level: torch's antialiased bicubic against PIL's), at about a third of the CPU, because
    torch resizes uint8 channels-last images with vectorised kernels. The extraction worker's CPU path."""
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    pixels = torch.from_numpy(np.array(rgb)).permute(2, 0, 1)  # [3, H, W] view of HWC: channels-last
    with one_intra_op_thread():  # called from many task threads at once: no OpenMP team each
        return preprocess_tensor(pixels, size, mean, std)


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
    # contiguous first: the uint8 resize leaves channels-last strides (from the HWC decode), on which
    # the float ops and normalize cost 0.43 instead of 0.16 ms per 224 px image; same values
    pixels = resized.contiguous().float().div_(255.0).clamp_(0.0, 1.0)
    return TF.normalize(pixels, list(mean), list(std))
