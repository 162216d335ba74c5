"""A duplicates report as CSV: the rows `cbir duplicates --csv` prints, and the moves a
person chose on the review page (`cbir serve`, /duplicates), in the same columns.

Apart from pipeline/api/dedup.py, which finds the groups: this only writes them, so
the CLI and the web app share one writer (and one list of columns).
"""

from __future__ import annotations

import csv
from collections.abc import Iterable
from typing import IO, Any

CSV_COLUMNS = (
    "group", "kind", "keeper", "id", "score", "width", "height", "size", "date", "path",
)  # fmt: skip


def chosen_moves(
    report: dict[str, Any], move: Iterable[int] = (), keep: Iterable[int] = ()
) -> set[int]:
    """The ids to move: by default every image of a group but its keeper; `move` adds
    ids (a keeper too, when a person chose another copy to keep) and `keep` takes ids
    out. Ids in no group of the report are ignored: only grouped images ever move."""
    grouped = {im["id"]: im["keeper"] for g in report["groups"] for im in g["images"]}
    chosen = {i for i, keeper in grouped.items() if not keeper}
    chosen |= {i for i in move if i in grouped}
    return chosen - set(keep)


def write_csv(report: dict[str, Any], out: IO[str], only: set[int] | None = None) -> int:
    """One row per image of each group (only the ids in `only`, when given), under a
    header of CSV_COLUMNS; returns the rows written."""
    w = csv.writer(out, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    n = 0
    for g in report["groups"]:
        for im in g["images"]:
            if only is not None and im["id"] not in only:
                continue
            w.writerow(
                [g["group"], g["kind"], int(im["keeper"]), im["id"], f"{im['score']:.6f}"]
                + [im[k] if im[k] is not None else "" for k in ("width", "height", "size", "date")]
                + [im["path"]]
            )
            n += 1
    return n
