"""What label and instance evaluation share: descriptors of decoded files, a flat ranker
keyed by catalog id, the block size of rankings held at once, and the line that names
unusable query files.

Both benchmarks (`labels`, `instances`) import this module and not each other;
`run.evaluate` picks between them.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import faiss
import numpy as np

from pipeline.config import Settings
from pipeline.embed import color, descriptor
from pipeline.embed.interface import l2_normalize
from pipeline.inputs.decode import DecodeError, decode_file

# Rankings held at once while evaluating: queries per block x database size.
# 4M entries of (id, score) is about 50 MB, whatever the collection size.
BLOCK_ENTRIES = 4_000_000


def _pixels(
    paths: list[str], max_pixels: int, shape: dict[str, Any] | None = None
) -> tuple[np.ndarray | list[np.ndarray], list[int]]:
    """Decoded pixels of the files that decode (`shape`: the descriptor's decode arguments),
    and the positions of those that do; a list when whole images differ in shape."""
    out, ok = [], []
    for i, p in enumerate(paths):
        try:
            out.append(decode_file(p, max_pixels, **(shape or {})).pixels)
            ok.append(i)
        except DecodeError:
            continue
    if not out:
        return np.zeros((0, 224, 224, 3), np.uint8), ok
    return descriptor.batch(out), ok


def unusable_queries(paths: list[str], ok: list[int]) -> str:
    """One line naming the query files (all but the positions `ok`) that cannot be used:
    those missing as not found, the others as undecodable (up to 3 names each)."""
    good = set(ok)
    bad = [p for i, p in enumerate(paths) if i not in good]
    gone = [p for p in bad if not os.path.exists(p)]
    broken = [p for p in bad if os.path.exists(p)]
    parts = []
    for what, names in (("not found", gone), ("could not be decoded", broken)):
        if names:
            more = f" and {len(names) - 3} more" if len(names) > 3 else ""
            parts.append(f"{len(names)} {what} ({', '.join(names[:3])}{more})")
    return f"{len(bad)} of {len(paths)} query images cannot be used: {'; '.join(parts)}"


def decode_shape(settings: Settings) -> dict[str, Any]:
    """The decode arguments of the settings' descriptor (resolved by `api.with_descriptor`)."""
    return {"size": settings.image_size, "crop": settings.input == "crop"}


def descriptors(
    method: str,
    paths: list[str],
    deep: np.ndarray | None,
    embed,
    max_pixels: int,
    hybrid_weight: float,
    shape: dict[str, Any] | None = None,
) -> tuple[np.ndarray, list[int]]:
    """Unit vectors for `paths` under `method`; `deep` given = already embedded; `shape`:
    the catalog descriptor's decode arguments (`decode_shape(settings)`)."""
    need_pixels = method in ("color", "hybrid") or deep is None
    pixels, ok = (
        _pixels(paths, max_pixels, shape) if need_pixels else (None, list(range(len(paths))))
    )
    if method == "color":  # no model needed at all
        return color.hsv_histograms(pixels), ok
    if deep is None:
        deep = embed(pixels) if len(ok) else np.zeros((0, 2048), np.float32)
    else:
        deep = deep[ok]
    if method == "resnet50":
        return deep, ok
    hist = color.hsv_histograms(pixels)
    # cos(hybrid) = w cos(deep) + (1 - w) cos(colour), by construction of the concatenation.
    w = float(hybrid_weight)
    return l2_normalize(np.hstack([np.sqrt(w) * deep, np.sqrt(1 - w) * hist])), ok


def flat_ranker(desc: np.ndarray, ids: np.ndarray) -> tuple[faiss.Index, Callable]:
    """The descriptors as a flat index keyed by catalog id, and its lookup, for `ranked`."""
    flat = faiss.IndexIDMap2(faiss.IndexFlatIP(desc.shape[1]))
    flat.add_with_ids(np.ascontiguousarray(desc, dtype=np.float32), ids)
    row_of = {int(i): p for p, i in enumerate(ids)}

    def lookup(wanted: np.ndarray) -> np.ndarray:
        return desc[[row_of[int(i)] for i in wanted]]

    return flat, lookup
