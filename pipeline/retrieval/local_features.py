"""Local features of an image (`retrieval.verify` matches them): OpenCV keypoints and
descriptors of the image decoded as for indexing, and `FeatureCache`, those of indexed
images computed from their files on demand.

The image is decoded by `inputs.decode` (header limits, EXIF orientation, RGB, the
sha256 of the bytes), whole, with its longer side at most `max_side` (never upscaled:
detail that is not in the file does not help, and time grows with pixels); at most
`max_features` keypoints, the strongest. Descriptors are kept as uint8 (SIFT's values
are whole numbers up to 255): 128 bytes per SIFT keypoint, plus 8 for its position.

Why on demand, not stored at indexing: docs/benchmarks.md, "Local-feature
verification (issue 21)". The cache is bounded (`max_items`, least recently used
dropped) and keyed by id and sha256; a file whose size, mtime and bytes no longer
match its catalog row is not used (a notice says so): its features would describe
another image than the one indexed.
"""

from __future__ import annotations

import io
import math
import os
import threading
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
from PIL import Image

from pipeline import files
from pipeline.errors import CbirError
from pipeline.inputs.decode import Decoded, DecodeError, decode_bytes, decode_file

# OpenCV 5.1's main modules (opencv-python-headless) have no AKAZE, KAZE or BRISK, and
# its learned detectors (ALIKED, DISK, XFeat) need model files: SIFT was measured against ORB.
DETECTORS = ("sift", "orb")


@dataclass(frozen=True)
class Extraction:
    """Which features, from how large an image (`verify.Params` extends it)."""

    detector: str = "sift"
    max_side: int = 640  # longer side of the image the features come from (never upscaled)
    max_features: int = 1000  # keypoints kept per image, strongest first

    def __post_init__(self) -> None:
        # Values come from flags and the API: each refused in one line, never half-used.
        if self.detector not in DETECTORS:
            raise CbirError(f"detector {self.detector!r}: use {', '.join(DETECTORS)}")
        check_range(self, (("max_side", 64, 4096), ("max_features", 10, 20000)))


def check_range(obj: Any, ranges: tuple[tuple[str, float, float], ...]) -> None:
    for name, lo, hi in ranges:
        value = getattr(obj, name)
        if not (isinstance(value, int | float) and math.isfinite(value) and lo <= value <= hi):
            raise CbirError(f"verification {name} must be between {lo} and {hi}, got {value!r}")


SIFT = Extraction()


@dataclass(frozen=True)
class Features:
    """Local features of one image: keypoint positions (x, y) in the pixels of the image
    they were detected in (`size`, width x height, after EXIF orientation and the bound
    to `max_side`), and their descriptors (uint8: SIFT's values are whole numbers up to
    255, so 128 bytes a keypoint; ORB's are 32 bytes of bits)."""

    points: np.ndarray  # (n, 2) float32
    descriptors: np.ndarray  # (n, d) uint8
    size: tuple[int, int]
    detector: str = "sift"

    @property
    def nbytes(self) -> int:
        return int(self.points.nbytes + self.descriptors.nbytes)


def _detector(params: Extraction):
    if params.detector == "sift":
        return cv2.SIFT_create(nfeatures=params.max_features)
    return cv2.ORB_create(nfeatures=params.max_features)


def extract(pixels: np.ndarray, params: Extraction = SIFT) -> Features:
    """Local features of RGB pixels (h, w, 3) uint8, already bounded to `max_side`."""
    grey = cv2.cvtColor(np.ascontiguousarray(pixels), cv2.COLOR_RGB2GRAY)
    keypoints, desc = _detector(params).detectAndCompute(grey, None)
    if desc is None or not keypoints:
        desc, keypoints = np.zeros((0, 128 if params.detector == "sift" else 32), np.uint8), []
    points = np.float32([k.pt for k in keypoints]).reshape(-1, 2)
    # SIFT's float descriptors hold whole numbers 0..255: uint8 loses nothing.
    desc = np.clip(desc, 0, 255).astype(np.uint8) if desc.dtype != np.uint8 else desc
    return Features(points, desc, (pixels.shape[1], pixels.shape[0]), params.detector)


def _bounded_side(width: int, height: int, max_side: int) -> int:
    """The shorter side to decode at: the image's own, or less so that the longer side is
    at most max_side (decode sizes by the shorter side; features never gain from upscaling)."""
    short, long = min(width, height), max(width, height)
    return max(1, min(short, round(max_side * short / long)))


def _side(size_of: Callable[[], tuple[int, int]], decode: Callable[..., Any], max_side: int) -> int:
    """The shorter side to decode at, from the image's header; an unreadable header gets
    the decoder's own one-line reason (it fails the same way)."""
    try:
        return _bounded_side(*size_of(), max_side)
    except files.UnusableFile as e:
        raise DecodeError(e.reason) from None
    except Exception:
        decode()  # raises the DecodeError that says why
        raise DecodeError("cannot read the image header") from None


def _header_of(path: str) -> tuple[int, int]:
    with files.open_regular(path, "image", None) as f, Image.open(f) as im:
        return im.size


def feature_image(path: str, max_pixels: int, params: Extraction = SIFT) -> Decoded:
    """The image a file's features are detected in (`Decoded`: RGB pixels, sha256), decoded
    as for indexing (header limits, EXIF orientation, RGB), whole, its longer side at most
    `max_side` (a strip longer than 3:1 is cut to 3:1, as the decoder cuts it): the
    picture the explain view draws the points on."""
    side = _side(lambda: _header_of(path), lambda: decode_file(path, max_pixels), params.max_side)
    return decode_file(path, max_pixels, size=side, crop=False)


def file_features(path: str, max_pixels: int, params: Extraction = SIFT) -> tuple[Features, str]:
    """Features of an image file (in `feature_image`'s pixels) and the sha256 of the bytes
    they came from; DecodeError (one line) if it cannot be used."""
    decoded = feature_image(path, max_pixels, params)
    return extract(decoded.pixels, params), decoded.sha256


def bytes_image(data: bytes, max_pixels: int, params: Extraction = SIFT) -> Decoded:
    """An upload's bytes decoded as `feature_image` decodes a file."""

    def header() -> tuple[int, int]:
        with Image.open(io.BytesIO(data)) as im:
            return im.size

    side = _side(header, lambda: decode_bytes(data, max_pixels), params.max_side)
    return decode_bytes(data, max_pixels, size=side, crop=False)


def bytes_features(data: bytes, max_pixels: int, params: Extraction = SIFT) -> Features:
    """Features of an uploaded image's bytes (a query), as `file_features` decodes a file."""
    return extract(bytes_image(data, max_pixels, params).pixels, params)


def query_features(
    query: str | bytes | np.ndarray, max_pixels: int, params: Extraction = SIFT
) -> Features:
    """A query's features from a file path, an upload's bytes, or RGB pixels (h, w, 3) of
    any size (bounded to `max_side` here); DecodeError (one line) if it cannot be used."""
    if isinstance(query, str):
        return file_features(query, max_pixels, params)[0]
    if isinstance(query, bytes):
        return bytes_features(query, max_pixels, params)
    h, w = query.shape[:2]
    if max(h, w) > params.max_side:
        s = params.max_side / max(h, w)
        query = cv2.resize(query, (round(w * s), round(h * s)), interpolation=cv2.INTER_AREA)
    return extract(query, params)


class FeatureCache:
    """Features of indexed images, computed from their files on demand, at most
    `max_items` kept (least recently used dropped first), keyed by id and sha256.

    `features(id, row)` takes the image's catalog row (path, size, mtime, sha256, as
    `reads.details` gives it): a file whose size or mtime differ from the row is decoded
    again and its sha256 compared, and one whose bytes changed is not used (None, with a
    line in `notices`) — it is no longer the image that was indexed.

    Memory: at most `max_features` x 136 bytes an image (SIFT), 136 KB at 1,000; the
    default 2,000 images (the top 50 of 40 queries that share no candidate) hold at
    most 272 MB.
    """

    def __init__(
        self, max_items: int = 2000, max_pixels: int = 40_000_000, params: Extraction = SIFT
    ):
        self.max_items, self.max_pixels, self.params = max_items, max_pixels, params
        self._items: OrderedDict[tuple[int, str], Features] = OrderedDict()
        self._lock = threading.Lock()  # check_candidates may call from a thread pool
        self.notices: deque[str] = deque(maxlen=100)  # the latest, when no list is given

    def __len__(self) -> int:
        return len(self._items)

    def _unchanged_stat(self, row: dict[str, Any]) -> bool:
        try:
            st = os.stat(row["path"])
        except OSError:
            return False
        return st.st_size == row["size"] and st.st_mtime == row["mtime"]

    def features(
        self, image_id: int, row: dict[str, Any], notices: list[str] | None = None
    ) -> Features | None:
        """The image's features, or None (with a line in `notices`, else in
        `self.notices`) when its file cannot be used or is no longer the indexed image."""
        key = (int(image_id), str(row["sha256"]))
        if self._unchanged_stat(row):
            with self._lock:
                if key in self._items:
                    self._items.move_to_end(key)
                    return self._items[key]
        try:
            feats, sha = file_features(row["path"], self.max_pixels, self.params)
        except DecodeError as e:
            return self._notice(f"{row['path']}: not verified, {e}", notices)
        if sha != row["sha256"]:
            why = "it changed since it was indexed"
            return self._notice(f"{row['path']}: not verified, {why}", notices)
        with self._lock:
            self._items[key] = feats
            self._items.move_to_end(key)
            while len(self._items) > self.max_items:
                self._items.popitem(last=False)
        return feats

    def _notice(self, line: str, notices: list[str] | None) -> None:
        with self._lock:
            (self.notices if notices is None else notices).append(line)

    def source(
        self, rows: dict[int, dict[str, Any]], notices: list[str] | None = None
    ) -> Callable[[int], Features | None]:
        """`features_of` for `verify_rerank`, over the catalog rows of the candidates
        (`reads.details`); a query's own `notices` list keeps its lines apart from other
        queries' (a server's threads share one cache)."""
        return lambda image_id: (
            self.features(image_id, rows[image_id], notices) if image_id in rows else None
        )
