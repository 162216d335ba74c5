"""Local-feature verification of a shortlist (`--rerank verify`): matches, RANSAC, the
score that re-ranks, and the re-ranking itself (the features: `local_features`).

A global vector says two images look alike; matched local features that agree on one
geometric model say they show the same thing. For a query and each of the top N
candidates of the first pass: OpenCV SIFT keypoints (at most `max_features`, on the
image decoded with its longer side at most `max_side`), matched with Lowe's ratio
test (each candidate point used once), then a homography fitted by RANSAC; its
inliers are the evidence. The score is the cosine plus a bonus that grows with the
inliers above 7 (what chance matches of unrelated images rarely pass) and stops growing
at 12 (`score`): a verified candidate moves up; an unrelated one, with a few chance
inliers at most, and one that cannot be checked keep their cosines. Every choice (detector, size, matcher, model,
score) was measured on Holidays-150 and UKBench-1000: docs/benchmarks.md, "Local-feature
verification (issue 21)".

Features of indexed images come from `local_features.FeatureCache` (on demand from
the files, bounded, a changed file left unverified). `Verification` keeps the matched points, inliers and rejected, and the model, for the
explain view to draw.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np

from pipeline.errors import CbirError
from pipeline.retrieval.local_features import Extraction, Features, check_range

GEOMETRIES = ("homography", "fundamental")
# Robust estimators: OpenCV's classic RANSAC, or its USAC framework with MAGSAC++
# scoring (measured: as many inliers on true pairs, fewer on unrelated ones, about a third
# of the time on a pair that does not match).
ESTIMATORS = {"ransac": cv2.RANSAC, "magsac": cv2.USAC_MAGSAC}
# RANSAC stops early once a model explains enough matches; a pair of unrelated images
# runs every iteration, so the bound is what a non-match costs.
RANSAC_ITERATIONS = 1000


@dataclass(frozen=True)
class Params(Extraction):
    """How to verify: the features (`Extraction`), matching, the model and the score. The
    defaults are the measured choice (docs/benchmarks.md)."""

    ratio: float = 0.8  # Lowe's ratio test: best match closer than ratio x second best
    geometry: str = "homography"
    estimator: str = "magsac"
    reproj_px: float = 6.0  # RANSAC inlier distance, pixels of the max_side image
    # Chance inliers: 0.6% of unrelated Holidays pairs have more than 6, 0.09% more than
    # 7 (67% of the related ones do). Each inlier above 7 adds 0.1 of cosine, up to 0.5
    # at 12. Measured on Holidays, UKBench and Corel: docs/benchmarks.md.
    floor: int = 7
    cap: int = 5  # inliers above the floor at which the bonus is full
    weight: float = 0.5  # the full bonus, in units of cosine

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.geometry not in GEOMETRIES:
            raise CbirError(f"geometry {self.geometry!r}: use {', '.join(GEOMETRIES)}")
        if self.estimator not in ESTIMATORS:
            raise CbirError(f"estimator {self.estimator!r}: use {', '.join(ESTIMATORS)}")
        check_range(self, _RANGES)

    def replace(self, **changes: Any) -> Params:
        """These parameters with some changed (None: keep), checked."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})


_RANGES = (
    ("ratio", 0.1, 1.0),
    ("reproj_px", 0.1, 100.0),
    ("floor", 0, 1000),
    ("cap", 1, 1000),
    ("weight", 0.0, 10.0),
)
DEFAULT = Params()


@dataclass(frozen=True)
class Verification:
    """One query-candidate check: the matches that passed the ratio test (query points,
    candidate points, which are RANSAC inliers) and the model mapping query points to
    candidate points (a 3x3 homography or fundamental matrix; None if none was found)."""

    inliers: int
    model: np.ndarray | None
    geometry: str
    query_points: np.ndarray  # (m, 2) float32
    candidate_points: np.ndarray  # (m, 2) float32
    inlier_mask: np.ndarray  # (m,) bool

    def region(self, query_size: tuple[int, int]) -> np.ndarray | None:
        """The query's frame mapped into the candidate by the homography: (4, 2) corners,
        the region to outline on the result; None without a homography."""
        if self.model is None or self.geometry != "homography":
            return None
        w, h = query_size
        corners = np.float32([[0, 0], [w, 0], [w, h], [0, h]]).reshape(-1, 1, 2)
        return cv2.perspectiveTransform(corners, self.model).reshape(-1, 2)


def _norm(detector: str) -> int:
    return cv2.NORM_L2 if detector == "sift" else cv2.NORM_HAMMING


def match(
    query: Features, candidate: Features, params: Params = DEFAULT, at_least: int = 0
) -> Verification:
    """Ratio-test matches of the query's features in the candidate's, then RANSAC.

    `at_least`: with no more matches than that, no model is fitted (inliers 0): the
    re-ranking passes its floor, since fewer inliers than the floor change no score,
    and RANSAC over a few random matches is the slowest case (every iteration runs).
    """
    empty = np.zeros((0, 2), np.float32)
    none = Verification(0, None, params.geometry, empty, empty, np.zeros(0, bool))
    if len(query.descriptors) < 2 or len(candidate.descriptors) < 2:
        return none
    qd, cd = query.descriptors, candidate.descriptors
    if query.detector == "sift":  # BFMatcher's L2 wants float
        qd, cd = qd.astype(np.float32), cd.astype(np.float32)
    pairs = cv2.BFMatcher(_norm(query.detector)).knnMatch(qd, cd, k=2)
    good: dict[int, tuple[float, int]] = {}  # candidate point -> (distance, query point)
    for p in pairs:
        if len(p) == 2 and p[0].distance < params.ratio * p[1].distance:
            m = p[0]
            # Each candidate point once (its best match): repeated texture must not
            # pile many query points onto one point and look like agreement.
            if m.trainIdx not in good or m.distance < good[m.trainIdx][0]:
                good[m.trainIdx] = (m.distance, m.queryIdx)
    if not good:
        return none
    c_idx = np.fromiter(good, np.int64, len(good))
    q_idx = np.fromiter((good[c][1] for c in good), np.int64, len(good))
    qp, cp = query.points[q_idx], candidate.points[c_idx]
    need = 4 if params.geometry == "homography" else 8
    if len(qp) < need or len(qp) <= at_least:
        return Verification(0, None, params.geometry, qp, cp, np.zeros(len(qp), bool))
    model, mask = _fit(qp, cp, params)
    mask = np.zeros(len(qp), bool) if mask is None else mask.ravel().astype(bool)
    return Verification(int(mask.sum()), model, params.geometry, qp, cp, mask)


def _fit(qp: np.ndarray, cp: np.ndarray, params: Params) -> tuple[Any, Any]:
    """The robust fit: (model, inlier mask), or (None, None) where OpenCV finds none."""
    method = ESTIMATORS[params.estimator]
    try:
        if params.geometry == "homography":
            return cv2.findHomography(qp, cp, method, params.reproj_px, maxIters=RANSAC_ITERATIONS)
        model, mask = cv2.findFundamentalMat(
            qp, cp, method, params.reproj_px, 0.99, RANSAC_ITERATIONS
        )
    except cv2.error:
        # USAC asserts on some degenerate point sets (seen with MAGSAC on a fundamental
        # matrix): no model, as when RANSAC finds none; never a failed search.
        return None, None
    if model is not None and model.shape != (3, 3):  # several solutions: take the first
        model = model[:3]
    return model, mask


def score(cosine: float, inliers: int, params: Params = DEFAULT) -> float:
    """The re-ranking score: the cosine plus `weight` x the share of `cap` inliers above
    `floor` (at most 1). Below the floor a candidate keeps its cosine; at floor + cap it
    gains `weight`, enough to pass nearly any unverified candidate of a shortlist."""
    above = max(0, inliers - params.floor)
    return float(cosine) + params.weight * min(above, params.cap) / params.cap


@dataclass
class Reranked:
    """`verify_rerank`'s answer: ids and scores, best first (the top N by `score`, the rest
    in their first-pass order with their cosines), the verification of each checked
    candidate, and the ids that could not be checked (changed or unreadable files)."""

    ids: np.ndarray
    scores: np.ndarray
    checks: dict[int, Verification] = field(default_factory=dict)
    skipped: list[int] = field(default_factory=list)


def check_candidates(
    query_features: Features,
    ids: Sequence[int],
    features_of: Callable[[int], Features | None],
    params: Params = DEFAULT,
    workers: int = 1,
) -> tuple[dict[int, Verification], list[int]]:
    """Verify each candidate against the query: ({id: Verification}, ids skipped because
    `features_of` gave None). `workers` > 1 matches in a thread pool (OpenCV releases
    the GIL while it matches and fits)."""

    def one(cid: int) -> tuple[int, Verification | None]:
        feats = features_of(cid)
        if feats is None:
            return cid, None
        return cid, match(query_features, feats, params, at_least=params.floor)

    ids = [int(i) for i in ids]
    if workers > 1 and len(ids) > 1:
        with ThreadPoolExecutor(min(workers, len(ids))) as pool:
            done = list(pool.map(one, ids))
    else:
        done = [one(i) for i in ids]
    checks = {cid: v for cid, v in done if v is not None}
    return checks, [cid for cid, v in done if v is None]


def reordered(
    ids: Sequence[int] | np.ndarray,
    cosines: Sequence[float] | np.ndarray,
    inliers: dict[int, int],
    top_n: int,
    params: Params = DEFAULT,
) -> tuple[np.ndarray, np.ndarray]:
    """The first `top_n` of a ranking (`ids`, `cosines`, best first) sorted by `score` (an id
    missing from `inliers` keeps its cosine), ties in first-pass order; the rest after them,
    unchanged. Returns (ids, scores)."""
    ids = np.asarray(ids, dtype=np.int64)
    cosines = np.asarray(cosines, dtype=np.float32)
    head = ids[:top_n]
    scores = np.array(
        [score(c, inliers.get(int(i), 0), params) for i, c in zip(head, cosines, strict=False)]
    )
    order = np.lexsort((np.arange(len(head)), -scores))  # score desc, first-pass order on ties
    return (
        np.concatenate([head[order], ids[top_n:]]),
        np.concatenate([scores[order].astype(np.float32), cosines[top_n:]]),
    )


def verify_rerank(
    query_features: Features,
    ids: Sequence[int] | np.ndarray,
    cosines: Sequence[float] | np.ndarray,
    features_of: Callable[[int], Features | None],
    top_n: int,
    params: Params = DEFAULT,
    workers: int = 1,
) -> Reranked:
    """Re-rank the first `top_n` of a first-pass ranking (`ids`, `cosines`, best first) by
    `score`; the others keep their order after them. `features_of(id)` gives a candidate's
    features, or None when it cannot be verified (it then keeps its cosine as its score)."""
    checks, skipped = check_candidates(
        query_features, list(np.asarray(ids)[:top_n]), features_of, params, workers
    )
    new_ids, new_scores = reordered(
        ids, cosines, {i: v.inliers for i, v in checks.items()}, top_n, params
    )
    return Reranked(new_ids, new_scores, checks, skipped)
