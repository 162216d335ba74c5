"""Near-duplicate groups: a thresholded similarity graph, cut into groups around centres.

Pairs of images whose cosine is at least a threshold come from FAISS range search
(exact: an inner-product flat index over the stored vectors, queried in blocks; or an
IVF index the collection already has, whose candidate pairs are then re-scored
exactly). Connected components of that graph would chain unrelated photos through
long paths (A like B like C ... like Z), so a component is cut into groups around
centres instead: the image with the most neighbours becomes a centre, its unassigned
neighbours join it, and so on. Every member is within the threshold of its centre,
so two members are at most twice that angle apart, and each image is in at most one
group. Which groups are reported, and their kind (same bytes, near-identical, similar
shot), is `find_groups`' job; nothing here reads the catalog or runs a model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import faiss
import numpy as np

KINDS = ("exact", "near", "similar")
# Default cosine thresholds, measured by `cbir bench duplicates` (docs/benchmarks.md,
# "Near-duplicates"): each is the best F0.5 of its sweep (no threshold reaches precision
# 0.99 at recall 0.90). NEAR, the same photo edited: pair precision 0.91, recall 0.65
# over 12 edit kinds (0.96 over resize, JPEG q30 and q95, crop, flip, colour and
# screenshot; rotation by 90, blur, borders, watermarks and small rotations are mostly
# missed). SIMILAR, the same scene taken again: UKBench pair precision 1.00, recall 0.52.
NEAR = 0.92
SIMILAR = 0.86
QUERY_BLOCK = 2048  # queries per range search (the result lists of a block stay small)
# An approximate index scores candidate pairs inexactly (PQ codes): its range search
# asks for this much lower a cosine, and the exact cosine decides.
CANDIDATE_MARGIN = 0.05
# Identical unit vectors score a hair under 1 in float32 (1 - 4e-7 measured at 2048-d),
# so a cosine from here up counts as 1: a threshold of 1 then finds identical vectors.
ONE = 1.0 - 1e-5


@dataclass(frozen=True)
class Pairs:
    """Image pairs (a < b, by id) with their exact cosine, all at least `threshold`."""

    a: np.ndarray
    b: np.ndarray
    score: np.ndarray
    threshold: float

    def at_least(self, threshold: float) -> Pairs:
        keep = self.score >= threshold
        return Pairs(self.a[keep], self.b[keep], self.score[keep], threshold)

    def without(self, ids: np.ndarray) -> Pairs:
        keep = ~(np.isin(self.a, ids) | np.isin(self.b, ids))
        return Pairs(self.a[keep], self.b[keep], self.score[keep], self.threshold)


@dataclass(frozen=True)
class Group:
    """One group: its kind, its centre first, and each member's cosine to the centre."""

    kind: str
    ids: tuple[int, ...]
    scores: tuple[float, ...]

    @property
    def centre(self) -> int:
        return self.ids[0]


def _pairs_from(
    lims: np.ndarray, found: np.ndarray, query_ids: np.ndarray, index_ids: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """(query id, found id) of every result of one range search block."""
    a = np.repeat(query_ids, np.diff(lims.astype(np.int64)))
    b = found if index_ids is None else index_ids[found]
    return a, b


def snapped(score: np.ndarray) -> np.ndarray:
    """Cosines as float32, those within float rounding of 1 (`ONE`) made exactly 1."""
    score = np.asarray(score, dtype=np.float32)
    return np.where(score >= ONE, np.float32(1.0), score)


def _keep(a: np.ndarray, b: np.ndarray, score: np.ndarray, threshold: float):
    """Each unordered pair once (a < b), at least `threshold`."""
    keep = (a < b) & (score >= threshold)
    return a[keep], b[keep], score[keep]


def exact_pairs(
    rows: Callable[[np.ndarray], np.ndarray],
    ids: np.ndarray,
    threshold: float,
    progress: Callable[[int], None] | None = None,
) -> Pairs:
    """Every pair among `ids` with cosine >= threshold, by exact range search.

    `rows(ids)` gives the unit vectors of ids (checked by the caller). The flat index
    holds every vector once (n x d floats in memory); queries go in blocks.
    """
    ids = np.asarray(ids, dtype=np.int64)
    parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    if len(ids) < 2:
        return Pairs(*(np.empty(0, t) for t in (np.int64, np.int64, np.float32)), threshold)
    first = np.ascontiguousarray(rows(ids[:1]), dtype=np.float32)
    index = faiss.IndexFlatIP(first.shape[1])
    for start in range(0, len(ids), QUERY_BLOCK):
        index.add(np.ascontiguousarray(rows(ids[start : start + QUERY_BLOCK]), dtype=np.float32))
    # FAISS keeps results with a score above the radius: a hair below the threshold (and
    # below `ONE`, which counts as 1), and the threshold itself decides.
    radius = min(float(threshold), ONE) - 1e-6
    for start in range(0, len(ids), QUERY_BLOCK):
        block = ids[start : start + QUERY_BLOCK]
        lims, score, found = index.range_search(
            np.ascontiguousarray(rows(block), dtype=np.float32), radius
        )
        a, b = _pairs_from(lims, found, block, ids)
        parts.append(_keep(a, b, snapped(score), threshold))
        if progress:
            progress(len(block))
    return _joined(parts, threshold)


def index_pairs(
    index: faiss.Index,
    rows: Callable[[np.ndarray], np.ndarray],
    ids: np.ndarray,
    threshold: float,
    progress: Callable[[int], None] | None = None,
) -> Pairs:
    """Pairs with cosine >= threshold among `ids`, candidates from an index's range
    search (its own ids), each re-scored exactly from the stored vectors. The index may
    miss pairs (an IVF probes some lists): `pair_recall` measures how many. A pair found
    from either of its ends counts (an IVF probes the lists near the query: b may be
    found from a and not a from b)."""
    ids = np.asarray(ids, dtype=np.int64)
    parts = []
    radius = float(threshold) - CANDIDATE_MARGIN
    for start in range(0, len(ids), QUERY_BLOCK):
        block = ids[start : start + QUERY_BLOCK]
        q = np.ascontiguousarray(rows(block), dtype=np.float32)
        lims, _, found = index.range_search(q, radius)
        a, b = _pairs_from(lims, found, block, None)
        keep = (a != b) & np.isin(b, ids)
        a, b = np.minimum(a[keep], b[keep]), np.maximum(a[keep], b[keep])
        if len(a):
            score = _cosines(rows, a, b)
            parts.append(_keep(a, b, score, threshold))
        if progress:
            progress(len(block))
    return _joined(parts, threshold)


def _cosines(rows: Callable[[np.ndarray], np.ndarray], a: np.ndarray, b: np.ndarray):
    """Exact cosine of each pair (unit vectors), computed over each distinct id once."""
    distinct, where = np.unique(np.concatenate([a, b]), return_inverse=True)
    vecs = rows(distinct)
    va, vb = vecs[where[: len(a)]], vecs[where[len(a) :]]
    return snapped(np.einsum("ij,ij->i", va, vb))


def _joined(parts, threshold: float) -> Pairs:
    if not parts:
        return Pairs(*(np.empty(0, t) for t in (np.int64, np.int64, np.float32)), threshold)
    a, b, s = (np.concatenate(x) for x in zip(*parts, strict=True))
    order = np.lexsort((b, a))
    a, b, s = a[order], b[order], s[order]
    # A pair found from both its ends (index_pairs) is kept once.
    first = np.ones(len(a), dtype=bool)
    first[1:] = (a[1:] != a[:-1]) | (b[1:] != b[:-1])
    return Pairs(a[first], b[first], s[first].astype(np.float32), threshold)


def pair_recall(found: Pairs, reference: Pairs, sample: np.ndarray) -> float | None:
    """Share of the exact pairs touching the `sample` ids that `found` also has."""
    touch = np.isin(reference.a, sample) | np.isin(reference.b, sample)
    want = set(zip(reference.a[touch].tolist(), reference.b[touch].tolist(), strict=True))
    if not want:
        return None
    have = set(zip(found.a.tolist(), found.b.tolist(), strict=True))
    return len(want & have) / len(want)


def centred_groups(pairs: Pairs) -> list[tuple[tuple[int, ...], tuple[float, ...]]]:
    """Cut the graph of `pairs` into groups around centres (see the module docstring).

    Centres are taken by most neighbours, then by the highest summed cosine, then by
    lowest id, so the result does not depend on the order of the pairs. Members follow
    their centre by cosine (highest first), then id.
    """
    neighbours: dict[int, dict[int, float]] = {}
    for a, b, s in zip(pairs.a.tolist(), pairs.b.tolist(), pairs.score.tolist(), strict=True):
        neighbours.setdefault(a, {})[b] = s
        neighbours.setdefault(b, {})[a] = s
    order = sorted(neighbours, key=lambda i: (-len(neighbours[i]), -sum(neighbours[i].values()), i))
    taken: set[int] = set()
    groups = []
    for centre in order:
        if centre in taken:
            continue
        members = sorted(
            ((n, s) for n, s in neighbours[centre].items() if n not in taken),
            key=lambda m: (-m[1], m[0]),
        )
        if not members:
            continue
        taken.add(centre)
        taken.update(n for n, _ in members)
        groups.append(((centre, *(n for n, _ in members)), (1.0, *(s for _, s in members))))
    return groups


def _same_bytes(ids: np.ndarray, sha256: dict[int, str]) -> list[Group]:
    """Groups of files with the same bytes (the same sha256), lowest id first."""
    by_sha: dict[str, list[int]] = {}
    for i in ids.tolist():
        if sha256.get(i):
            by_sha.setdefault(sha256[i], []).append(i)
    groups = [sorted(m) for m in by_sha.values() if len(m) > 1]
    return [Group("exact", tuple(m), (1.0,) * len(m)) for m in sorted(groups)]


def find_groups(
    ids: np.ndarray,
    sha256: dict[int, str],
    pairs: Pairs | None,
    include: tuple[str, ...] = ("exact", "near"),
    near: float = NEAR,
    similar: float = SIMILAR,
) -> list[Group]:
    """The groups of the kinds in `include`, each image in at most one.

    near: a group around a centre at cosine >= `near`, reported as `exact` when all its
    files have the same bytes (and only then, when `exact` is asked for). exact without
    near: files with the same sha256, no vectors needed. similar: groups at cosine >=
    `similar` among the images no other group took (a same-bytes group left out because
    `exact` was not asked for still takes its images: they are not similar shots).
    `pairs` must hold every pair at the lowest threshold asked for (None when only
    `exact` is).
    """
    ids = np.asarray(ids, dtype=np.int64)
    out: list[Group] = []
    found: list[Group] = []  # every group found, asked for or not: their images are taken
    if "near" in include:
        assert pairs is not None
        for members, scores in centred_groups(pairs.at_least(near)):
            same = sha256.get(members[0]) and len({sha256.get(i) for i in members}) == 1
            found.append(Group("exact" if same else "near", members, scores))
        out = [g for g in found if g.kind in include]
    elif "exact" in include:
        found = _same_bytes(ids, sha256)
        out = list(found)
    if "similar" in include:
        assert pairs is not None
        taken = np.asarray([i for g in found for i in g.ids], dtype=np.int64)
        rest = pairs.at_least(similar).without(taken)
        out.extend(Group("similar", m, s) for m, s in centred_groups(rest))
    return out
