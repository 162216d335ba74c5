"""Thumbnails: one way to make a small JPEG of an image, for the web page and the HTML report."""

from __future__ import annotations

import io
from typing import BinaryIO

from PIL import Image, ImageDraw, ImageOps

from pipeline import files
from pipeline.inputs.decode import DecodeError

THUMB_SIZE = 256


def thumbnail_bytes(data_or_path: bytes | str, max_pixels: int, size: int = THUMB_SIZE) -> bytes:
    """A JPEG of at most `size` px a side: EXIF orientation applied, RGB.

    Raises DecodeError over `max_pixels`; Pillow's own errors for unreadable files.
    """
    if isinstance(data_or_path, bytes):
        src: BinaryIO = io.BytesIO(data_or_path)
    else:  # a FIFO or a device is refused, not waited on or read without end
        try:
            src = files.open_regular(data_or_path, "image", files.image_max_bytes(max_pixels))
        except files.UnusableFile as e:
            raise DecodeError(e.reason) from None
    with src, Image.open(src) as im:
        if im.size[0] * im.size[1] > max_pixels:
            raise DecodeError("image is over the max_pixels limit")
        im.draft("RGB", (size, size))  # fast JPEG downscale; no-op otherwise
        # In place, and no conversion of what is RGB already: a large image is held
        # once, not three times (each copy of a 9000x9000 image is 324 MB).
        ImageOps.exif_transpose(im, in_place=True)
        if im.mode != "RGB":
            im = im.convert("RGB")
        im.thumbnail((size, size))
        out = io.BytesIO()
        im.save(out, "JPEG", quality=85)
    return out.getvalue()


def placeholder_bytes(size: int = THUMB_SIZE) -> bytes:
    """A small grey JPEG standing in for an image that cannot be opened."""
    img = Image.new("RGB", (size, size * 3 // 4), (170, 170, 170))
    ImageDraw.Draw(img).text((10, 10), "no image", fill=(70, 70, 70))
    out = io.BytesIO()
    img.save(out, "JPEG", quality=85)
    return out.getvalue()
