"""JPEG decode + preprocessing on the GPU (nvJPEG through torchvision), for batches.

Mirrors the PIL path's framing (shared/framing.py: letterbox on white, bicubic + antialias
resize of the whole image, scale to [0, 1], normalise). nvJPEG decodes at full size where PIL
decodes at a reduced DCT scale (draft), so the full-size pixels are first box-averaged by the
same power of two (shared.framing.draft_like). It runs on any device, so
tests/unit/test_training_decode_parity.py checks it with device="cpu" against the PIL path
(shared.imaging.decode_image with draft + the bundle's preprocess) on real photos: pixel
difference and feature cosine.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torchvision.io as tvio

from shelfsight.shared.framing import preprocess_tensor


def decode_jpegs(jpegs: Sequence[bytes], device: torch.device) -> list[torch.Tensor]:
    """uint8 [3, H, W] tensors, EXIF orientation applied, decoded on `device`."""
    data = [torch.frombuffer(bytearray(j), dtype=torch.uint8) for j in jpegs]
    decoded = tvio.decode_jpeg(data, mode=tvio.ImageReadMode.RGB, device=device, apply_exif_orientation=True)
    return list(decoded) if isinstance(decoded, list) else [decoded]


def preprocess_uint8(
    image: torch.Tensor, size: int, mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """[3, H, W] uint8 (a full-size JPEG decode; or [B, 3, H, W] of one size) → normalised float
    [3, size, size] (or [B, ...]), as the PIL path gives: decode_image(draft_size=size), then the
    bundle's eval transform."""
    return preprocess_tensor(image, size, mean, std, draft_size=size)


def decode_batch(
    jpegs: Sequence[bytes], size: int, mean: Sequence[float], std: Sequence[float], device: torch.device
) -> torch.Tensor:
    """Decode and preprocess a batch of JPEGs into one [B, 3, size, size] tensor on `device`.

    Images of the same size are preprocessed together, as one [n, 3, H, W] tensor: a catalogue's
    uploads come in a few sizes, and a batch of 256 then costs a few kernel launches per step
    instead of 256 (the lane thread holds the GIL for each, with the task threads waiting on it).
    """
    decoded = decode_jpegs(jpegs, device)
    by_size: dict[tuple[int, ...], list[int]] = {}
    for index, image in enumerate(decoded):
        by_size.setdefault(tuple(image.shape), []).append(index)
    if len(by_size) == 1:
        return preprocess_uint8(torch.stack(decoded), size, mean, std)
    out = torch.empty((len(decoded), 3, size, size), dtype=torch.float32, device=decoded[0].device)
    for indices in by_size.values():
        group = torch.stack([decoded[i] for i in indices])
        out[torch.tensor(indices, device=out.device)] = preprocess_uint8(group, size, mean, std)
    return out
