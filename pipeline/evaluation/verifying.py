"""`cbir evaluate --rerank verify`: each query's ranking re-ordered by local-feature
verification, by the code `cbir search --rerank verify` runs (`retrieval.verified`).

`ranking.ranked` re-ranks vectors only (DBA, query expansion); the labels and instance
benchmarks then hand each query's full ranking to `Verifying`, which checks its top
`verify_n` against the query's image (an indexed id's file, checked against its row, or
a query file) and returns the ranking in the verified order, scores still cosines.

A figure is refused rather than given when some candidate cannot be verified (a file
changed since indexing, or unreadable): search would then rank without it, so the
figure would describe neither the catalog nor what search does with intact files.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from pipeline.config import Settings
from pipeline.errors import CbirError
from pipeline.retrieval import verified
from pipeline.specs import parse_rerank


class Verifying:
    """Re-orders rankings as `--rerank verify` does, when the settings ask for it."""

    def __init__(self, db, settings: Settings):
        self.db, self.settings = db, settings
        self.on = verified.wanted(settings)
        self.cache = verified.new_cache(settings) if self.on else None
        self.seconds, self.queries = 0.0, 0

    def __call__(
        self, source: int | str, ids: np.ndarray, scores: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """One query's ranking (ids, cosines; best first, no padding), verified if asked."""
        if not self.on:
            return ids, scores
        start, notices = time.perf_counter(), []
        ids, scores, _ = verified.rerank_ranking(
            self.db, source, str(source), ids, scores, self.settings, self.cache, notices
        )
        if notices:
            raise CbirError(
                f"--rerank verify cannot check every candidate, so the figure would not be "
                f"the search's: {notices[0]} ({len(notices)} such)"
            )
        self.seconds += time.perf_counter() - start
        self.queries += 1
        return ids, scores

    def describe(self, result: dict[str, Any]) -> None:
        """Name the whole re-ranking in `result`, with verification's N and time per query."""
        if not self.on:
            return
        result["rerank"] = "+".join(parse_rerank(self.settings.rerank))
        result["verify_n"] = self.settings.verify_n
        result["verify_s_per_query"] = round(self.seconds / max(self.queries, 1), 4)
