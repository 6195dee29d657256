"""Drawing synthetic product photos with PIL: a garment or a pan on a studio background.

Every random choice (position, scale, rotation, shade, noise) comes from the caller's rng,
in a fixed order that does not depend on the attribute values, so equal rng states give
images that differ only where the values do. Attribute values are checked by the caller
(samples.render_product).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

COLOURS: dict[str, tuple[int, int, int]] = {
    "Red": (200, 32, 36),
    "Green": (34, 150, 60),
    "Blue": (36, 70, 196),
    "Yellow": (238, 206, 40),
    "Black": (28, 28, 30),
    "White": (246, 246, 244),
}

METALS: tuple[tuple[int, int, int], ...] = (
    (58, 58, 62),  # black non-stick
    (92, 94, 98),  # cast iron / anodised
    (150, 152, 158),  # stainless steel
    (160, 92, 52),  # copper
)

SUPERSAMPLE = 2  # draw at 2x and downscale, for anti-aliased edges

Point = tuple[float, float]
RGB = tuple[int, int, int]


# --- geometry helpers ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Frame:
    """Maps garment coordinates (unit square around 0,0) to canvas pixels: scale, rotate, shift."""

    cx: float
    cy: float
    scale: float
    angle: float  # radians

    def px(self, x: float, y: float) -> Point:
        cos, sin = math.cos(self.angle), math.sin(self.angle)
        return (
            self.cx + self.scale * (x * cos - y * sin),
            self.cy + self.scale * (x * sin + y * cos),
        )

    def poly(self, points: Sequence[Point]) -> list[Point]:
        return [self.px(x, y) for x, y in points]


def _ellipse(cx: float, cy: float, rx: float, ry: float, start: float = 0.0, end: float = 360.0,
             steps: int = 48) -> list[Point]:
    """Points on an elliptical arc (degrees, y down), as a polygon in garment coordinates."""
    out = []
    for i in range(steps + 1):
        t = math.radians(start + (end - start) * i / steps)
        out.append((cx + rx * math.cos(t), cy + ry * math.sin(t)))
    return out


def _jitter(colour: RGB, rng: random.Random, amount: int) -> RGB:
    """The colour shifted in brightness and per channel, staying recognisably the same hue."""
    shift = rng.randint(-amount, amount)
    return tuple(  # type: ignore[return-value]
        max(0, min(255, c + shift + rng.randint(-amount // 3, amount // 3))) for c in colour
    )


def _shade(colour: RGB, factor: float) -> RGB:
    return tuple(max(0, min(255, int(c * factor))) for c in colour)  # type: ignore[return-value]


def _background(size: int, rng: random.Random) -> Image.Image:
    """A light-grey studio background with a soft vertical gradient (never pure white)."""
    top = rng.randint(205, 228)
    bottom = top - rng.randint(8, 28)
    tint = (rng.randint(-4, 4), rng.randint(-4, 4), rng.randint(-4, 4))
    ramp = np.linspace(top, bottom, size, dtype=np.float32)[:, None, None]
    arr = np.broadcast_to(ramp + np.array(tint, dtype=np.float32), (size, size, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


def _finish(canvas: Image.Image, size: int, rng: random.Random) -> Image.Image:
    """Downscale, soften slightly and add sensor noise."""
    image = canvas.resize((size, size), Image.Resampling.LANCZOS)
    if rng.random() < 0.5:
        image = image.filter(ImageFilter.GaussianBlur(radius=rng.uniform(0.2, 0.7)))
    noise_rng = np.random.default_rng(rng.getrandbits(64))
    sigma = rng.uniform(2.0, 6.0)
    arr = np.asarray(image, dtype=np.float32) + noise_rng.normal(0.0, sigma, (size, size, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


# --- tops ----------------------------------------------------------------------------------------


def _torso(sleeveless: bool) -> list[Point]:
    """Torso outline; a tank top has narrow straps and scooped armholes instead of shoulders."""
    if sleeveless:
        # armhole: from the strap's outer edge (-0.17,-0.40), scooped inward, to the armpit
        left_arm = _ellipse(-0.27, -0.40, 0.10, 0.28, 0, 90, 12)
        right_arm = [(-x, y) for x, y in reversed(left_arm)]
        return ([(-0.11, -0.41)] + left_arm + [(-0.25, 0.45), (0.25, 0.45)] + right_arm
                + [(0.11, -0.41)])
    return [(-0.11, -0.41), (-0.27, -0.36), (-0.25, -0.12), (-0.25, 0.45),
            (0.25, 0.45), (0.25, -0.12), (0.27, -0.36), (0.11, -0.41)]


def _sleeve(length: str, side: int, rng: random.Random) -> list[Point]:
    """One sleeve polygon (side -1 left, +1 right); empty for Sleeveless. Always draws rng."""
    angle_jitter = rng.uniform(-6, 6)
    length_jitter = rng.uniform(0.9, 1.1)
    if length == "Sleeveless":
        return []
    span, angle = (0.17, 32.0) if length == "Shortsleeved" else (0.50, 66.0)
    span *= length_jitter
    a = math.radians(angle + angle_jitter)
    dx, dy = side * math.cos(a) * span, math.sin(a) * span
    shoulder, armpit = (side * 0.27, -0.36), (side * 0.25, -0.15)
    cuff = 0.9 if length == "Longsleeved" else 1.0  # long sleeves taper to the cuff
    end_shoulder = (shoulder[0] + dx, shoulder[1] + dy)
    end_armpit = (armpit[0] + dx * cuff + side * 0.01, armpit[1] + dy * cuff)
    return [shoulder, end_shoulder, end_armpit, armpit]


def _neck(neckline: str, rng: random.Random) -> list[Point]:
    """Neck opening polygon: a round scoop or a V."""
    depth = rng.uniform(0.9, 1.15)
    if neckline == "V-neck":
        return [(-0.11, -0.41), (0.0, -0.41 + 0.24 * depth), (0.11, -0.41)]
    return _ellipse(0.0, -0.43, 0.11, 0.09 * depth, 0, 180, 24)


def _stripes(rng: random.Random, main: str) -> list[tuple[list[Point], RGB]]:
    """1-2 accent colours as horizontal bands or a hem block, in garment coordinates."""
    others = [name for name in COLOURS if name != main]
    accents = rng.sample(others, rng.choice((1, 2)))
    bands: list[tuple[list[Point], RGB]] = []
    if rng.random() < 0.5:  # stripes across chest and sleeves
        n = rng.randint(2, 4)
        coverage = rng.uniform(0.22, 0.36)
        pitch = 0.86 / n
        height = pitch * coverage
        offset = rng.uniform(0, pitch - height)
        for i in range(n):
            y0 = -0.40 + offset + i * pitch
            colour = _jitter(COLOURS[accents[i % len(accents)]], rng, 15)
            bands.append(([(-0.8, y0), (0.8, y0), (0.8, y0 + height), (-0.8, y0 + height)], colour))
    else:  # colour block at the hem, optionally a second thin band above it
        top = 0.45 - 0.86 * rng.uniform(0.2, 0.3)
        colour = _jitter(COLOURS[accents[0]], rng, 15)
        bands.append(([(-0.8, top), (0.8, top), (0.8, 0.5), (-0.8, 0.5)], colour))
        if len(accents) > 1:
            y0 = top - 0.09
            colour = _jitter(COLOURS[accents[1]], rng, 15)
            bands.append(([(-0.8, y0), (0.8, y0), (0.8, y0 + 0.05), (-0.8, y0 + 0.05)], colour))
    return bands


def draw_top(attributes: dict[str, str], rng: random.Random, size: int, multicolour: bool) -> Image.Image:
    """A top with `sleeve_length`, `neckline` and `main_colour`; `multicolour` adds accents."""
    big = size * SUPERSAMPLE
    canvas = _background(big, rng)
    frame = _Frame(
        cx=big * rng.uniform(0.45, 0.55),
        cy=big * rng.uniform(0.47, 0.55),
        scale=big * rng.uniform(0.78, 0.95),
        angle=math.radians(rng.uniform(-7, 7)),
    )
    main = attributes["main_colour"]
    colour = _jitter(COLOURS[main], rng, 18)
    edge = (150, 150, 150) if main == "White" else _shade(colour, 0.6)
    if main == "Black":
        edge = (70, 70, 74)
    sleeveless = attributes["sleeve_length"] == "Sleeveless"
    torso = frame.poly(_torso(sleeveless))
    sleeves = [frame.poly(s) for side in (-1, 1) if (s := _sleeve(attributes["sleeve_length"], side, rng))]
    neck = frame.poly(_neck(attributes["neckline"], rng))

    mask = Image.new("L", (big, big), 0)
    mask_draw = ImageDraw.Draw(mask)
    for polygon in [torso, *sleeves]:
        mask_draw.polygon(polygon, fill=255)
    fabric = Image.new("RGB", (big, big), colour)
    if multicolour:
        fabric_draw = ImageDraw.Draw(fabric)
        for band, band_colour in _stripes(rng, main):
            fabric_draw.polygon(frame.poly(band), fill=band_colour)
    canvas.paste(fabric, (0, 0), mask)

    draw = ImageDraw.Draw(canvas)
    width = max(2, big // 110)
    for polygon in [*sleeves, torso]:
        draw.line([*polygon, polygon[0]], fill=edge, width=width, joint="curve")
    draw.polygon(neck, fill=_shade(colour, 0.62) if main != "Black" else (55, 55, 58))
    draw.line(neck, fill=edge, width=width * 2, joint="curve")
    # a soft fold down the middle of the torso
    fold = frame.poly([(rng.uniform(-0.05, 0.05), -0.1), (rng.uniform(-0.08, 0.08), 0.4)])
    draw.line(fold, fill=_shade(colour, 0.9) if main != "Black" else (45, 45, 48), width=width)
    return _finish(canvas, size, rng)


# --- pans ----------------------------------------------------------------------------------------


def draw_pan(attributes: dict[str, str], rng: random.Random, size: int) -> Image.Image:
    """A pan in 3/4 view, with or without `lid` and `handle`."""
    big = size * SUPERSAMPLE
    canvas = _background(big, rng)
    side = rng.choice((-1, 1))  # handle to the left or right; the body shifts the other way
    frame = _Frame(
        cx=big * (0.5 - side * rng.uniform(0.08, 0.14)),
        cy=big * rng.uniform(0.50, 0.58),
        scale=big * rng.uniform(0.88, 1.02),
        angle=math.radians(rng.uniform(-5, 5)),
    )
    metal = _jitter(rng.choice(METALS), rng, 14)
    has_lid, has_handle = attributes["lid"] == "yes", attributes["handle"] == "yes"
    rx = rng.uniform(0.26, 0.32)  # rim half-width
    ry = rx * rng.uniform(0.22, 0.32)  # 3/4 view: the rim is a flat ellipse
    depth = rng.uniform(0.10, 0.22)
    handle_len = rng.uniform(0.28, 0.36)
    handle_tilt = math.radians(rng.uniform(5, 18))
    handle_colour = _jitter(rng.choice(((30, 30, 32), (70, 45, 30), metal)), rng, 8)
    lid_colour = _jitter(rng.choice(((170, 172, 178), (120, 122, 128), metal)), rng, 10)
    dome = rng.uniform(0.10, 0.16)
    top_y, bottom_y = -depth / 2, depth / 2
    draw = ImageDraw.Draw(canvas)

    # shadow under the pan
    draw.polygon(frame.poly(_ellipse(0.02, bottom_y + 0.02, rx * 1.05, ry * 1.1)), fill=_shade((190, 190, 190), 0.85))
    if has_handle:
        hx = side * rx * 0.96
        far = (hx + side * handle_len * math.cos(handle_tilt), top_y + 0.03 - handle_len * math.sin(handle_tilt))
        normal = (0.022 * math.sin(handle_tilt), 0.022 * math.cos(handle_tilt))
        handle = [(hx, top_y + 0.01), (hx, top_y + 0.06), (far[0] + normal[0] * side, far[1] + normal[1]),
                  (far[0] - normal[0] * side, far[1] - normal[1])]
        draw.polygon(frame.poly(handle), fill=handle_colour, outline=_shade(handle_colour, 0.6))
        draw.polygon(frame.poly(_ellipse(far[0], far[1], 0.018, 0.018, steps=12)), fill=handle_colour)
    # body: bottom ellipse, side wall, rim
    body = [(rx, top_y)] + _ellipse(0, bottom_y, rx * 0.92, ry * 0.92, 0, 180) + [(-rx, top_y)]
    draw.polygon(frame.poly(body), fill=_shade(metal, 0.85), outline=_shade(metal, 0.55))
    wall_highlight = frame.poly([(-rx * 0.55, top_y + 0.02), (-rx * 0.5, bottom_y + ry * 0.5)])
    draw.line(wall_highlight, fill=_shade(metal, 1.35), width=max(2, big // 90))
    rim = frame.poly(_ellipse(0, top_y, rx, ry))
    if has_lid:
        lid_dome = _ellipse(0, top_y, rx * 0.98, dome, 180, 360)
        draw.polygon(frame.poly(lid_dome), fill=lid_colour, outline=_shade(lid_colour, 0.6))
        draw.polygon(rim, fill=_shade(lid_colour, 0.9), outline=_shade(lid_colour, 0.55))
        shine = _ellipse(-rx * 0.3, top_y - dome * 0.55, rx * 0.22, dome * 0.18, 200, 330, 12)
        draw.line(frame.poly(shine), fill=_shade(lid_colour, 1.3), width=max(2, big // 100))
        knob_top = top_y - dome - 0.045
        knob = [(-0.035, top_y - dome + 0.01), (-0.045, knob_top), (0.045, knob_top), (0.035, top_y - dome + 0.01)]
        draw.polygon(frame.poly(knob), fill=(35, 35, 38))
    else:
        draw.polygon(rim, fill=_shade(metal, 1.1), outline=_shade(metal, 0.5))
        inner = frame.poly(_ellipse(0, top_y + 0.006, rx * 0.9, ry * 0.8))
        draw.polygon(inner, fill=_shade(metal, 0.45))
        glint = _ellipse(rx * 0.2, top_y + ry * 0.1, rx * 0.35, ry * 0.3, 200, 300, 12)
        draw.line(frame.poly(glint), fill=_shade(metal, 0.8), width=max(2, big // 110))
    return _finish(canvas, size, rng)
