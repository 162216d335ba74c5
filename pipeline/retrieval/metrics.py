"""Retrieval metrics on ranked label lists: pure functions, no I/O."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def average_precision(relevant: Sequence[bool], total_relevant: int | None = None) -> float:
    """AP of one ranking: mean of precision@i over the ranks i of relevant items.

    `total_relevant` is the number of relevant items in the whole collection;
    relevant items missing from the ranking count as found at no rank (their
    precision is 0). A query with no relevant item at all has AP 0.
    """
    rel = np.asarray(relevant, dtype=bool)
    total = int(rel.sum()) if total_relevant is None else int(total_relevant)
    if total == 0:
        return 0.0
    hits = np.cumsum(rel)
    precisions = hits[rel] / (np.flatnonzero(rel) + 1)
    return float(precisions.sum() / total)


def precision_at(relevant: Sequence[bool], k: int) -> float:
    """Fraction of the first k results that are relevant (k fixed, even if fewer results)."""
    rel = np.asarray(relevant, dtype=bool)[:k]
    return float(rel.sum() / k)


def recall_at(found: Sequence[Sequence[int]], truth: Sequence[Sequence[int]], k: int) -> float:
    """Mean overlap |found[:k] & truth[:k]| / k: how much of the exact top k an index returns."""
    if len(truth) == 0:
        return 0.0
    scores = []
    for f, t in zip(found, truth, strict=True):
        t_k = set(int(x) for x in t[:k])
        if not t_k:
            continue
        scores.append(len(set(int(x) for x in f[:k]) & t_k) / len(t_k))
    return float(np.mean(scores)) if scores else 0.0


def ranks_of(ranking: Sequence[int], wanted: Sequence[int]) -> list[int | None]:
    """The 1-based rank of each of `wanted` in `ranking`, None where it is absent."""
    ranking = np.asarray(ranking, dtype=np.int64)
    at = np.flatnonzero(np.isin(ranking, np.asarray(wanted, dtype=np.int64)))
    position = {int(ranking[p]): int(p) + 1 for p in at}
    return [position.get(int(w)) for w in wanted]


def hits_at(ranking: Sequence[int], wanted: Sequence[int], k: int) -> int:
    """How many of `wanted` are among the first k of `ranking` (UKBench's N-S at k = 4)."""
    group = set(int(w) for w in wanted)
    return sum(int(x) in group for x in ranking[:k])
