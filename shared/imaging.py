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

`open_header` reads the markers of a plain JPEG itself (`JpegHeader`: size, components, EXIF
orientation) instead of having Pillow open it: about 10 µs against 50. Plain means an 8-bit
baseline, extended or progressive JPEG of 1 or 3 components with no multi-picture index (MPO), no
XMP and at most a clean EXIF block; for anything else, and at the first irregular byte, it gives up
and Pillow opens the image as before, so Pillow stays the judge of every odd file.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from typing import Literal

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


@dataclass(frozen=True)
class JpegHeader:
    """What `open_header` gives for a plain JPEG: the attributes of a lazily opened PIL image that the
    worker reads (size, mode, format), its EXIF orientation, and the same context manager."""

    size: tuple[int, int]  # (width, height) as stored
    mode: str  # "L" (1 component) or "RGB" (3), as Pillow names them
    orientation: int  # EXIF orientation, 1 to 8 (1 when there is no EXIF block or no such tag)
    format: str = "JPEG"

    def __enter__(self) -> JpegHeader:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def close(self) -> None:
        return None


ImageHeader = Image.Image | JpegHeader  # what open_header returns
_PLAIN_SOF = (0xC0, 0xC1, 0xC2)  # baseline, extended sequential, progressive (Huffman)
_MAX_EXIF_ENTRIES = 512
_MAX_MARKERS = 256  # a real header has a dozen; past this, Pillow judges the file (as before this reader)


def read_jpeg_header(data: bytes) -> JpegHeader | None:
    """The header of a plain JPEG (see the module docstring), read from its markers up to the first
    scan, as Pillow reads them; None for anything else, or anything irregular, which Pillow then opens
    and judges."""
    if data[:3] != b"\xff\xd8\xff":
        return None
    pos, end, orientation, exif_seen = 2, len(data), 1, False
    frame: tuple[int, int, int] | None = None  # width, height, components
    for _ in range(_MAX_MARKERS):
        if pos + 4 > end or data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
            continue
        if marker in (0x00, 0x01, 0xD8, 0xD9) or 0xD0 <= marker <= 0xD7:
            return None  # a marker out of place
        length = int.from_bytes(data[pos + 2:pos + 4], "big")
        if length < 2 or pos + 2 + length > end:
            return None
        if marker == 0xDA:  # the first scan: the header is complete
            if frame is None:
                return None
            return JpegHeader((frame[0], frame[1]), "L" if frame[2] == 1 else "RGB", orientation)
        if marker in (0xC4, 0xDB, 0xE0, 0xDD, 0xFE):  # Huffman and quantisation tables, JFIF, restarts, comment
            pos += 2 + length
            continue
        body = data[pos + 4:pos + 2 + length]
        if marker == 0xE1:  # APP1: EXIF (the first one counts, as in Pillow), XMP or unknown
            if not body.startswith(b"Exif\x00\x00"):
                return None  # Pillow also takes the orientation from XMP
            if not exif_seen:
                exif_seen = True
                found = _tiff_orientation(body[6:])
                if found is None:
                    return None
                orientation = found
        elif marker == 0xE2 and body.startswith(b"MPF"):
            return None  # a multi-picture index: Pillow opens it as MPO
        elif 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # a frame header (SOFn)
            if frame is not None or marker not in _PLAIN_SOF or len(body) < 6:
                return None
            height, width, components = int.from_bytes(body[1:3], "big"), int.from_bytes(body[3:5], "big"), body[5]
            if body[0] != 8 or components not in (1, 3) or not width or not height or len(body) != 6 + 3 * components:
                return None
            frame = (width, height, components)
        pos += 2 + length
    return None


def _tiff_orientation(tiff: bytes) -> int | None:
    """The orientation tag of an EXIF block's first IFD: 1 when absent, None when the block is not
    one this reader is sure of (Pillow then reads it)."""
    order: Literal["little", "big"]
    if tiff[:2] == b"II":
        order = "little"
    elif tiff[:2] == b"MM":
        order = "big"
    else:
        return None
    if len(tiff) < 8 or int.from_bytes(tiff[2:4], order) != 42:
        return None
    ifd = int.from_bytes(tiff[4:8], order)
    if ifd < 8 or ifd + 2 > len(tiff):
        return None
    count = int.from_bytes(tiff[ifd:ifd + 2], order)
    if count > _MAX_EXIF_ENTRIES or ifd + 2 + 12 * count > len(tiff):
        return None
    values = []
    for entry in range(ifd + 2, ifd + 2 + 12 * count, 12):
        if int.from_bytes(tiff[entry:entry + 2], order) == ORIENTATION_TAG:
            kind, number = int.from_bytes(tiff[entry + 2:entry + 4], order), int.from_bytes(tiff[entry + 4:entry + 8], order)
            if kind != 3 or number != 1:  # one SHORT, as the standard says
                return None
            values.append(int.from_bytes(tiff[entry + 8:entry + 10], order))
    if not values:
        return 1
    return values[0] if len(values) == 1 and 1 <= values[0] <= 8 else None


def open_header(data: bytes, *, max_bytes: int, max_pixels: int,
                max_frames: int = DEFAULT_MAX_FRAMES) -> ImageHeader:
    """Read `data`'s header (no pixel decoded) and enforce every limit that needs no pixel decoded:
    a plain JPEG's from its markers (`read_jpeg_header`), anything else's by opening it lazily with
    Pillow.

    Raises Rejected with image_too_large, image_format_not_allowed, image_too_many_pixels,
    image_too_many_frames or undecodable_image.
    """
    _check_bytes(data, max_bytes)
    jpeg = read_jpeg_header(data)
    if jpeg is not None:
        width, height = jpeg.size
        if width * height > max_pixels:
            raise _too_many_pixels(width, height, max_pixels)
        return jpeg
    return _open_with_pillow(data, max_pixels=max_pixels, max_frames=max_frames)


def _check_bytes(data: bytes, max_bytes: int) -> None:
    if len(data) > max_bytes:
        raise Rejected("image_too_large", f"image is {len(data)} bytes; the limit is {max_bytes}")


def _too_many_pixels(width: int, height: int, max_pixels: int) -> Rejected:
    return Rejected("image_too_many_pixels",
                    f"image is {width}x{height} = {width * height} pixels; the limit is {max_pixels}")


def _open_with_pillow(data: bytes, *, max_pixels: int, max_frames: int = DEFAULT_MAX_FRAMES) -> Image.Image:
    """`open_header` by Pillow: the image opened lazily, every limit but the byte size checked (the
    callers check that first)."""
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
                raise _too_many_pixels(width, height, max_pixels)
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
    _check_bytes(data, max_bytes)
    return _decode_opened(_open_with_pillow(data, max_pixels=max_pixels, max_frames=max_frames), draft_size, max_pixels)


def decode_rgb(data: bytes, header: ImageHeader, *, max_pixels: int, draft_size: int | None = None) -> np.ndarray:
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
    if isinstance(header, JpegHeader):  # rotated, or refused by simplejpeg: Pillow opens it (and says why)
        with _open_with_pillow(data, max_pixels=max_pixels) as image:
            return np.array(_decode_opened(image, draft_size, max_pixels))
    return np.array(_decode_opened(header, draft_size, max_pixels))  # writable (np.asarray's is not)


def upright_size(header: ImageHeader) -> tuple[int, int]:
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


def exif_orientation(image: ImageHeader) -> int:
    """The EXIF orientation tag (1 = upright, 2-8 = mirrored and/or rotated), read from the header
    alone; 1 when there is none or the EXIF block is broken (as `_upright` then leaves it)."""
    if isinstance(image, JpegHeader):
        return image.orientation
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
