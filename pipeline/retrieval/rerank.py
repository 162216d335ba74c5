"""Re-ranking on unit vectors: alpha query expansion, database-side augmentation, Rocchio.

All three only move vectors; the search itself is unchanged, so they work
through the one search interface with any index.
"""

from __future__ import annotations

import numpy as np

from pipeline.config import Settings
from pipeline.embed.interface import l2_normalize

# The defaults (config.Settings) come from the literature (alpha-QE, Radenovic
# et al.: alpha = 3, a handful of neighbours). Collections with many images per
# concept gain from more: pick `rerank_n` / `rerank_alpha` by leave-one-out on
# the database (scripts/tune_rerank.py), never on held-out queries.
DEFAULT_ALPHA = Settings().rerank_alpha


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
