"""Train/serve parity of pixels: the GPU decode path (on CPU, and with nvJPEG where CUDA is) against
the PIL path, on real photos, and one framing (letterbox) for training, evaluation and serving."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from matplotlib import cbook
from PIL import Image

from shelfsight.shared import framing
from shelfsight.shared.imaging import decode_image
from shelfsight.shared.model_factory import create_clip
from shelfsight.worker.gpu_decode import decode_batch

LIMITS = {"max_bytes": 1 << 26, "max_pixels": 1 << 28}


def _photo(name: str) -> Image.Image:
    with Image.open(cbook.get_sample_data(name, asfileobj=False)) as image:  # matplotlib's bundled photos
        return image.convert("RGB")


def _jpeg(image: Image.Image, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def photos() -> dict[str, bytes]:
    """Real photos as product uploads come: the original JPEG, re-encoded at shop sizes and shapes."""
    hopper = _photo("grace_hopper.jpg")  # 512 x 600 portrait photo
    pack = _photo("Minduka_Present_Blue_Pack.png")  # a product shot
    with open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False), "rb") as handle:
        original = handle.read()
    return {
        "original 512x600": original,
        "square 800": _jpeg(hopper.resize((800, 800), Image.BICUBIC)),
        "4:3 1200x900": _jpeg(hopper.resize((1200, 900), Image.BICUBIC)),
        "portrait 3000x4000": _jpeg(hopper.resize((3000, 4000), Image.BICUBIC)),
        "wide 1001x333": _jpeg(hopper.resize((1001, 333), Image.BICUBIC)),
        "product 640": _jpeg(pack.resize((640, 640), Image.BICUBIC)),
    }


# "cuda" runs nvJPEG itself: on a GPU machine (bench/gpu_check.sh runs this file there)
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_gpu_decode_path_matches_the_pil_path_in_pixels_and_features(photos: dict[str, bytes], device: str) -> None:
    # real ImageNet weights in the image tower: features that mean something
    bundle = create_clip("shelfsight-effnet-lite0", "imagenet-tower")
    std = torch.tensor(bundle.std).view(3, 1, 1)
    for name, data in photos.items():
        pil = bundle.preprocess(decode_image(data, draft_size=bundle.image_size, **LIMITS))  # CPU serving, training
        gpu = decode_batch([data], bundle.image_size, bundle.mean, bundle.std, torch.device(device))[0].cpu()
        assert gpu.shape == pil.shape == (3, bundle.image_size, bundle.image_size)
        difference = ((pil - gpu) * std).abs() * 255  # in 8-bit pixel levels
        assert float(difference.mean()) < 1.0, (name, float(difference.mean()))
        assert float(difference.max()) < 24.0, (name, float(difference.max()))
        with torch.no_grad():
            features = bundle.model.encode_image(torch.stack([pil, gpu]))
        cosine = float(torch.nn.functional.cosine_similarity(features[:1], features[1:]))
        assert cosine > 0.999, (name, cosine)


def test_draft_factor_is_the_one_pil_decodes_at(photos: dict[str, bytes]) -> None:
    for data in photos.values():
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            full = image.size
            scale = min(width, height) / 224
            if scale >= 2:
                image.draft("RGB", (max(1, int(width / scale)), max(1, int(height / scale))))
            factor = framing.jpeg_draft_factor(width, height, 224)
            assert image.size == (-(-full[0] // factor), -(-full[1] // factor))


def _two_ended(width: int = 300, height: int = 100) -> Image.Image:
    """A wide product: red at the left end, blue at the right end, grey between."""
    image = Image.new("RGB", (width, height), (128, 128, 128))
    image.paste((255, 0, 0), (0, 0, 30, height))
    image.paste((0, 0, 255), (width - 30, 0, width, height))
    return image


def test_one_framing_letterbox_keeps_both_ends_of_a_wide_photo_in_training_and_serving() -> None:
    bundle = create_clip("shelfsight-tiny", "none")
    mean = torch.tensor(bundle.mean).view(3, 1, 1)
    std = torch.tensor(bundle.std).view(3, 1, 1)
    image = _two_ended()
    for transform in (bundle.preprocess, bundle.preprocess_train,
                      framing.train_transform(bundle.image_size, bundle.mean, bundle.std, 0.9, flip=False)):
        torch.manual_seed(0)
        pixels = transform(image) * std + mean
        red = (pixels[0] > 0.8) & (pixels[2] < 0.2)
        blue = (pixels[2] > 0.8) & (pixels[0] < 0.2)
        white = (pixels > 0.95).all(dim=0)
        assert bool(red.any()) and bool(blue.any()), transform  # a centre crop cuts both ends off
        assert bool(white.any()), transform  # the letterbox padding
    # the tensor path frames the same way
    tensor = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)
    served = framing.preprocess_tensor(tensor, bundle.image_size, bundle.mean, bundle.std)
    assert torch.allclose(served, bundle.preprocess(image), atol=2 / 255 / min(bundle.std))


@pytest.mark.parametrize("device", DEVICES)
def test_a_batch_is_preprocessed_by_size_group_exactly_as_image_by_image(photos: dict[str, bytes], device: str) -> None:
    """decode_batch preprocesses same-size images as one tensor: the pixels must be those of one
    image at a time, in the batch's order, for a batch of one size and a batch of mixed sizes."""
    from shelfsight.worker.gpu_decode import decode_jpegs, preprocess_uint8

    mean, std = (0.48, 0.46, 0.41), (0.27, 0.26, 0.28)
    mixed = list(photos.values())
    mixed = [mixed[1], mixed[2], mixed[1], mixed[4], mixed[2], mixed[0]]  # sizes repeat, interleaved
    for jpegs in (mixed, [mixed[1]] * 3):
        alone = torch.stack([preprocess_uint8(image, 64, mean, std) for image in decode_jpegs(jpegs, torch.device(device))])
        batched = decode_batch(jpegs, 64, mean, std, torch.device(device))
        assert batched.shape == (len(jpegs), 3, 64, 64)
        assert torch.allclose(batched, alone, atol=1e-5), float((batched - alone).abs().max())
