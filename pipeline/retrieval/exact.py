"""Exact inner-product search straight over stored vectors, without FAISS.

Used where a FAISS flat index would be a second copy of the vector file
(large collections), and as ground truth when measuring an approximate
index's recall. It satisfies the same search interface as a FAISS index
(`ntotal`, `search(queries, k) -> (scores, ids)`), with real scores.
"""

from __future__ import annotations

import numpy as np

CHUNK = 65536  # rows in memory at a time


def top_k(
    rows: np.ndarray, ids: np.ndarray, queries: np.ndarray, k: int, keep: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(scores, ids) of the exact top k by inner product over rows[ids], best first.

    `rows` may be a memory map of any size: it is scanned in chunks with BLAS.
    Rows short of k are padded with score -inf and id -1. `keep` (one bool per id) leaves
    out the others: a search filter that passes many ids scores runs of rows in place and
    masks them, rather than gathering the ids it passes.
    """
    queries = np.asarray(queries, dtype=np.float32)
    best_s = np.full((len(queries), 0), -np.inf, dtype=np.float32)
    best_i = np.zeros((len(queries), 0), dtype=np.int64)
    for start in range(0, len(ids), CHUNK):
        chunk = ids[start : start + CHUNK]
        if chunk[-1] - chunk[0] == len(chunk) - 1:  # a run of ids: a view, no copy
            block = rows[int(chunk[0]) : int(chunk[-1]) + 1]
        else:
            block = rows[chunk]
        s = queries @ np.asarray(block, dtype=np.float32).T
        if keep is not None:
            s[:, ~keep[start : start + CHUNK]] = -np.inf
        kk = min(k, s.shape[1])
        part = np.argpartition(-s, kk - 1, axis=1)[:, :kk]
        best_s = np.hstack([best_s, np.take_along_axis(s, part, axis=1)])
        best_i = np.hstack([best_i, chunk[part]])
        order = np.argsort(-best_s, axis=1, kind="stable")[:, :k]
        best_s = np.take_along_axis(best_s, order, axis=1)
        best_i = np.take_along_axis(best_i, order, axis=1)
    if keep is not None:
        best_i = np.where(np.isneginf(best_s), -1, best_i)
    if best_i.shape[1] < k:
        pad = k - best_i.shape[1]
        best_s = np.hstack([best_s, np.full((len(queries), pad), -np.inf, np.float32)])
        best_i = np.hstack([best_i, np.full((len(queries), pad), -1, np.int64)])
    return best_s, best_i


class VectorFileExact:
    """Exact search over the memory-mapped vector file: one copy of the vectors, not two."""

    def __init__(self, rows: np.ndarray, ids: np.ndarray):
        self.rows, self.ids = rows, np.asarray(ids, dtype=np.int64)
        self.ntotal = len(self.ids)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return top_k(self.rows, self.ids, queries, k)
