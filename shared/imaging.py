"""Safe image decoding, shared by worker and trainer so both see identical pixels.

Defences, in the order they run (each refusal is a specific dead-letter code):
1. size in bytes (`image_too_large`);
2. a format allowlist enforced before any decoder runs: JPEG (MPO included), PNG, WebP, GIF,
   BMP and TIFF are opened with `Image.open(formats=...)`, so no other Pillow plugin ever sees
   the bytes — EPS/PostScript (Ghostscript), PDF, PSD, SVG, HEIC/AVIF are named and refused
   from their first bytes (`image_format_not_allowed`);
3. pixels from the header, before any pixel is decoded (`image_too_many_pixels`);
4. frames, and frames × pixels, of animated images (`image_too_many_frames`);
5. decoding proper; anything broken or truncated is `undecodable_image`.

`decode_rgb` (the extraction worker's CPU path) decodes an upright JPEG with libjpeg-turbo through
simplejpeg instead of Pillow: the same library, DCT method, upsampling and draft scale, so the
same pixels bit for bit (tests/unit/test_imaging.py), for about 0.3 ms less CPU per 400 px image
and no PIL image in between. Anything else, and anything simplejpeg refuses, takes Pillow's path.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import simplejpeg
from PIL import Image, ImageOps, UnidentifiedImageError

from shelfsight.shared.errors import Rejected

ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
_OPENED_FORMATS = {*ALLOWED_FORMATS, "MPO"}  # a camera JPEG with a multi-picture index opens as MPO
ALLOWED_FORMATS_TEXT = "JPEG, PNG, WebP, GIF, BMP or TIFF"
DEFAULT_MAX_FRAMES = 100
ORIENTATION_TAG = 0x0112  # EXIF Orientation

# Formats named from their first bytes, only to say what was refused; none of their decoders runs.
_REFUSED_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"%!PS", "PostScript/EPS"),
    (b"\xc5\xd0\xd3\xc6", "EPS"),
    (b"%PDF", "PDF"),
    (b"8BPS", "Photoshop PSD"),
    (b"\x00\x00\x01\x00", "ICO"),
    (b"\x00\x00\x00\x0cjP  \r\n\x87\n", "JPEG 2000"),
    (b"\xffO\xffQ", "JPEG 2000"),
    (b"icns", "ICNS"),
    (b"DDS ", "DDS"),
    (b"qoif", "QOI"),
    (b"v/1\x01", "OpenEXR"),
    (b"#?RADIANCE", "Radiance HDR"),
    (b"\xff\n", "JPEG XL"),
    (b"\x00\x00\x00\x0cJXL ", "JPEG XL"),
)
_HEIF_BRANDS = {b"heic": "HEIC", b"heix": "HEIC", b"hevc": "HEIC", b"hevx": "HEIC", b"heim": "HEIC",
                b"heis": "HEIC", b"mif1": "HEIF", b"msf1": "HEIF", b"avif": "AVIF", b"avis": "AVIF"}


def sniff_refused_format(data: bytes) -> str | None:
    """The name of a known image format that is not allowed, from the first bytes; else None."""
    head = data[:64]
    for magic, name in _REFUSED_MAGIC:
        if head.startswith(magic):
            return name
    if head[4:8] == b"ftyp" and head[8:12] in _HEIF_BRANDS:
        return _HEIF_BRANDS[head[8:12]]
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if text.startswith(b"<") and (b"<svg" in data[:4096].lower()):
        return "SVG"
    return None


def _refuse_format(name: str) -> Rejected:
    return Rejected("image_format_not_allowed",
                    f"{name} is not an allowed image format; upload a {ALLOWED_FORMATS_TEXT} image")


def open_header(data: bytes, *, max_bytes: int, max_pixels: int,
                max_frames: int = DEFAULT_MAX_FRAMES) -> Image.Image:
    """Open `data` lazily (header only) and enforce every limit that needs no pixel decoded.

    Raises Rejected with image_too_large, image_format_not_allowed, image_too_many_pixels,
    image_too_many_frames or undecodable_image.
    """
    if len(data) > max_bytes:
        raise Rejected("image_too_large", f"image is {len(data)} bytes; the limit is {max_bytes}")
    refused = sniff_refused_format(data)
    if refused:
        raise _refuse_format(refused)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
            if image.format not in _OPENED_FORMATS:  # belt and braces: a plugin we did not ask for
                raise _refuse_format(str(image.format))
            width, height = image.size
            if width * height > max_pixels:
                raise Rejected(
                    "image_too_many_pixels",
                    f"image is {width}x{height} = {width * height} pixels; the limit is {max_pixels}",
                )
            frames = _frame_count(image, max_frames)
            if frames > max_frames or frames * width * height > max_pixels:
                raise Rejected(
                    "image_too_many_frames",
                    f"image has {'more than ' + str(max_frames) if frames > max_frames else frames} frames "
                    f"of {width}x{height}; the limits are {max_frames} frames and {max_pixels} pixels "
                    "over all frames",
                )
            return image
    except Rejected:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise Rejected(
            "image_too_many_pixels", f"decompression bomb refused: {exc}; the limit is {max_pixels} pixels"
        ) from exc
    except UnidentifiedImageError:
        raise Rejected("undecodable_image", f"not a {ALLOWED_FORMATS_TEXT} image (or truncated)") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, KeyError, TypeError) as exc:
        raise Rejected("undecodable_image", f"cannot read image header: {type(exc).__name__}: {exc}") from exc


def _frame_count(image: Image.Image, limit: int) -> int:
    """Frames of the image, counting at most limit + 1 (a GIF or TIFF is walked, never decoded)."""
    if not getattr(image, "is_animated", False):
        return 1
    if image.format in ("WEBP", "PNG", "MPO"):  # the frame count is in the header
        return int(getattr(image, "n_frames", 1))
    count = 1
    try:
        while count <= limit:
            image.seek(count)
            count += 1
    except EOFError:
        pass
    image.seek(0)
    return count


def decode_image(data: bytes, *, max_bytes: int, max_pixels: int, draft_size: int | None = None,
                 max_frames: int = DEFAULT_MAX_FRAMES) -> Image.Image:
    """Decode bytes to an RGB PIL image, upright per EXIF, within byte, pixel and frame limits.

    Every limit is checked from the header, before any pixel is decoded, so a decompression
    bomb costs nothing (see `open_header`). Animated images yield their first frame.
    `draft_size` lets JPEG decode straight to a reduced scale (DCT-domain downscale), no
    smaller than draft_size on the short side.
    """
    return _decode_opened(open_header(data, max_bytes=max_bytes, max_pixels=max_pixels, max_frames=max_frames),
                          draft_size, max_pixels)


def decode_rgb(data: bytes, header: Image.Image, *, max_pixels: int, draft_size: int | None = None) -> np.ndarray:
    """What `decode_image` decodes, as an H x W x 3 uint8 array, from `header`: `open_header(data)`,
    every limit already checked (it is consumed: the caller closes it).

    An upright JPEG in YCbCr or greyscale (the common upload) is decoded by simplejpeg at the draft
    scale `decode_image` would use; everything else (PNG, WebP, a rotated or CMYK JPEG, MPO), and a
    JPEG simplejpeg refuses (truncated, corrupt: Pillow then says why), is decoded by Pillow.
    """
    if header.format == "JPEG" and header.mode in ("RGB", "L") and exif_orientation(header) == 1:
        width, height = header.size
        factor = jpeg_draft_factor(width, height, draft_size)
        expected = (-(-height // factor), -(-width // factor))
        try:  # min sizes pick the same DCT scale (1/factor) as Pillow's draft; fastdct=False is its ISLOW
            pixels = simplejpeg.decode_jpeg(data, colorspace="RGB", fastdct=False, fastupsample=False,
                                            min_height=expected[0], min_width=expected[1])
        except ValueError:
            pixels = None
        if pixels is not None and pixels.shape[:2] == expected:
            return pixels
    return np.array(_decode_opened(header, draft_size, max_pixels))  # writable (np.asarray's is not)


def upright_size(header: Image.Image) -> tuple[int, int]:
    """(width, height) of the image as shown: the stored size, swapped when EXIF says it is turned
    a quarter (orientations 5 to 8). Full size, whatever scale the decode used."""
    width, height = header.size
    return (height, width) if exif_orientation(header) >= 5 else (width, height)


def jpeg_draft_factor(width: int, height: int, draft_size: int | None) -> int:
    """The power-of-two DCT scale (1, 2, 4 or 8) at which `decode_image` has Pillow decode a JPEG of
    this size with `draft_size` (Pillow's JpegImageFile.draft, as `_decode_opened` calls it)."""
    if not draft_size:
        return 1
    scale = min(width, height) / draft_size
    if scale < 2:
        return 1
    requested = (max(1, int(width / scale)), max(1, int(height / scale)))
    ratio = min(width // requested[0], height // requested[1])
    return next(f for f in (8, 4, 2, 1) if ratio >= f)


def _decode_opened(image: Image.Image, draft_size: int | None, max_pixels: int) -> Image.Image:
    """Decode an image opened by `open_header` (limits checked) to upright RGB."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            width, height = image.size
            if draft_size and image.format in ("JPEG", "MPO"):
                scale = min(width, height) / draft_size
                if scale >= 2:
                    image.draft("RGB", (max(1, int(width / scale)), max(1, int(height / scale))))
            image.load()
            upright = _upright(image)
            return upright if upright.mode == "RGB" else _to_rgb(upright)
    except Rejected:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise Rejected(
            "image_too_many_pixels", f"decompression bomb refused: {exc}; the limit is {max_pixels} pixels"
        ) from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, IndexError, KeyError,
            TypeError, ZeroDivisionError) as exc:
        raise Rejected("undecodable_image", f"cannot decode image: {type(exc).__name__}: {exc}") from exc


def exif_orientation(image: Image.Image) -> int:
    """The EXIF orientation tag (1 = upright, 2-8 = mirrored and/or rotated), read from the header
    alone; 1 when there is none or the EXIF block is broken (as `_upright` then leaves it)."""
    try:
        value = image.getexif().get(ORIENTATION_TAG, 1)
    except Exception:  # noqa: BLE001 - corrupt EXIF
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _upright(image: Image.Image) -> Image.Image:
    """Rotated per its EXIF orientation; a broken EXIF block leaves the image as stored. An
    upright image is returned as it is (exif_transpose would copy every pixel of it)."""
    if exif_orientation(image) == 1:
        return image
    try:
        return ImageOps.exif_transpose(image) or image
    except Exception:  # noqa: BLE001 - corrupt EXIF is not worth losing the image over
        return image


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any mode to RGB; transparency is composited on white, as product photos expect."""
    if image.mode.startswith("I") or image.mode == "F":
        image = _to_8bit(image)
    has_alpha = image.mode in {"RGBA", "LA", "PA", "RGBa", "La"}
    if has_alpha or (image.mode in {"P", "L", "RGB"} and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")


def _to_8bit(image: Image.Image) -> Image.Image:
    """16-bit and 32-bit greyscale to 8 bits (Pillow's own conversion clips them to white)."""
    wide = image.convert("F")
    if image.mode.startswith("I;16"):
        return wide.point(lambda v: v / 257.0).convert("L")
    extrema = wide.getextrema()  # (min, max) for a single-band image
    low, high = float(extrema[0]), float(extrema[1])  # type: ignore[arg-type]
    if image.mode == "F" and low >= 0.0 and high <= 1.0:
        return wide.point(lambda v: v * 255.0).convert("L")
    if low >= 0.0 and high <= 255.0:
        return wide.convert("L")
    span = (high - low) or 1.0
    return wide.point(lambda v: (v - low) * 255.0 / span).convert("L")
