"""Safe image decoding, shared by worker and trainer so both see identical pixels."""

from __future__ import annotations

import io
import warnings

from PIL import Image, ImageOps, UnidentifiedImageError

from shelfsight.shared.errors import Rejected


def decode_image(data: bytes, *, max_bytes: int, max_pixels: int, draft_size: int | None = None) -> Image.Image:
    """Decode bytes to an RGB PIL image, upright per EXIF, within byte and pixel limits.

    The pixel limit is checked from the header, before any pixel is decoded, so a
    decompression bomb costs nothing. `draft_size` lets JPEG decode straight to a reduced
    scale (DCT-domain downscale), no smaller than draft_size on the short side.
    """
    if len(data) > max_bytes:
        raise Rejected("image_too_large", f"image is {len(data)} bytes; the limit is {max_bytes}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                raise Rejected(
                    "image_too_many_pixels",
                    f"image is {width}x{height} = {width * height} pixels; the limit is {max_pixels}",
                )
            if draft_size and image.format == "JPEG":
                scale = min(width, height) / draft_size
                if scale >= 2:
                    image.draft("RGB", (max(1, int(width / scale)), max(1, int(height / scale))))
            image.load()
            upright: Image.Image = ImageOps.exif_transpose(image) or image
            return upright if upright.mode == "RGB" else _to_rgb(upright)
    except Rejected:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise Rejected(
            "image_too_many_pixels", f"decompression bomb refused: {exc}; the limit is {max_pixels} pixels"
        ) from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as exc:
        raise Rejected("undecodable_image", f"cannot decode image: {type(exc).__name__}: {exc}") from exc


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any mode to RGB; transparency is composited on white, as product photos expect."""
    if image.mode in {"RGBA", "LA"} or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")
