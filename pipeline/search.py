"""The one search interface: query vectors in, ranked results out, whatever the index.

Approximate indexes return candidates; their scores are then recomputed from
the stored vectors, so every score printed is the true cosine similarity and
exact and approximate results have the same meaning as well as the same shape.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import faiss
import numpy as np

from pipeline import catalog, vectors


def _rescore(
    query: np.ndarray, candidates: np.ndarray, stored: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Exact cosine of one query against its candidate ids, best first."""
    valid = candidates[candidates >= 0]
    if len(valid) == 0:
        return valid, np.zeros(0, dtype=np.float32)
    scores = np.asarray(stored[np.sort(valid)], dtype=np.float32) @ query
    order = np.argsort(-scores, kind="stable")
    return np.sort(valid)[order], scores[order]


def search_vectors(
    db,
    catalog_path: str | Path,
    index: faiss.Index,
    queries: np.ndarray,
    k: int = 10,
    exact_scores: bool = True,
) -> list[list[dict[str, Any]]]:
    """Top-k results for each query vector, as lists of result dicts.

    Each result: rank (from 1), id, path, label, score (cosine similarity).
    """
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    k_search = min(k, int(index.ntotal))
    if k_search == 0:
        return [[] for _ in queries]
    scores, ids = index.search(queries, k_search)
    if exact_scores:
        stored = vectors.open_rows(
            vectors.vectors_path(catalog_path), catalog.dimension(db), catalog.next_id(db)
        )
        pairs = [_rescore(q, row, stored) for q, row in zip(queries, ids, strict=True)]
    else:
        pairs = [(row[row >= 0], s[row >= 0]) for row, s in zip(ids, scores, strict=True)]
    rows = catalog.lookup(db, np.unique(np.concatenate([p[0] for p in pairs])))
    results = []
    for found_ids, found_scores in pairs:
        results.append(
            [
                {
                    "rank": rank,
                    "id": int(i),
                    "path": rows[int(i)]["path"],
                    "label": rows[int(i)]["label"],
                    "score": round(float(s), 6),
                }
                for rank, (i, s) in enumerate(zip(found_ids, found_scores, strict=True), start=1)
                if int(i) in rows
            ]
        )
    return results
