"""An index searched among some ids only (a search filter), however the index is built.

`Restricted(index, allowed, lookup)` is a `ranking.SearchIndex` whose answers hold
only the `allowed` ids (`filters.matching`), so `ranking.ranked` searches inside
the filter: re-scoring, damaged rows, re-ranking and rotations work as without one,
and a filtered search returns k results whenever k images match. How, by index:

- exact search over the vector file (`exact.VectorFileExact`): the allowed ids only.
- few allowed ids (at most `SCAN_MAX`), any other index: their stored vectors are
  scored exactly (through a whitened index's transform), the best answer there is
  and cheaper than asking the index.
- FAISS indexes that take a selector (flat, IVF, HNSW, scalar quantizers, under
  IndexIDMap2 or a whitening's IndexPreTransform): `faiss.IDSelectorBitmap` in the
  search parameters. An IVF index searches the `nprobe` lists it is set to, and
  HNSW explores `efSearch` nodes (SearchParametersIVF / HNSW replace the index's
  own values, so they are copied in); when a query finds fewer than k allowed ids
  that way, it is searched again with 4x the lists or nodes, up to all lists or
  `EF_MAX` nodes.
- any other index (PQ, a refine wrapper): over-fetch, the top 4k, 16k, ... searched
  unfiltered and cut to the allowed ids, up to `OVERFETCH_MAX` candidates.

When a query still has fewer than k allowed ids (the last two ways), `short` is
set, and the caller tells it in one line: the exact index finds them all.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import faiss
import numpy as np

from pipeline.retrieval import exact, whitening

SCAN_MAX = 4096  # allowed ids scored directly: 4096 x 2048 floats is 32 MiB, a few ms
EF_MAX = 1 << 16  # as specs.SEARCH_PARAMS["efSearch"] allows
OVERFETCH_MAX = 32768  # candidates per query an unfiltered index is asked for, at most
GROWTH = 4
DENSE = 4  # the vector file's exact search masks its whole scan when over 1/4 of ids pass


def _cores(index: Any) -> tuple[Any, Any]:
    """(the IVF index, the HNSW index) inside `index`'s wrappers (IndexPreTransform,
    IndexIDMap2), each None when it is not one."""
    idx = faiss.downcast_index(index)
    if isinstance(idx, faiss.IndexPreTransform):
        idx = faiss.downcast_index(idx.index)
    if isinstance(idx, faiss.IndexIDMap | faiss.IndexIDMap2):
        idx = faiss.downcast_index(idx.index)
    return (
        idx if isinstance(idx, faiss.IndexIVF) else None,
        idx if isinstance(idx, faiss.IndexHNSW) else None,
    )


def _compact(scores: np.ndarray, ids: np.ndarray, keep: np.ndarray, k: int):
    """Each row's kept entries first, in their order, cut or padded (-1, -inf) to k."""
    ids = np.where(keep, ids, -1)
    scores = np.where(keep, scores, -np.inf).astype(np.float32)
    order = np.argsort(~keep, axis=1, kind="stable")
    ids, scores = (
        np.take_along_axis(ids, order, 1)[:, :k],
        np.take_along_axis(scores, order, 1)[:, :k],
    )
    if ids.shape[1] < k:
        pad = k - ids.shape[1]
        ids = np.hstack([ids, np.full((len(ids), pad), -1, np.int64)])
        scores = np.hstack([scores, np.full((len(ids), pad), -np.inf, np.float32)])
    return scores, ids


class Restricted:
    """`index` searched among `allowed` ids only (see the module docstring)."""

    def __init__(self, index: Any, allowed: np.ndarray, lookup: Callable[[np.ndarray], np.ndarray]):
        self.index, self.lookup = index, lookup
        allowed = np.asarray(allowed, dtype=np.int64)
        if len(allowed) > 1 and not (allowed[1:] > allowed[:-1]).all():  # sorted already: SQL's
            allowed = np.unique(allowed)
        self.allowed = allowed
        self.short = False  # a query found fewer than k allowed ids though more exist
        self._scan: np.ndarray | None = None  # the allowed ids' (transformed) vectors
        self._sel: Any = None  # the FAISS selector of the allowed ids
        self._bits: np.ndarray | None = None  # membership, one bool per id up to the largest
        self._space = whitening.transform_of(index)
        self.how = "scan"
        if isinstance(index, exact.VectorFileExact):
            self._keep = self._member(index.ids)
            self.allowed, self.how = index.ids[self._keep], "exact"
        elif len(self.allowed) > SCAN_MAX:
            self.how = "selector"
        self.ntotal = len(self.allowed)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if self.how == "exact":
            if len(self.allowed) * DENSE > len(self.index.ids):  # many: mask the whole scan
                return exact.top_k(self.index.rows, self.index.ids, queries, k, self._keep)
            return exact.top_k(self.index.rows, self.allowed, queries, k)
        if self.how == "scan":
            return self._scanned(queries, k)
        if self.how == "selector":
            try:
                return self._selected(queries, k)
            except RuntimeError as e:
                if "params" not in str(e):  # FAISS refuses search parameters it cannot use
                    raise
                self.how = "over-fetch"
        return self._overfetched(queries, k)

    def _scanned(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if self._scan is None:
            vecs = self.lookup(self.allowed)
            self._scan = self._space(vecs) if self._space is not None else vecs
        q = self._space(queries) if self._space is not None else queries
        scores, at = exact.top_k(self._scan, np.arange(len(self.allowed)), q, k)
        return scores, np.where(at >= 0, self.allowed[np.maximum(at, 0)], -1)

    def _member(self, ids: np.ndarray) -> np.ndarray:
        """Whether each of `ids` (-1: none) is allowed (faster than np.isin per search)."""
        if self._bits is None:
            self._bits = np.zeros(int(self.allowed[-1]) + 1 if len(self.allowed) else 1, bool)
            self._bits[self.allowed] = True
        inside = (ids >= 0) & (ids < len(self._bits))
        out = np.zeros(ids.shape, dtype=bool)
        out[inside] = self._bits[ids[inside]]
        return out

    def _selected(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if self._sel is None:  # one bit per id up to the largest: 125 KB per million ids
            self._member(np.zeros(0, dtype=np.int64))  # makes the membership bits
            bitmap = np.packbits(self._bits, bitorder="little")
            # faiss' wrapper keeps the array alive as long as the selector
            self._sel = faiss.IDSelectorBitmap(bitmap)
        sel = self._sel
        ivf, hnsw = _cores(self.index)
        if ivf is not None:
            effort, top = int(ivf.nprobe), int(ivf.nlist)
        elif hnsw is not None:
            effort, top = max(int(hnsw.hnsw.efSearch), k), max(EF_MAX, k)
        else:
            effort = top = 0  # exact: one search finds them all
        want = min(k, self.ntotal)
        while True:
            if ivf is not None:
                params: Any = faiss.SearchParametersIVF(sel=sel, nprobe=effort)
            elif hnsw is not None:
                params = faiss.SearchParametersHNSW(sel=sel, efSearch=effort)
            else:
                params = faiss.SearchParameters(sel=sel)
            scores, ids = self.index.search(queries, k, params=params)
            keep = self._member(ids)  # as the selector said: checked all the same
            if (keep.sum(axis=1) >= want).all() or effort >= top:
                break
            effort = min(effort * GROWTH, top)
        self.short |= bool((keep.sum(axis=1) < want).any())
        return _compact(scores, ids, keep, k)

    def _overfetched(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        cap = min(int(self.index.ntotal), max(OVERFETCH_MAX, GROWTH * k))
        want = min(k, self.ntotal)
        depth = min(max(GROWTH * k, 64), cap)
        while True:
            scores, ids = self.index.search(queries, depth)
            keep = self._member(ids)
            if (keep.sum(axis=1) >= want).all() or depth >= cap:
                break
            depth = min(depth * GROWTH, cap)
        self.short |= bool((keep.sum(axis=1) < want).any())
        return _compact(scores, ids, keep, k)
