"""The one search interface: query vectors in, ranked results out, whatever the index.

Approximate indexes return candidates; their scores are then recomputed from
the stored vectors, so every score printed is a true cosine similarity and
exact and approximate results have the same meaning as well as the same shape.

For a whitened index (`whitening`) the scores are cosines in its whitened
space: its transform is applied to the stored candidates and the query.

Re-ranking (database-side augmentation, alpha query expansion, relevance
feedback) happens here too, on a shortlist of candidates, so it works with
every index and is the same code that `cbir evaluate` measures.

A candidate whose stored vector fails its checksum (`damaged`) is treated as
missing: the index is searched deeper by as many as were found, so the ranking
is the one the collection would give without them.

A search filter (`within`: the index searched among the filter's ids only,
`restricted.Restricted`) applies to the candidates; DBA's neighbours are the
collection's, as without a filter (an image's augmented vector is the same
whatever the query). A score cut-off (`min_score`) drops the results below it,
after re-ranking.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import faiss
import numpy as np

from pipeline.config import Settings
from pipeline.errors import CbirError
from pipeline.retrieval import rerank, whitening
from pipeline.retrieval.restricted import Restricted
from pipeline.specs import VECTOR_RERANK, parse_rerank
from pipeline.store import reads

_DEFAULT = Settings()

Lookup = Callable[[np.ndarray], np.ndarray]  # ids -> (len(ids), d) stored vectors
# ids -> the sorted ids among them whose stored vector is damaged (Collection.damaged_among)
Damaged = Callable[[np.ndarray], np.ndarray]


class SearchIndex(Protocol):
    """What ranking needs of an index: FAISS indexes and exact.VectorFileExact both fit.

    `search` returns (scores, ids), each (queries, k), best first, ids -1 past the end.
    """

    ntotal: int

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]: ...


@dataclass(frozen=True)
class Rerank:
    """How to re-rank: which methods, how many neighbours, their weighting, the shortlist."""

    methods: tuple[str, ...] = ()
    n: int = _DEFAULT.rerank_n
    alpha: float = _DEFAULT.rerank_alpha
    shortlist: int = _DEFAULT.shortlist


def rerank_from(settings: Settings) -> Rerank:
    """The re-ranking of vectors that settings ask for (rerank, rerank_n, rerank_alpha,
    shortlist); "verify" needs the images, and is done on these results (`verified`)."""
    return Rerank(
        methods=tuple(m for m in parse_rerank(settings.rerank) if m in VECTOR_RERANK),
        n=settings.rerank_n,
        alpha=settings.rerank_alpha,
        shortlist=settings.shortlist,
    )


def ranked(
    index: SearchIndex,
    lookup: Lookup,
    queries: np.ndarray,
    k: int,
    how: Rerank = Rerank(),
    refine: int = 1,
    damaged: Damaged | None = None,
    within: Restricted | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(ids, scores), each (q, <=k), best first, -1 padded.

    `damaged` names the candidates whose stored vectors fail their checksum: they
    are left out of the results and of re-ranking, as if they were not indexed.
    `within` (`index` restricted to a filter's ids) gives the candidates instead.

    Scores are recomputed from the stored vectors: exact cosines of query and
    image. With re-ranking they are the cosines between the expanded query and
    the augmented image vectors, the similarity the ranking actually used.

    With re-ranking, the first pass takes `shortlist` candidates; DBA replaces
    each candidate by the weighted mean of its own nearest neighbours, and
    alpha-QE expands each query with its best re-ranked candidates, before the
    shortlist is scored again.
    """
    if k < 1:  # settings are checked on entry; this guards direct callers
        raise CbirError(f"k must be at least 1, got {k}")
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    if len(queries) == 1:
        # One query gains nothing from OpenMP threads and, on a busy machine,
        # loses milliseconds to their start-up and spinning.
        with single_thread():
            return _ranked(index, lookup, queries, k, how, refine, damaged, within)
    return _ranked(index, lookup, queries, k, how, refine, damaged, within)


@contextmanager
def single_thread():
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def _search(
    index: SearchIndex, x: np.ndarray, k: int, ntotal: int, damaged: Damaged | None
) -> np.ndarray:
    """The ids of the top k of each row of `x` (-1 padded), damaged ones left out: the
    index is searched again, deeper by the damaged ones found, until k good ones remain."""
    skip = np.zeros(0, dtype=np.int64)
    while True:
        depth = min(k + len(skip), ntotal)
        _, got = index.search(x, depth)
        if damaged is None:
            return got
        new = np.setdiff1d(damaged(got[got >= 0]), skip)
        skip = np.union1d(skip, new)
        if not len(new) or depth == ntotal:
            break
    if not len(skip):
        return got
    got = np.where(np.isin(got, skip), -1, got)
    order = np.argsort(got < 0, axis=1, kind="stable")  # good ones first, in their order
    return np.take_along_axis(got, order, axis=1)[:, :k]


def _ranked(index, lookup, queries, k, how, refine, damaged=None, within=None):
    searched = within if within is not None else index
    ntotal = int(searched.ntotal)
    # refine > 1: compressed indexes (PQ) return refine * k candidates, which the
    # exact re-scoring below puts in their true order.
    first_k = min(max(k * max(1, refine), how.shortlist if how.methods else 0), ntotal)
    if first_k == 0:
        return np.full((len(queries), 0), -1), np.zeros((len(queries), 0), np.float32)
    cand = _search(searched, queries, first_k, ntotal, damaged)
    found = np.unique(cand[cand >= 0])
    raw = lookup(found)
    # A whitened index scores in its whitened space: the exact scores below are
    # cosines of the transformed vectors (raw ones would undo the whitening).
    # The index itself is always searched with raw vectors; it transforms them.
    space = whitening.transform_of(index)
    if space is not None:
        queries = space(queries)
        lookup = _through(lookup, space)
    vecs = space(raw) if space is not None else raw
    if "dba" in how.methods:
        everything = int(index.ntotal)  # the collection's neighbours, filter or not
        nb = _search(index, raw, min(how.n, everything), everything, damaged)
        nb_flat = np.unique(nb[nb >= 0])
        nb_vecs = lookup(nb_flat)
        pos = np.searchsorted(nb_flat, np.where(nb >= 0, nb, nb_flat[0]))
        nb_scores = np.einsum("cd,cnd->cn", vecs, nb_vecs[pos]) * (nb >= 0)
        vecs = rerank.dba(nb_vecs, pos, nb_scores, how.alpha)
    ids_out = np.full((len(queries), min(k, first_k)), -1, dtype=np.int64)
    scores_out = np.zeros(ids_out.shape, dtype=np.float32)
    for qi, (q, row) in enumerate(zip(queries, cand, strict=True)):
        row = row[row >= 0]
        if how.methods:
            # Only the shortlist is re-ranked; anything after it keeps the first-pass
            # order, so evaluating a full ranking measures exactly what search returns.
            row, tail = row[: how.shortlist], row[how.shortlist :]
        else:
            tail = row[:0]
        cv = vecs[np.searchsorted(found, row)]
        s = cv @ q
        if "aqe" in how.methods and len(row):
            best = np.argsort(-s, kind="stable")[: how.n]
            q = rerank.alpha_qe(q[None, :], cv[best][None], s[best][None], how.alpha)[0]
            s = cv @ q
        order = np.lexsort((row, -s))  # score desc, then id asc on ties
        row, s = row[order], s[order]
        if len(tail):
            row = np.concatenate([row, tail])
            s = np.concatenate([s, vecs[np.searchsorted(found, tail)] @ q])
        n_out = min(ids_out.shape[1], len(row))
        ids_out[qi, :n_out] = row[:n_out]
        scores_out[qi, :n_out] = s[:n_out]
    return ids_out, scores_out


def best_over(ids: np.ndarray, scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """One query's rankings under several variants (rows of `ranked`'s ids and scores, -1
    padded), merged into one: each id once, with its best score over the variants, by
    score then id, at most `k`. Returns 1-d (ids, scores).

    Each variant's own top k is enough: an image in the merged top k is in the top k of
    the variant that gives it its best score.
    """
    ids, scores = np.ravel(ids), np.ravel(scores)
    ids, scores = ids[ids >= 0], scores[ids >= 0]
    order = np.lexsort((ids, -scores))  # best first, ties by id
    ids, scores = ids[order], scores[order]
    _, first = np.unique(ids, return_index=True)  # each id's best entry
    keep = np.sort(first)[:k]
    return ids[keep], scores[keep]


def merge_variants(
    ids: np.ndarray, scores: np.ndarray, groups: Sequence[int]
) -> tuple[np.ndarray, np.ndarray]:
    """`ranked`'s rows cut into consecutive groups (the variants of one query each), each
    merged by `best_over`: one row per group, the same width, -1 padded."""
    if sum(groups) != len(ids):
        raise ValueError(f"groups of {sum(groups)} rows for {len(ids)} rankings")
    width = ids.shape[1]
    ids_out = np.full((len(groups), width), -1, dtype=np.int64)
    scores_out = np.zeros((len(groups), width), dtype=np.float32)
    start = 0
    for qi, n in enumerate(groups):
        got, got_scores = best_over(ids[start : start + n], scores[start : start + n], width)
        ids_out[qi, : len(got)], scores_out[qi, : len(got)] = got, got_scores
        start += n
    return ids_out, scores_out


def _shown(score: float) -> float:
    """A score as results show it; the cut-off compares this, so a shown score equal to
    `min_score` is kept."""
    return round(float(score), 6)


def _through(lookup: Lookup, space: Callable[[np.ndarray], np.ndarray]) -> Lookup:
    return lambda ids: space(lookup(ids))


def search_vectors(
    coll,
    index: SearchIndex,
    queries: np.ndarray,
    k: int = 10,
    how: Rerank = Rerank(),
    refine: int = 1,
    groups: Sequence[int] | None = None,
    within: Restricted | None = None,
    min_score: float | None = None,
) -> list[list[dict[str, Any]]]:
    """Top-k results for each query vector, as lists of result dicts.

    Each result: rank (from 1), id, path, label, score (cosine similarity).
    `groups` (rows per query, e.g. a query's rotations) merges consecutive rows by
    `best_over`: one list per group. `within`: a filter (see `ranked`); `min_score`:
    results scoring below it are left out (the scores come out best first).
    """
    ids, scores = ranked(index, coll.vectors, queries, k, how, refine, coll.damaged_among, within)
    if groups is not None:
        ids, scores = merge_variants(ids, scores, groups)
    rows = reads.lookup(coll.db, np.unique(ids[ids >= 0]))
    results = []
    for id_row, score_row in zip(ids, scores, strict=True):
        results.append(
            [
                {
                    "rank": rank,
                    "id": int(i),
                    "path": rows[int(i)]["path"],
                    "label": rows[int(i)]["label"],
                    "score": _shown(s),
                }
                for rank, (i, s) in enumerate(zip(id_row, score_row, strict=True), start=1)
                if i >= 0 and int(i) in rows and (min_score is None or _shown(s) >= min_score)
            ]
        )
    return results
