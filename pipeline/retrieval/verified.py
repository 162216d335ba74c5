"""`--rerank verify` on a first pass's results: the query's local features, the top
`verify_n` candidates checked (`verify.verify_rerank`), and the results re-ordered.

`ranking` works on vectors only; verification needs the query's image and the
candidates' files, so it runs after the first pass (and after DBA / query expansion
and the merge of rotations: on their final order). The first pass fetches
max(k, verify_n) results (`first_k`), so a verified image from below k can move
into the top k; what was left out by a filter or `min_score` stays out.

What the results show: each `score` stays the true cosine of the first pass (so
"scores are cosines" and `min_score` keep their meaning); the order is the verified
one (cosine + a bonus for inliers above the floor, `verify.score`); each checked
result gets "inliers" (matches that agree on one homography) and "verified" (true
when they are enough to move it). Results past verify_n keep their first-pass order
and get neither. A candidate whose file changed since it was indexed, or cannot be
read, is not verified (it keeps its cosine), with a line in the answer's notices.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

from pipeline.config import Settings
from pipeline.inputs.decode import DecodeError
from pipeline.retrieval import local_features, verify
from pipeline.retrieval.local_features import FeatureCache, Features
from pipeline.specs import parse_rerank
from pipeline.store import reads

CACHE_ITEMS = 2000  # features of indexed images kept (~136 KB each at most)

# A query's image: a file path, an upload's bytes, RGB pixels, or an indexed id (its file).
Source = str | bytes | np.ndarray | int


def wanted(settings: Settings) -> bool:
    """Whether the settings' re-ranking ends with local-feature verification."""
    return "verify" in parse_rerank(settings.rerank)


def first_k(settings: Settings) -> int:
    """How many results the first pass must return: k, or verify_n if more when verifying."""
    return max(settings.k, settings.verify_n) if wanted(settings) else settings.k


def new_cache(settings: Settings) -> FeatureCache:
    """A cache of indexed images' features, decoded within the settings' pixel limit."""
    return FeatureCache(CACHE_ITEMS, settings.max_pixels, verify.DEFAULT)


_SHARED: dict[int, FeatureCache] = {}
_SHARED_LOCK = threading.Lock()


def shared_cache(settings: Settings) -> FeatureCache:
    """The process's cache (one per pixel limit), for searches made one call at a time
    (`pipeline.search` in a loop gains ~4x from the second query on). Its keys are id and
    sha256, so catalogs searched by one process cannot mix: the same key is the same bytes."""
    with _SHARED_LOCK:
        if settings.max_pixels not in _SHARED:
            _SHARED[settings.max_pixels] = new_cache(settings)
        return _SHARED[settings.max_pixels]


def query_features(
    db, source: Source, name: str, cache: FeatureCache, notices: list[str]
) -> Features | None:
    """The query's features, or None with a line in `notices` when they cannot be had
    (an id's file changed since indexing, an image that cannot be decoded again)."""
    if isinstance(source, int | np.integer):
        row = reads.details(db, [int(source)]).get(int(source))
        if row is None:
            notices.append(f"query {name}: not verified, it is no longer in the catalog")
            return None
        return cache.features(int(source), row, notices)
    try:
        return local_features.query_features(source, cache.max_pixels, cache.params)
    except DecodeError as e:
        notices.append(f"query {name}: not verified, {e}")
        return None


def rerank_ranking(
    db,
    source: Source,
    name: str,
    ids: np.ndarray,
    cosines: np.ndarray,
    settings: Settings,
    cache: FeatureCache,
    notices: list[str],
) -> tuple[np.ndarray, np.ndarray, dict[int, verify.Verification]]:
    """A first-pass ranking (`ids`, their `cosines`, best first) with its top verify_n
    re-ordered by verification: (ids, their cosines in the new order, the checks by id).
    The ranking unchanged, and no checks, when the query's features cannot be had."""
    ids, cosines = np.asarray(ids, np.int64), np.asarray(cosines, np.float32)
    q = query_features(db, source, name, cache, notices) if len(ids) else None
    if q is None:
        return ids, cosines, {}
    n = settings.verify_n
    rows = reads.details(db, ids[:n])
    done = verify.verify_rerank(
        q, ids, cosines, cache.source(rows, notices), top_n=n, params=cache.params
    )
    cosine_of = dict(zip(ids[:n].tolist(), cosines[:n].tolist(), strict=True))
    head = np.array([cosine_of[i] for i in done.ids[:n].tolist()], np.float32)
    return done.ids, np.concatenate([head, cosines[n:]]), done.checks


def rerank_results(
    db,
    source: Source,
    name: str,
    results: list[dict[str, Any]],
    settings: Settings,
    cache: FeatureCache,
    notices: list[str],
) -> list[dict[str, Any]]:
    """The first pass's results (best first, `first_k` of them) re-ordered by verification
    of the top verify_n, cut to k and ranked again from 1 (see the module's docstring)."""
    ids = np.array([r["id"] for r in results], dtype=np.int64)
    cosines = np.array([r["score"] for r in results], dtype=np.float32)
    new_ids, _, checks = rerank_ranking(db, source, name, ids, cosines, settings, cache, notices)
    by_id = {r["id"]: r for r in results}
    out = []
    for i in new_ids[: settings.k].tolist():
        r = dict(by_id[i])  # its score stays the first pass's cosine
        if i in checks:
            r["inliers"] = checks[i].inliers
            r["verified"] = checks[i].inliers > cache.params.floor  # it earned a bonus
        out.append(r)
    return _ranked(out)


def _ranked(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{**r, "rank": rank} for rank, r in enumerate(results, start=1)]
