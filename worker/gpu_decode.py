"""JPEG decode + preprocessing on the GPU (nvJPEG through torchvision), for batches.

Mirrors open_clip's eval transform (shorter side to `size` with bicubic + antialias,
centre crop, scale to [0, 1], normalise). It runs on any device, so the CPU tests check
it against the PIL path; on CUDA the decode itself runs on nvJPEG.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torchvision.io as tvio
import torchvision.transforms.v2.functional as TF


def decode_jpegs(jpegs: Sequence[bytes], device: torch.device) -> list[torch.Tensor]:
    """uint8 [3, H, W] tensors, EXIF orientation applied, decoded on `device`."""
    data = [torch.frombuffer(bytearray(j), dtype=torch.uint8) for j in jpegs]
    decoded = tvio.decode_jpeg(data, mode=tvio.ImageReadMode.RGB, device=device, apply_exif_orientation=True)
    return list(decoded) if isinstance(decoded, list) else [decoded]


def preprocess_uint8(
    image: torch.Tensor, size: int, mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """[3, H, W] uint8 → normalised float [3, size, size], like open_clip's eval transform."""
    resized = TF.resize(image, [size], interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
    cropped = TF.center_crop(resized, [size, size])
    pixels = cropped.float().div_(255.0).clamp_(0.0, 1.0)
    return TF.normalize(pixels, list(mean), list(std))


def decode_batch(
    jpegs: Sequence[bytes], size: int, mean: Sequence[float], std: Sequence[float], device: torch.device
) -> torch.Tensor:
    """Decode and preprocess a batch of JPEGs into one [B, 3, size, size] tensor on `device`."""
    return torch.stack([preprocess_uint8(img, size, mean, std) for img in decode_jpegs(jpegs, device)])
