"""The traditional colour-histogram descriptor (HSV) that deep features are compared against.

162 bins (18 hues x 3 saturations x 3 values, after Smith & Chang), square-
rooted and L2-normalised so that inner product is the Hellinger similarity and
the same cosine machinery serves both descriptors.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

H_BINS, S_BINS, V_BINS = 18, 3, 3
DIM = H_BINS * S_BINS * V_BINS


def hsv_histogram(pixels: np.ndarray) -> np.ndarray:
    """(224, 224, 3) uint8 RGB -> (162,) float32 unit vector."""
    hsv = np.asarray(Image.fromarray(pixels, "RGB").convert("HSV"), dtype=np.int32)
    h = hsv[..., 0] * H_BINS // 256
    s = hsv[..., 1] * S_BINS // 256
    v = hsv[..., 2] * V_BINS // 256
    bins = (h * S_BINS + s) * V_BINS + v
    hist = np.bincount(bins.ravel(), minlength=DIM).astype(np.float32)
    hist = np.sqrt(hist / hist.sum())
    return hist / max(float(np.linalg.norm(hist)), 1e-12)


def hsv_histograms(batch: np.ndarray) -> np.ndarray:
    """(n, 224, 224, 3) -> (n, 162)."""
    return (
        np.stack([hsv_histogram(p) for p in batch])
        if len(batch)
        else np.zeros((0, DIM), np.float32)
    )
