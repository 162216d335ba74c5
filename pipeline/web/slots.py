"""Bounded decoding: how many images are decoded (and embedded) at once, and their pixels.

A burst of huge uploads must not take the machine's memory: each decode
holds a slot and its pixel count from a shared budget, waits a few seconds
for them, and otherwise the request gets a 503 ("busy; retry").
"""

from __future__ import annotations

import ctypes
import io
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, BinaryIO

from PIL import Image

from pipeline import files
from pipeline.inputs.decode import SIZE, resized
from pipeline.inputs.thumbs import THUMB_SIZE

# Decoded pixels in flight at once: two images at the default max_pixels, about
# 0.7 GB as Pillow's 4-byte pixels. A larger image still runs, alone.
PIXEL_BUDGET = 2 * 89_478_485
TRIM_PIXELS = 1_000_000  # after a decode this large, freed memory goes back to the OS
BUSY_WAIT_S = 5.0  # how long a request waits for a decode slot before a 503


class Busy(Exception):
    """The server cannot serve this now: HTTP 503 with a one-line message; retry later."""


def cores() -> int:
    """The cores this process may use (a container's share, not the host's)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _malloc_trim() -> Any:
    """glibc's malloc_trim, or None: returns freed heap pages of every arena to the OS."""
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None


_TRIM = _malloc_trim()


class DecodeSlots:
    """At most `slots` decodes (and embeds) at once and `pixels` decoded pixels in flight.

    A request waits up to `wait_s` for its turn, then gets a 503; an image
    larger than the whole budget waits until it can run alone.
    """

    def __init__(self, slots: int, pixels: int, wait_s: float = BUSY_WAIT_S):
        self.slots, self.pixels, self.wait_s = max(1, slots), max(1, pixels), wait_s
        self._cond = threading.Condition()
        self._running = 0
        self._used = 0

    @contextmanager
    def hold(self, pixels: int) -> Iterator[None]:
        cost = min(max(0, pixels), self.pixels)  # an image over the whole budget runs alone

        def free() -> bool:
            return self._running < self.slots and self._used + cost <= self.pixels

        with self._cond:
            if not self._cond.wait_for(free, timeout=self.wait_s):
                raise Busy("the server is busy decoding other images; retry in a moment")
            self._running += 1
            self._used += cost
        try:
            yield
        finally:
            with self._cond:
                self._running -= 1
                self._used -= cost
                self._cond.notify_all()
            # Freed image buffers stay in this thread's malloc arena, where no other
            # thread reuses them: give them back now (about a millisecond).
            if cost >= TRIM_PIXELS and _TRIM is not None:
                _TRIM(0)


def decode_cost(src: bytes | str, size: int = SIZE) -> int:
    """Pixels Pillow will hold to decode `src` (bytes or a path), read from its header.

    The file's pixels or, for a thin image, its pixels once the shorter side is
    resized to `size` (the model's input; `decode.resized`), whichever is more.
    JPEG decodes at 1/2, 1/4 or 1/8 scale (draft), as decode_bytes and
    thumbnail_bytes ask, so a huge JPEG costs little. 0 for what cannot be
    opened (or is not a regular file): decoding fails before any pixel is made.
    """
    try:
        if isinstance(src, bytes):
            fp: BinaryIO = io.BytesIO(src)
        else:  # a thumbnail's source: never wait on a FIFO here
            fp = files.open_regular(src, "image", files.image_max_bytes(PIXEL_BUDGET))
        with fp, Image.open(fp) as im:
            w, h = im.size
            if min(w, h) < 1:
                return 0
            new_w, new_h = resized(w, h, size)
            if im.format == "JPEG":
                scale = THUMB_SIZE / min(w, h)
                im.draft("RGB", (int(w * scale) + 1, int(h * scale) + 1))
                w, h = im.size
            return max(w * h, new_w * new_h)
    except Exception:  # any header Pillow cannot read: decode_bytes says why
        return 0
