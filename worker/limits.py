"""Process-wide limits on memory-hungry steps: image decoding and cold model loads.

Both are a `ByteBudget`: a step reserves its estimated bytes (and, optionally, one of a fixed
number of slots) before it starts, and waits while the reservation does not fit. Peak memory is
then bounded by the budget, whatever the mix of formats, sizes and categories arriving at once,
instead of by threads × the largest input.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator


class ByteBudget:
    """Reserve bytes (and a slot, when `slots` is set) for the duration of a step.

    A reservation larger than the whole budget is clamped to it, so it runs, alone, instead of
    waiting forever.
    """

    def __init__(self, capacity_bytes: int, slots: int | None = None) -> None:
        if capacity_bytes <= 0:
            raise ValueError("a byte budget needs a positive capacity")
        self.capacity = capacity_bytes
        self.slots = slots
        self._cond = threading.Condition()
        self._used = 0
        self._active = 0
        self.peak = 0  # highest reservation total seen (tests, debugging)

    @contextlib.contextmanager
    def reserve(self, nbytes: int) -> Iterator[float]:
        """Hold `nbytes` of the budget inside the block; yields the seconds spent waiting."""
        need = max(0, min(int(nbytes), self.capacity))
        started = time.perf_counter()
        with self._cond:
            while not self._fits(need):
                self._cond.wait()
            self._used += need
            self._active += 1
            self.peak = max(self.peak, self._used)
        try:
            yield time.perf_counter() - started
        finally:
            with self._cond:
                self._used -= need
                self._active -= 1
                self._cond.notify_all()

    def in_use(self) -> tuple[int, int]:
        """(bytes reserved, reservations held) now."""
        with self._cond:
            return self._used, self._active

    def _fits(self, need: int) -> bool:
        if self.slots is not None and self._active >= self.slots:
            return False
        return self._active == 0 or self._used + need <= self.capacity


def decoded_bytes_estimate(width: int, height: int, mode: str, fmt: str | None, draft_size: int | None) -> int:
    """Bytes a decode of this image may hold at its peak: pixels at the decoded scale × bytes per
    pixel × 2 (the decoded image and one converted copy alive together).

    JPEG decodes at up to 1/8 scale in the DCT domain when `draft_size` allows it (see
    shared.imaging.decode_image); every other format decodes at full size.
    """
    pixels = width * height
    if draft_size and fmt in ("JPEG", "MPO"):
        scale = min(width, height) / draft_size
        reduction = 8 if scale >= 8 else 4 if scale >= 4 else 2 if scale >= 2 else 1
        pixels = max(1, pixels // (reduction * reduction))
    per_pixel = 4  # RGBA/RGBX, or RGB padded by Pillow
    if mode.startswith(("I", "F")):
        per_pixel = 12  # 16/32-bit greyscale goes through a float copy on its way to 8 bits
    return pixels * per_pixel * 2
