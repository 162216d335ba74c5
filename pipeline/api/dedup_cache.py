"""Duplicates reports kept by a long-lived reader, for the review page of `cbir serve`.

The pairs are the costly step: an exact range search compares every vector with
every other (measured here: 0.5 s for 5,000 vectors, 7 s for 20,000, growing with
the square), while grouping them at a threshold takes milliseconds
(pipeline/api/dedup.py, `report_of`). So a server keeps, per catalog generation and
index, the pairs down to the lowest threshold asked so far, rounded down to a step
of FLOOR_STEP (a slider moved down recomputes once per step, not at every value),
and the last MAX_REPORTS reports; every other threshold is regrouped from the pairs.
Apart from session.py, which only holds one of these, so that module stays about
searching.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.api import dedup
from pipeline.retrieval import duplicates as dups
from pipeline.retrieval import indexes
from pipeline.store import reads
from pipeline.store.collection import Collection

FLOOR_STEP = 0.05
MAX_REPORTS = 16


def floor_of(low: float) -> float:
    """`low` rounded down to a multiple of FLOOR_STEP (never to 0: thresholds are above it)."""
    steps = math.floor(round(low / FLOOR_STEP, 9))
    return max(FLOOR_STEP, round(steps * FLOOR_STEP, 6))


@dataclass
class _Generation:
    """What is kept for one catalog generation (dropped when the catalog changes)."""

    ids: np.ndarray | None = None
    rows: dict[int, dict[str, Any]] | None = None
    pairs: dict[str, tuple[float, dups.Pairs, float | None]] = field(default_factory=dict)
    reports: OrderedDict = field(default_factory=OrderedDict)


class DuplicatesCache:
    """Reports of one open collection, made from pairs kept across calls."""

    def __init__(self, coll: Collection):
        self.coll = coll
        # One computation at a time: requests of a dragged slider wait for the first
        # one's pairs instead of each computing them.
        self._lock = threading.Lock()
        self._kept: tuple[tuple[int, int], _Generation] | None = None

    def forget(self) -> None:
        """Drop what is kept (files moved: their rows' paths changed)."""
        with self._lock:
            self._kept = None

    def _for(self, generation: tuple[int, int]) -> _Generation:
        if self._kept is None or self._kept[0] != generation:
            self._kept = (generation, _Generation())
        return self._kept[1]

    def report(
        self, include: Any, near: float | None, similar: float | None, index: str = indexes.EXACT
    ) -> dict[str, Any]:
        """The report of `dedup.duplicates_in(coll, include, near, similar, index)`."""
        options = dedup.checked_options(include, near, similar)
        key = (options, index)
        with self._lock:
            kept = self._for(self.coll.rows_state)  # paths change on a move too
            report = kept.reports.get(key)
            if report is not None:
                kept.reports.move_to_end(key)
                return report
            if kept.ids is None:
                kept.ids = self.coll.usable_ids()
                kept.rows = reads.details(self.coll.db, kept.ids)
            pairs, recall = None, None
            low = dedup.lowest_asked(*options)
            if low is not None:
                have = kept.pairs.get(index)
                if have is None or have[0] > low:
                    floor = min(floor_of(low), low)
                    kept.pairs[index] = (floor, *dedup.pairs_in(self.coll, kept.ids, floor, index))
                _, pairs, recall = kept.pairs[index]
            report = dedup.report_of(kept.ids, kept.rows, pairs, recall, options, index)
            kept.reports[key] = report
            while len(kept.reports) > MAX_REPORTS:
                kept.reports.popitem(last=False)
            return report
