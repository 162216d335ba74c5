"""Re-ranking on unit vectors: alpha query expansion, database-side augmentation, Rocchio.

All three only move vectors; the search itself is unchanged, so they work
through the one search interface with any index.
"""

from __future__ import annotations

import numpy as np

from pipeline.embed import l2_normalize

# General defaults from the literature (alpha-QE, Radenovic et al.: alpha = 3,
# a handful of neighbours). Collections with many images per concept gain from
# more: pick `rerank_n` / `rerank_alpha` by leave-one-out on the database
# (scripts/tune_rerank.py), never on held-out queries.
DEFAULT_N, DEFAULT_ALPHA = 10, 3.0


def weighted_neighbour_mean(neighbours: np.ndarray, scores: np.ndarray, alpha: float) -> np.ndarray:
    """Sum of neighbour vectors weighted by similarity**alpha (negative scores weigh 0)."""
    weights = np.clip(scores, 0, None) ** alpha
    return np.einsum("qn,qnd->qd", weights, neighbours)


def alpha_qe(
    queries: np.ndarray, neighbours: np.ndarray, scores: np.ndarray, alpha: float = DEFAULT_ALPHA
) -> np.ndarray:
    """alpha-QE (Radenovic et al.): q' = normalise(q + sum_i s_i^alpha d_i) over the top n.

    `neighbours` is (q, n, d), `scores` (q, n): the first-pass results.
    """
    return l2_normalize(queries + weighted_neighbour_mean(neighbours, scores, alpha))


def dba(
    database: np.ndarray,
    neighbours_idx: np.ndarray,
    scores: np.ndarray,
    alpha: float = DEFAULT_ALPHA,
) -> np.ndarray:
    """Database-side augmentation: each vector becomes the weighted mean of its top n.

    `neighbours_idx` (N, n) are row positions in `database` including the row
    itself (its own score, 1, makes it count the most).
    """
    return l2_normalize(weighted_neighbour_mean(database[neighbours_idx], scores, alpha))


def rocchio(
    query: np.ndarray,
    relevant: np.ndarray,
    not_relevant: np.ndarray,
    a: float = 1.0,
    b: float = 0.75,
    c: float = 0.25,
) -> np.ndarray:
    """Relevance feedback: q' = a q + b mean(relevant) - c mean(not relevant), unit length."""
    q = a * np.asarray(query, dtype=np.float32)
    if len(relevant):
        q = q + b * np.asarray(relevant, dtype=np.float32).mean(axis=0)
    if len(not_relevant):
        q = q - c * np.asarray(not_relevant, dtype=np.float32).mean(axis=0)
    return l2_normalize(q[None, :])[0]


def top_n(scores: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions and values of the n best scores in each row, best first."""
    n = min(n, scores.shape[1])
    part = np.argpartition(-scores, n - 1, axis=1)[:, :n]
    vals = np.take_along_axis(scores, part, axis=1)
    order = np.argsort(-vals, axis=1, kind="stable")
    return np.take_along_axis(part, order, axis=1), np.take_along_axis(vals, order, axis=1)
