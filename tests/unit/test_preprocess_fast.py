"""The worker's CPU preprocessing (framing.preprocess_pil: torch's uint8 resize) computes what the
trainer's eval_transform (PIL's resize) computes, on real photos, in pixels and in features."""

from __future__ import annotations

import io

import pytest
import torch
from matplotlib import cbook
from PIL import Image

from shelfsight.shared import framing
from shelfsight.shared.imaging import decode_image
from shelfsight.shared.model_factory import create_clip

LIMITS = {"max_bytes": 1 << 26, "max_pixels": 1 << 28}


def _jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def photos() -> dict[str, Image.Image]:
    with Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)) as image:
        hopper = image.convert("RGB")
    shapes = {"400 square": (400, 400), "512x600": (512, 600), "wide 1001x333": (1001, 333), "small 150": (150, 150)}
    out = {}
    for name, size in shapes.items():  # decoded as the worker decodes uploads (draft included)
        out[name] = decode_image(_jpeg(hopper.resize(size, Image.BICUBIC)), draft_size=224, **LIMITS)
    out["grey L"] = hopper.convert("L").resize((300, 200))
    return out


def test_preprocess_pil_matches_eval_transform_in_pixels_and_features(photos: dict[str, Image.Image]) -> None:
    bundle = create_clip("shelfsight-effnet-lite0", "imagenet-tower")  # real weights: meaningful features
    std = torch.tensor(bundle.std).view(3, 1, 1)
    fast = [framing.preprocess_pil(image, bundle.image_size, bundle.mean, bundle.std) for image in photos.values()]
    slow = [bundle.preprocess(image) for image in photos.values()]
    for name, f, s in zip(photos, fast, slow, strict=True):
        assert f.shape == s.shape == (3, bundle.image_size, bundle.image_size), name
        levels = ((f - s) * std).abs() * 255
        assert float(levels.max()) <= 1.01, (name, float(levels.max()))  # one 8-bit level at most
        assert float(levels.mean()) < 0.05, (name, float(levels.mean()))
    with torch.no_grad():
        cosine = torch.nn.functional.cosine_similarity(bundle.model.encode_image(torch.stack(fast)),
                                                       bundle.model.encode_image(torch.stack(slow)))
    assert float(cosine.min()) > 0.9999


def test_preprocessing_threads_run_torch_alone_and_leave_the_rest_alone() -> None:
    import threading

    from shelfsight.shared.torch_threads import _openmp, one_intra_op_thread

    if _openmp() is None:
        pytest.skip("torch without an OpenMP runtime: nothing to set")
    original = torch.get_num_threads()
    torch.set_num_threads(2)  # the tests run with one thread by default
    seen: dict[str, int] = {}

    def task_thread() -> None:
        seen["before"] = torch.get_num_threads()
        with one_intra_op_thread():
            seen["inside"] = torch.get_num_threads()
            framing.preprocess_pil(Image.new("RGB", (300, 200)), 64, (0.5,) * 3, (0.5,) * 3)
        seen["after"] = torch.get_num_threads()

    try:
        thread = threading.Thread(target=task_thread)
        thread.start()
        thread.join()
        assert seen == {"before": 2, "inside": 1, "after": 2}
        assert torch.get_num_threads() == 2  # this thread (a batcher lane, say) keeps its team
    finally:
        torch.set_num_threads(original)


def test_the_scripted_worker_preprocess_is_the_tensor_path_bit_for_bit(photos: dict[str, Image.Image]) -> None:
    """preprocess_array runs `letterbox_resize_normalise_hwc` as one TorchScript call; it must give
    exactly `preprocess_tensor`'s pixels (the GPU batch path and the parity tests use that one), for
    square, tall, wide and small images, on every call (TorchScript re-optimises after its first runs),
    and so must the same function run eagerly (the fallback)."""
    import numpy as np

    framing._hwc_preprocessor.cache_clear()
    framing._scripted_or_eager.cache_clear()
    framing.warm_up_preprocessing()  # what the worker runs at start
    assert framing._scripted_or_eager.cache_info().misses == 1  # scripted once
    assert framing._hwc_preprocessor() is not framing.letterbox_resize_normalise_hwc  # this torch scripts it
    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    for name, image in photos.items():
        rgb = np.array(image.convert("RGB"))
        expected = framing.preprocess_tensor(torch.from_numpy(rgb).permute(2, 0, 1), 224, mean, std)
        for _ in range(4):
            got = framing.preprocess_array(rgb, 224, mean, std)
            assert got.is_contiguous() and got.dtype == torch.float32, name
            assert torch.equal(got, expected), (name, float((got - expected).abs().max()))
        scaled = framing._normalizer(mean, std, torch.device("cpu"))  # the eager fallback, where torch cannot script
        assert torch.equal(framing.letterbox_resize_normalise_hwc(torch.from_numpy(rgb), 224, *scaled), expected), name


def test_threads_asking_for_the_preprocessor_at_once_script_it_once() -> None:
    import threading

    framing._hwc_preprocessor.cache_clear()
    framing._scripted_or_eager.cache_clear()
    start = threading.Barrier(8)
    got: list[object] = []

    def ask() -> None:
        start.wait()
        got.append(framing._hwc_preprocessor())

    threads = [threading.Thread(target=ask) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert framing._scripted_or_eager.cache_info().misses == 1
    assert len(got) == 8 and all(g is got[0] for g in got)
