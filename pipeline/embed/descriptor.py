"""What an image's descriptor is made of: the input (crop or whole image), scales, pooling.

ResNet50 is convolutional and the pooling global, so the network can see the
whole image at its aspect ratio instead of a 224x224 centre crop, at several
scales, and its last feature maps can be pooled by average, GeM or R-MAC.
A `Descriptor` names one such choice. It is fixed per catalog and recorded
in the model fingerprint, so vectors of different descriptors never mix.
The default (crop, 224, one scale, avg) keeps the fingerprint that catalogs
had before descriptors existed.

`describe` turns images into unit vectors given any `maps` function (a
runtime's ResNet50 without pooling: uint8 (n, h, w, 3) -> (n, h', w', 2048)),
so every runtime gives the same descriptors.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.errors import CbirError
from pipeline.inputs.decode import MAX_ASPECT
from pipeline.specs import INPUTS

POOLINGS = ("avg", "gem", "rmac")
# A pooling may also be several joined by '+' ("avg+gem"): each pooled descriptor is
# normalised and they are summed, so a category cue (avg) and an instance cue (GeM's
# peaks) both count. Measured: whole-image avg+gem keeps Corel-1K at 0.90 where GeM
# alone lost 0.01, and takes Holidays-150 from 0.766 to 0.816.
GEM_P = 3.0
RMAC_LEVELS = 3
SIZE_RANGE = (64, 1024)


@dataclass(frozen=True)
class Descriptor:
    """How pixels become one vector: input mode, shorter side, scales, pooling."""

    input: str = "crop"  # "crop": shorter side `size`, central square; "whole": no crop
    size: int = 224
    scales: tuple[float, ...] = (1.0,)  # of `size`; descriptors summed, then normalised
    pooling: str = "avg"

    @property
    def classic(self) -> bool:
        """The descriptor of the paper (and of every catalog before this one): a fixed
        224x224 input, so runtimes may pool inside the model and batch freely."""
        return self.input == "crop" and self.size == 224 and self.scales == (1.0,)

    def fingerprint(self) -> dict[str, Any]:
        """The fingerprint fields this descriptor decides (merged over the model's)."""
        names = {"avg": "avg", "gem": f"gem-p{GEM_P:g}", "rmac": f"rmac-L{RMAC_LEVELS}"}
        out: dict[str, Any] = {"pooling": "+".join(names[p] for p in self.pooling.split("+"))}
        if not self.classic:
            out["input"] = f"{self.input}-{self.size}"
            out["scales"] = scales_text(self.scales)
            crop = f",center-crop-{self.size}" if self.input == "crop" else ""
            out["preprocessing"] = (
                f"exif-transpose,rgb-on-white,shorter-side-{self.size}-bilinear{crop}"
                + (f",longer-side-max-{MAX_ASPECT:g}x" if self.input == "whole" else "")
                + ",caffe-bgr-mean"
            )
        return out

    @property
    def decode(self) -> dict[str, Any]:
        """`decode_file` / `decode_bytes` keyword arguments for this descriptor's input."""
        return {"size": self.size, "crop": self.input == "crop"}

    def describe_text(self) -> str:
        scales = "" if self.scales == (1.0,) else f" at scales {scales_text(self.scales)}"
        return f"{self.input} image, shorter side {self.size}{scales}, {self.pooling} pooling"


def scales_text(scales: tuple[float, ...]) -> str:
    return ",".join(f"{s:.4g}" for s in scales)


def parse_scales(text: str | float | tuple | list) -> tuple[float, ...]:
    """'1,0.7071,0.5' -> (1.0, 0.7071, 0.5): 1 to 5 distinct factors in (0, 1], 1 first."""
    items = text if isinstance(text, tuple | list) else str(text).split(",")
    try:
        scales = tuple(float(str(s).strip()) for s in items if str(s).strip())
    except ValueError:
        raise CbirError(f"scales must be numbers like 1,0.7071,0.5, got {text!r:.60}") from None
    if not scales or len(scales) > 5:
        raise CbirError(f"give 1 to 5 scales, like 1,0.7071,0.5; got {text!r:.60}")
    if any(not math.isfinite(s) or not 0 < s <= 1 for s in scales):
        raise CbirError(f"each scale must be in (0, 1] (1 = the image size), got {text!r:.60}")
    if len(set(scales)) != len(scales):
        raise CbirError(f"scales repeat: {text!r:.60}")
    return tuple(sorted(scales, reverse=True))


def make(input: str = "crop", size: int = 224, scales: Any = "1", pooling: str = "avg"):
    """A checked Descriptor (one-line errors for bad values)."""
    if input not in INPUTS:
        raise CbirError(f"input must be {' or '.join(INPUTS)}, got {input!r:.40}")
    parts = str(pooling).split("+")
    if not all(p in POOLINGS for p in parts) or len(set(parts)) != len(parts):
        raise CbirError(
            f"pooling must be {', '.join(POOLINGS)} or several joined by '+' (avg+gem), "
            f"got {pooling!r:.40}"
        )
    if not isinstance(size, int) or not SIZE_RANGE[0] <= size <= SIZE_RANGE[1]:
        raise CbirError(f"image size must be an integer from {SIZE_RANGE[0]} to {SIZE_RANGE[1]}")
    scales = parse_scales(scales)
    if min(scales) * size < 32:
        raise CbirError(f"scale {min(scales):g} of {size} is under 32 pixels: too small")
    return Descriptor(input, size, scales, pooling)


def from_fingerprint(fp: dict[str, Any] | None) -> Descriptor | None:
    """The descriptor a catalog's fingerprint records (None for no fingerprint)."""
    if not fp:
        return None
    pooling = "+".join(p.split("-")[0] for p in str(fp.get("pooling", "avg")).split("+"))
    mode, _, size = str(fp.get("input", "crop-224")).partition("-")
    try:
        return make(mode, int(size), str(fp.get("scales", "1")), pooling)
    except (CbirError, ValueError):
        return None  # a fingerprint of another tool's making: the model check will say so


# -- pooling: feature maps (h, w, c) -> (c,)


def gem(maps: np.ndarray, p: float = GEM_P) -> np.ndarray:
    x = np.clip(maps, 1e-6, None).astype(np.float64)
    return (np.mean(x**p, axis=(0, 1)) ** (1.0 / p)).astype(np.float32)


def rmac(maps: np.ndarray, levels: int = RMAC_LEVELS, eps: float = 1e-6) -> np.ndarray:
    """R-MAC (Tolias et al. 2016): max-pooled square regions at `levels` scales (about 40 %
    overlap), each L2-normalised, summed with the whole map's max; as cirtorch samples them."""
    h, w = maps.shape[:2]
    side = min(w, h)
    steps = np.array([2, 3, 4, 5, 6, 7])
    b = (max(h, w) - side) / (steps - 1)
    idx = int(np.argmin(np.abs(((side**2 - side * b) / side**2) - 0.4)))
    wd = idx + 1 if h < w else 0
    hd = idx + 1 if h > w else 0

    def unit(v: np.ndarray) -> np.ndarray:
        return v / (np.linalg.norm(v) + eps)

    out = unit(maps.max(axis=(0, 1)).astype(np.float64))
    for level in range(1, levels + 1):
        wl = int(math.floor(2 * side / (level + 1)))
        if wl == 0:
            continue
        wl2 = int(math.floor(wl / 2 - 1))
        bw = 0 if level + wd == 1 else (w - wl) / (level + wd - 1)
        bh = 0 if level + hd == 1 else (h - wl) / (level + hd - 1)
        xs = (np.floor(wl2 + np.arange(level + wd) * bw) - wl2).astype(int)
        ys = (np.floor(wl2 + np.arange(level + hd) * bh) - wl2).astype(int)
        for y in ys:
            for x in xs:
                out += unit(maps[y : y + wl, x : x + wl].max(axis=(0, 1)).astype(np.float64))
    return out.astype(np.float32)


def pool(maps: np.ndarray, pooling: str) -> np.ndarray:
    if "+" in pooling:
        return sum(_unit(pool(maps, p)) for p in pooling.split("+"))
    if pooling == "gem":
        return gem(maps)
    if pooling == "rmac":
        return rmac(maps)
    return maps.mean(axis=(0, 1), dtype=np.float64).astype(np.float32)


def _unit(v: np.ndarray) -> np.ndarray:
    return v / max(float(np.linalg.norm(v)), 1e-12)


def batch(images: list[np.ndarray]) -> np.ndarray | list[np.ndarray]:
    """Images for an embedder: one array when they share a shape (every crop does), else
    the list (whole images of several aspect ratios; `describe` groups them)."""
    return np.stack(images) if len({im.shape for im in images}) == 1 else images


def rescale(pixels: np.ndarray, scale: float) -> np.ndarray:
    """An image at `scale` of its size (bilinear, as decoding resizes); 1 = itself."""
    if scale == 1.0:
        return pixels
    from PIL import Image

    h, w = pixels.shape[:2]
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.asarray(Image.fromarray(pixels).resize(size, Image.BILINEAR), dtype=np.uint8)


def describe(
    images: list[np.ndarray] | np.ndarray,
    d: Descriptor,
    maps: Callable[[np.ndarray], np.ndarray],
    batch_size: int = 32,
) -> np.ndarray:
    """Unit descriptors of uint8 RGB images of any sizes: each scale's pooled maps,
    normalised, summed, normalised. Images of one shape go through `maps` together."""
    n = len(images)
    total = np.zeros((n, 0), dtype=np.float32)
    for scale in d.scales:
        scaled = [rescale(np.asarray(im), scale) for im in images]
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for i, im in enumerate(scaled):
            by_shape.setdefault(im.shape, []).append(i)
        for members in by_shape.values():
            for start in range(0, len(members), batch_size):
                chunk = members[start : start + batch_size]
                fm = np.asarray(maps(np.stack([scaled[i] for i in chunk])))
                if total.shape[1] == 0:
                    total = np.zeros((n, fm.shape[-1]), dtype=np.float32)
                for i, m in zip(chunk, fm, strict=True):
                    total[i] += _unit(pool(m, d.pooling))
    return total / np.maximum(np.linalg.norm(total, axis=1, keepdims=True), 1e-12)
