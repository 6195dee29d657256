"""Safe decoding: limits before pixels, EXIF orientation, any mode to RGB."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from shelfsight.shared.errors import Rejected
from shelfsight.shared.imaging import decode_image

LIMITS = {"max_bytes": 5_000_000, "max_pixels": 4_000_000}


def _jpeg(image: Image.Image, **save) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", **save)
    return buffer.getvalue()


def test_exif_orientation_is_applied() -> None:
    # a 60x20 landscape image tagged "rotate 90 CW" (orientation 6) is shown as 20x60 portrait
    image = Image.new("RGB", (60, 20), (255, 0, 0))
    image.paste((0, 0, 255), (0, 0, 10, 20))  # blue band on the left edge
    exif = Image.Exif()
    exif[0x0112] = 6
    decoded = decode_image(_jpeg(image, exif=exif.tobytes(), quality=95), **LIMITS)
    assert decoded.size == (20, 60)
    top_middle = decoded.getpixel((10, 2))
    assert top_middle[2] > 200 and top_middle[0] < 60  # the left band is now on top


@pytest.mark.parametrize("mode", ["L", "CMYK", "RGBA", "P", "I;16", "1"])
def test_any_mode_becomes_rgb(mode: str) -> None:
    buffer = io.BytesIO()
    Image.new(mode, (16, 12)).save(buffer, format="TIFF" if mode in {"CMYK", "I;16"} else "PNG")
    decoded = decode_image(buffer.getvalue(), **LIMITS)
    assert decoded.mode == "RGB" and decoded.size == (16, 12)


def test_transparent_pixels_become_white() -> None:
    buffer = io.BytesIO()
    Image.new("RGBA", (4, 4), (255, 0, 0, 0)).save(buffer, format="PNG")
    assert decode_image(buffer.getvalue(), **LIMITS).getpixel((1, 1)) == (255, 255, 255)


def test_pixel_limit_is_checked_before_decoding() -> None:
    # 7000x7000 PNG of one colour: a tiny file, 49 MP when decoded
    buffer = io.BytesIO()
    Image.new("L", (7_000, 7_000)).save(buffer, format="PNG", optimize=True)
    assert len(buffer.getvalue()) < 1_000_000
    with pytest.raises(Rejected) as caught:
        decode_image(buffer.getvalue(), **LIMITS)
    assert caught.value.code == "image_too_many_pixels" and "7000x7000" in str(caught.value)
    # past PIL's own bomb guard (> 2 x 89 MP) the same code comes back
    huge = io.BytesIO()
    Image.new("1", (14_000, 14_000)).save(huge, format="PNG", optimize=True)
    with pytest.raises(Rejected) as bomb:
        decode_image(huge.getvalue(), **LIMITS)
    assert bomb.value.code == "image_too_many_pixels" and str(LIMITS["max_pixels"]) in str(bomb.value)


def test_byte_limit_and_garbage() -> None:
    data = _jpeg(Image.new("RGB", (50, 50)))
    with pytest.raises(Rejected) as too_big:
        decode_image(data, max_bytes=len(data) - 1, max_pixels=10**6)
    assert too_big.value.code == "image_too_large"
    for garbage in (b"", b"GIF89a\x00\x00", data[: len(data) // 3]):
        with pytest.raises(Rejected) as bad:
            decode_image(garbage, **LIMITS)
        assert bad.value.code == "undecodable_image"


def test_draft_mode_decodes_large_jpeg_at_reduced_scale() -> None:
    data = _jpeg(Image.new("RGB", (1600, 1200), (10, 200, 10)))
    full = decode_image(data, **LIMITS)
    drafted = decode_image(data, **LIMITS, draft_size=224)
    assert full.size == (1600, 1200)
    assert 224 <= min(drafted.size) < 600  # DCT-domain downscale, never below the model size


def _photo_like(width: int, height: int, seed: int = 0) -> Image.Image:
    """Smooth gradients and texture plus noise: every DCT coefficient and chroma plane in play."""
    import numpy as np

    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([(np.sin(xx / 37) + np.cos(yy / 23)) * 60 + 128, xx % 255, yy * 7 % 255], -1)
    noise = np.random.default_rng(seed).integers(0, 30, base.shape)
    return Image.fromarray((base + noise).clip(0, 255).astype("uint8"))


@pytest.mark.parametrize("size", [(400, 400), (300, 500), (450, 449), (600, 600), (1000, 700), (1700, 1300),
                                  (3000, 2000)])
@pytest.mark.parametrize("variant", ["444", "420", "grey", "progressive"])
def test_decode_rgb_gives_decode_images_pixels_bit_for_bit(size: tuple[int, int], variant: str) -> None:
    """The worker's JPEG path (simplejpeg) against Pillow's, at every draft scale (1, 1/2, 1/4, 1/8)."""
    import numpy as np

    from shelfsight.shared.imaging import decode_rgb, open_header

    image = _photo_like(*size)
    data = _jpeg(image.convert("L") if variant == "grey" else image, quality=90,
                 subsampling=0 if variant == "444" else 2, progressive=variant == "progressive")
    limits = {"max_bytes": 50_000_000, "max_pixels": 50_000_000}
    expected = np.asarray(decode_image(data, draft_size=224, **limits))
    with open_header(data, **limits) as header:
        got = decode_rgb(data, header, max_pixels=limits["max_pixels"], draft_size=224)
    assert got.dtype == np.uint8 and got.shape == expected.shape
    assert np.array_equal(got, expected)


def test_decode_rgb_takes_pillows_path_for_what_simplejpeg_must_not_decode(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rotated (EXIF) and CMYK JPEGs, PNGs, and a truncated JPEG go to Pillow: upright, RGB, and
    the same refusal for a broken file."""
    import numpy as np

    from shelfsight.shared import imaging

    fast_calls: list[int] = []
    real = imaging.simplejpeg.decode_jpeg
    monkeypatch.setattr(imaging.simplejpeg, "decode_jpeg", lambda *a, **k: fast_calls.append(1) or real(*a, **k))

    def rgb(data: bytes) -> np.ndarray:
        with imaging.open_header(data, **LIMITS) as header:
            return imaging.decode_rgb(data, header, max_pixels=LIMITS["max_pixels"], draft_size=224)

    exif = Image.Exif()
    exif[0x0112] = 6
    assert rgb(_jpeg(Image.new("RGB", (60, 20), (255, 0, 0)), exif=exif.tobytes())).shape == (60, 20, 3)
    assert rgb(_jpeg(Image.new("CMYK", (30, 20), (0, 255, 255, 0)))).shape == (20, 30, 3)
    png = io.BytesIO()
    Image.new("RGBA", (30, 20), (0, 0, 0, 0)).save(png, format="PNG")
    assert (rgb(png.getvalue()) == 255).all()  # transparent on white
    assert fast_calls == []
    plain = _jpeg(_photo_like(400, 300))
    assert rgb(plain).shape == (300, 400, 3) and fast_calls == [1]
    with pytest.raises(Rejected) as broken:
        rgb(plain[: len(plain) // 2])  # simplejpeg refuses it; Pillow says why
    assert broken.value.code == "undecodable_image" and len(fast_calls) == 2


def test_decode_rgb_arrays_are_writable_on_both_paths() -> None:
    """torch.from_numpy warns on (and must never write through) a read-only array."""
    from shelfsight.shared.imaging import decode_rgb, open_header

    png = io.BytesIO()
    Image.new("RGB", (30, 20), (1, 2, 3)).save(png, format="PNG")
    for data in (_jpeg(_photo_like(64, 48)), png.getvalue()):
        with open_header(data, **LIMITS) as header:
            assert decode_rgb(data, header, max_pixels=LIMITS["max_pixels"], draft_size=224).flags.writeable


def _exif(**tags: int) -> bytes:
    exif = Image.Exif()
    for tag, value in tags.items():
        exif[int(tag[1:], 16)] = value  # t0112=6 -> tag 0x0112
    return exif.tobytes()


def _big_endian_exif(orientation: int) -> bytes:
    """A Motorola-order ("MM") EXIF block with one IFD entry, as many cameras write it."""
    import struct

    ifd = struct.pack(">H", 1) + struct.pack(">HHI", 0x0112, 3, 1) + struct.pack(">HH", orientation, 0) + b"\0\0\0\0"
    return b"Exif\x00\x00MM\x00*" + struct.pack(">I", 8) + ifd


def _jpeg_corpus() -> dict[str, bytes]:
    photo = _photo_like(120, 90)
    second = io.BytesIO()
    photo.save(second, format="MPO", save_all=True, append_images=[photo.rotate(90)])
    software = Image.Exif()
    software[0x0131] = "shelfsight tests"  # an EXIF block with no orientation tag
    corpus = {
        "420": _jpeg(photo), "444": _jpeg(photo, subsampling=0), "grey": _jpeg(photo.convert("L")),
        "progressive": _jpeg(photo, progressive=True), "exif-no-orientation": _jpeg(photo, exif=software.tobytes()),
        "cmyk": _jpeg(photo.convert("CMYK")), "mpo": second.getvalue(),
        "xmp": _jpeg(photo, xmp=b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><tiff:Orientation>6</tiff:Orientation></x:xmpmeta>'),
        "comment": _jpeg(photo, comment=b"shot on a phone"),
        "broken-exif": _jpeg(photo, exif=b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\xff\xff\xde\xad"),
        "big-endian-6": _jpeg(photo, exif=_big_endian_exif(6)),
        "cut-before-frame-header": _jpeg(photo)[:120],
        "cut-after-frame-header": _jpeg(photo)[:400],
    }
    for orientation in range(1, 9):
        corpus[f"orientation-{orientation}"] = _jpeg(photo, exif=_exif(t0112=orientation))
    return corpus


@pytest.mark.parametrize("name", sorted(_jpeg_corpus()))
def test_the_jpeg_header_reader_agrees_with_pillow_or_leaves_it_to_pillow(name: str) -> None:
    """Size, mode and EXIF orientation as Pillow reads them, for every JPEG the reader answers for."""
    from shelfsight.shared.imaging import exif_orientation, read_jpeg_header

    data = _jpeg_corpus()[name]
    fast = read_jpeg_header(data)
    answers = {"420", "444", "grey", "progressive", "exif-no-orientation", "comment", "big-endian-6",
               *(f"orientation-{o}" for o in range(1, 9))}
    assert (fast is not None) is (name in answers)  # XMP, CMYK, MPO, a broken EXIF block, cut files: Pillow's
    if fast is None:
        return
    with Image.open(io.BytesIO(data)) as image:
        assert (fast.size, fast.mode, fast.format) == (image.size, image.mode, image.format)
        assert fast.orientation == exif_orientation(image)


def test_open_header_reads_plain_jpegs_itself_and_keeps_every_limit() -> None:
    """The reader's header goes through the same pixel limit, and a rotated JPEG is still turned
    upright (by Pillow, which decode_rgb opens for it)."""
    import struct

    import numpy as np

    from shelfsight.shared.imaging import JpegHeader, decode_rgb, open_header

    plain = _jpeg(_photo_like(120, 90))
    with open_header(plain, **LIMITS) as header:
        assert isinstance(header, JpegHeader) and header.size == (120, 90)
    claiming = bytearray(plain)
    sof = claiming.index(b"\xff\xc0")
    claiming[sof + 5:sof + 9] = struct.pack(">HH", 40_000, 40_000)
    with pytest.raises(Rejected) as refused:
        open_header(bytes(claiming), **LIMITS)
    assert refused.value.code == "image_too_many_pixels"
    with pytest.raises(Rejected) as too_big:
        open_header(plain, max_bytes=len(plain) - 1, max_pixels=LIMITS["max_pixels"])
    assert too_big.value.code == "image_too_large"
    rotated = _jpeg(Image.new("RGB", (60, 20), (255, 0, 0)), exif=_exif(t0112=6))
    with open_header(rotated, **LIMITS) as header:
        assert isinstance(header, JpegHeader) and header.orientation == 6
        pixels = decode_rgb(rotated, header, max_pixels=LIMITS["max_pixels"], draft_size=224)
    assert pixels.shape == (60, 20, 3) and np.array_equal(pixels, np.asarray(decode_image(rotated, **LIMITS)))


def test_a_header_of_endless_segments_is_left_to_pillow() -> None:
    """A hostile file can hold millions of tiny segments before its frame header: the reader stops
    after a bounded number and Pillow judges the file, as it did before the reader existed."""
    from shelfsight.shared.imaging import read_jpeg_header

    plain = _jpeg(_photo_like(40, 30))
    padded = plain[:2] + b"\xff\xfe\x00\x02" * 300 + plain[2:]  # 300 empty comments after SOI
    assert read_jpeg_header(plain) is not None
    assert read_jpeg_header(padded) is None
    assert read_jpeg_header(plain[:2] + b"\xff" * 100_000 + plain[2:]) is None  # fill bytes, bounded too
