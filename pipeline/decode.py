"""Turning an image file into the 224x224 RGB pixels the model sees.

Steps: read the bytes once (and hash them), refuse oversized images before
decoding, apply EXIF orientation, convert any mode to RGB, resize the shorter
side to 224, centre-crop 224x224. Every failure becomes a `DecodeError` with a
short reason; nothing here raises anything else for a bad file.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

SIZE = 224
PREPROCESSING = "exif-transpose,rgb-on-white,shorter-side-224-bilinear,center-crop-224"

# We check the pixel count ourselves, against a configurable limit, before any
# pixel is decoded; Pillow's global guard would fire at a fixed size instead.
Image.MAX_IMAGE_PIXELS = None


class DecodeError(Exception):
    """The file cannot be used as an image; the message says why, in one line."""


@dataclass
class Decoded:
    pixels: np.ndarray  # (224, 224, 3) uint8 RGB
    sha256: str
    width: int  # as stored, before orientation
    height: int


def read_bytes(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise DecodeError("file vanished before it could be read") from None
    except PermissionError:
        raise DecodeError("cannot read file: permission denied") from None
    except OSError as e:
        raise DecodeError(f"cannot read file: {e.strerror or e}") from None


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


def resize_and_crop(im: Image.Image, size: int = SIZE) -> Image.Image:
    """Resize so the shorter side is `size`, then take the central size x size square."""
    w, h = im.size
    scale = size / min(w, h)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    im = im.resize((new_w, new_h), Image.BILINEAR)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return im.crop((left, top, left + size, top + size))


def decode_bytes(data: bytes, max_pixels: int) -> Decoded:
    """Decode image bytes to model-ready pixels, or raise DecodeError."""
    if not data:
        raise DecodeError("empty file (0 bytes)")
    digest = hashlib.sha256(data).hexdigest()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # EXIF and palette warnings are not failures
            im = Image.open(io.BytesIO(data))
            width, height = im.size
            if width * height > max_pixels:
                raise DecodeError(
                    f"image is {width}x{height} = {width * height:,} pixels, over the limit of "
                    f"{max_pixels:,} (max_pixels; a possible decompression bomb)"
                )
            if width < 1 or height < 1:
                raise DecodeError(f"image has no pixels ({width}x{height})")
            # JPEG can decode at 1/2, 1/4, 1/8 scale for free; ask for no less than we need.
            scale = SIZE / min(width, height)
            im.draft("RGB", (int(width * scale) + 1, int(height * scale) + 1))
            im = ImageOps.exif_transpose(im)
            im.load()
            rgb = resize_and_crop(_to_rgb(im))
            pixels = np.asarray(rgb, dtype=np.uint8)
    except DecodeError:
        raise
    except UnidentifiedImageError:
        raise DecodeError("not an image, or an image format Pillow cannot read") from None
    except Image.DecompressionBombError as e:
        raise DecodeError(f"decompression bomb: {e}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        # Pillow reports truncated and corrupt data through these.
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DecodeError(f"corrupt or truncated image: {reason}") from None
    except Exception as e:  # a Pillow plugin bug must not stop a job of 100,000 files
        raise DecodeError(f"cannot decode image: {type(e).__name__}: {e}") from None
    if pixels.shape != (SIZE, SIZE, 3):
        raise DecodeError(f"unexpected decoded shape {pixels.shape}")
    return Decoded(pixels=pixels, sha256=digest, width=width, height=height)


def decode_file(path: str, max_pixels: int) -> Decoded:
    """Read and decode one file, or raise DecodeError."""
    return decode_bytes(read_bytes(path), max_pixels)
