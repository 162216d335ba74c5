"""Turning an image file into the 224x224 RGB pixels the model sees.

Steps: read the header and refuse oversized images before decoding (or
hashing): too many pixels in the file, or after the resize to the model's
input (a thin image is upscaled), or too thin a strip; hash the bytes, apply
EXIF orientation, convert any mode to RGB, resize the shorter side to 224,
centre-crop 224x224. Every failure becomes a `DecodeError` with a
short reason; nothing here raises anything else for a bad file.
"""

from __future__ import annotations

import hashlib
import io
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np
import pillow_heif
from PIL import Image, ImageOps, UnidentifiedImageError

from pipeline import files
from pipeline.inputs.dates import exif_date

# HEIC/HEIF (phone photos) through pillow-heif, a registered Pillow plugin, so the
# header check, the limits and every error path below apply as for JPEG; it applies
# the container's rotation itself (and clears the EXIF orientation, so it is not
# turned twice). AVIF is Pillow's own (11.3+). Registered on import: every module
# that opens an image imports this one.
pillow_heif.register_heif_opener()

SIZE = 224
PREPROCESSING = "exif-transpose,rgb-on-white,shorter-side-224-bilinear,center-crop-224"

# Query rotations (degrees counter-clockwise, as np.rot90 turns) as Pillow transposes.
ROTATE = {
    90: Image.Transpose.ROTATE_90,
    180: Image.Transpose.ROTATE_180,
    270: Image.Transpose.ROTATE_270,
}

# We check the pixel count ourselves, against a configurable limit, before any
# pixel is decoded; Pillow's global guard would fire at a fixed size instead.
Image.MAX_IMAGE_PIXELS = None
# The longest side may be at most this many times the shorter one. The shorter side is
# resized to the model's input, so a 1x20000 strip of 165 bytes would become 224x4.5M
# pixels (3 GB); those are counted against max_pixels too, but what is this thin is no
# photograph (a line or a strip): refused in one line. 50:1 keeps every panorama (phone
# panoramas are up to ~1:8, web banners 1:11) with room.
MAX_ASPECT_RATIO = 50
# A whole image's (no crop) longer side is cut to this many times its shorter side
# (centred): a 10:1 panorama would otherwise cost 10 crops' worth of compute and memory.
# Part of a whole-image descriptor's fingerprint (`descriptor.Descriptor.fingerprint`).
MAX_ASPECT = 3.0


class DecodeError(Exception):
    """The file cannot be used as an image; the message says why, in one line."""


@dataclass
class Decoded:
    pixels: np.ndarray  # (224, 224, 3) uint8 RGB
    sha256: str
    width: int  # as stored, before orientation
    height: int
    taken_at: float | None = None  # the EXIF date, unix seconds (`dates`); None if none


def _read_error(e: OSError) -> DecodeError:
    if isinstance(e, FileNotFoundError):
        return DecodeError("file vanished before it could be read")
    if isinstance(e, PermissionError):
        return DecodeError("cannot read file: permission denied")
    return DecodeError(f"cannot read file: {e.strerror or e}")


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow mode to RGB; transparent areas become white, 16-bit is rescaled."""
    if im.mode == "RGB":
        return im
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(im, dtype=np.float64)
        lo, hi = (0.0, 65535.0) if im.mode.startswith("I;16") else (arr.min(), arr.max())
        scaled = (arr - lo) * (255.0 / max(hi - lo, 1e-12))
        return Image.fromarray(np.clip(scaled, 0, 255).astype(np.uint8), "L").convert("RGB")
    has_alpha = im.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (
        im.mode == "P" and "transparency" in im.info
    )
    if has_alpha:
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")


def resized(width: int, height: int, size: int = SIZE) -> tuple[int, int]:
    """The size of an image after `resize_and_crop` resizes its shorter side to `size`
    (before the crop): what the resize allocates, up or down."""
    scale = size / min(width, height)
    return max(size, round(width * scale)), max(size, round(height * scale))


def resize_and_crop(im: Image.Image, size: int = SIZE, crop: bool = True) -> Image.Image:
    """Resize so the shorter side is `size`; then the central size x size square (crop), or
    the whole image with its longer side cut, centred, to MAX_ASPECT x size (no crop)."""
    new_w, new_h = resized(*im.size, size)
    im = im.resize((new_w, new_h), Image.BILINEAR)
    cut_w, cut_h = (size, size) if crop else (
        min(new_w, int(MAX_ASPECT * size)), min(new_h, int(MAX_ASPECT * size)),
    )  # fmt: skip
    left, top = (new_w - cut_w) // 2, (new_h - cut_h) // 2
    return im.crop((left, top, left + cut_w, top + cut_h))


def check_shape(width: int, height: int, max_pixels: int, size: int = SIZE) -> None:
    """Refuse (DecodeError) an image too large or too thin to decode to `size`, from its
    header: the file's pixels, the aspect ratio, and the pixels after the resize."""
    if width * height > max_pixels:
        raise DecodeError(
            f"image is {width}x{height} = {width * height:,} pixels, over the limit of "
            f"{max_pixels:,} (max_pixels; a possible decompression bomb)"
        )
    if width < 1 or height < 1:
        raise DecodeError(f"image has no pixels ({width}x{height})")
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise DecodeError(
            f"image is {width}x{height}, thinner than the limit of {MAX_ASPECT_RATIO}:1 "
            "(a strip or a line, not a photograph)"
        )
    new_w, new_h = resized(width, height, size)
    if new_w * new_h > max_pixels:
        raise DecodeError(
            f"image is {width}x{height}, {new_w}x{new_h} = {new_w * new_h:,} pixels once its "
            f"shorter side is resized to {size}, over the limit of {max_pixels:,} (max_pixels)"
        )


def _open(fp: BinaryIO, max_pixels: int, size: int) -> Image.Image:
    """Read only the header: identify the format and refuse what `check_shape` refuses."""
    im = Image.open(fp)
    check_shape(*im.size, max_pixels, size)
    return im


def _pixels(im: Image.Image, rotate: int = 0, size: int = SIZE, crop: bool = True) -> np.ndarray:
    # JPEG can decode at 1/2, 1/4, 1/8 scale for free; ask for no less than we need.
    # Only JPEG: its draft scales the DCT of the picture itself, while pillow-heif's
    # draft swaps in the embedded thumbnail, which an editor may have left stale (the
    # file would get another picture's vector). A 12 MP HEIC costs ~0.4 s instead.
    if im.format == "JPEG":
        width, height = im.size
        scale = size / min(width, height)
        im.draft("RGB", (int(width * scale) + 1, int(height * scale) + 1))
    im = ImageOps.exif_transpose(im)
    im.load()
    if rotate:  # a query turned on purpose: before the resize and crop, as if stored so
        im = im.transpose(ROTATE[rotate])
    pixels = np.asarray(resize_and_crop(_to_rgb(im), size, crop), dtype=np.uint8)
    if pixels.ndim != 3 or pixels.shape[2] != 3 or min(pixels.shape[:2]) != size:
        raise DecodeError(f"unexpected decoded shape {pixels.shape}")
    return pixels


@contextmanager
def _pillow_errors() -> Iterator[None]:
    """Every way Pillow reports a bad file, as one DecodeError."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # EXIF and palette warnings are not failures
            yield
    except DecodeError:
        raise
    except UnidentifiedImageError:
        raise DecodeError("not an image, or an image format Pillow cannot read") from None
    except Image.DecompressionBombError as e:
        raise DecodeError(f"decompression bomb: {e}") from None
    except MemoryError:
        raise DecodeError("image too large to decode in the memory available") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        # Pillow reports truncated and corrupt data through these.
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DecodeError(f"corrupt or truncated image: {reason}") from None
    except Exception as e:  # a Pillow plugin bug must not stop a job of 100,000 files
        raise DecodeError(f"cannot decode image: {type(e).__name__}: {e}") from None


def _rotation(rotate: int) -> None:
    if rotate != 0 and rotate not in ROTATE:  # a caller's bug, not a bad file
        raise ValueError(f"rotate must be 0, 90, 180 or 270, got {rotate!r}")


def decode_bytes(
    data: bytes, max_pixels: int, rotate: int = 0, *, size: int = SIZE, crop: bool = True
) -> Decoded:
    """Decode image bytes (an upload) to model-ready pixels, or raise DecodeError.

    `rotate` (degrees counter-clockwise: 90, 180, 270) turns the image after its EXIF
    orientation and before the resize and crop. `size` is the shorter side after
    resizing; `crop` takes the central square, else the whole image (a `Descriptor`'s input).
    """
    _rotation(rotate)
    if not data:
        raise DecodeError("empty file (0 bytes)")
    with _pillow_errors():
        im = _open(io.BytesIO(data), max_pixels, size)
        width, height = im.size
        pixels = _pixels(im, rotate, size, crop)
    return Decoded(pixels, hashlib.sha256(data).hexdigest(), width, height)


def decode_file(
    path: str, max_pixels: int, rotate: int = 0, *, size: int = SIZE, crop: bool = True
) -> Decoded:
    """Read and decode one file, or raise DecodeError; `rotate` as in `decode_bytes`.

    Only a regular file is read (a FIFO or a device is refused without waiting on
    it). The header is checked first (format, pixel counts, aspect ratio), so a
    huge file that is no image, or too large an image, is refused after reading a
    few KB; then the file's size (`files.image_max_bytes(max_pixels)`), so no more
    is hashed than an image of max_pixels can need. The hash is streamed and
    Pillow reads only what it decodes.
    """
    _rotation(rotate)
    try:
        with files.open_regular(path, "image", None) as f:
            file_size = os.fstat(f.fileno()).st_size
            if file_size == 0:
                raise DecodeError("empty file (0 bytes)")
            with _pillow_errors():
                im = _open(f, max_pixels, size)
                width, height = im.size
            limit = files.image_max_bytes(max_pixels)
            files.check_size(file_size, path, "image", limit)
            digest = hashlib.sha256()
            f.seek(0)
            while chunk := f.read(min(1 << 20, limit + 1 - f.tell())):
                digest.update(chunk)  # at most limit + 1 bytes, if the file grows meanwhile
            files.check_size(f.tell(), path, "image", limit)
            f.seek(0)
            with _pillow_errors():
                pixels = _pixels(im, rotate, size, crop)
            taken_at = exif_date(im)  # parsed already for the orientation; never raises
    except files.UnusableFile as e:
        raise DecodeError(e.reason) from None
    except OSError as e:  # reading failed (Pillow's own OSErrors are DecodeErrors by now)
        raise _read_error(e) from None
    return Decoded(pixels, digest.hexdigest(), width, height, taken_at)
