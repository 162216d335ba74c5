"""Reading an instance benchmark's ground truth: a CSV of query,relevant file names.

The CSV (INRIA Holidays' and UKBench's `groundtruth.csv`) has a `query,relevant`
header and one row per pair of file names; each name is matched to one catalog
image. Only the reading and the name matching live here, in `inputs` (the user's
files), so that both the instance benchmark (`evaluation.instances`) and the
whitening guard (`retrieval.whitening_fit`) can use it without importing each other.
"""

from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass

from pipeline.errors import CbirError
from pipeline.inputs.scan import read_csv

COLUMNS = ("query", "relevant")


@dataclass
class GroundTruth:
    """Queries as catalog ids in CSV order, each with its relevant ids (never itself)."""

    queries: list[int]
    relevant: dict[int, list[int]]
    pairs: int


def read_pairs(path: str) -> list[tuple[str, str]]:
    """The (query, relevant) file-name pairs of a ground-truth CSV (UTF-8, a BOM allowed)."""
    rows = read_csv(
        path, COLUMNS, "ground-truth", "a ground-truth CSV needs a header with the columns "
        "query,relevant",
    )  # fmt: skip
    pairs = []
    for n, row in enumerate(rows, start=1):
        query, rel = (row.get("query") or "").strip(), (row.get("relevant") or "").strip()
        if not query or not rel:  # an empty cell, or a short row
            raise CbirError(f"{path}: data row {n} needs both a query and a relevant file name")
        pairs.append((query, rel))
    if not pairs:
        raise CbirError(f"{path}: no query,relevant rows")
    return pairs


def match_names(names: list[str], paths: dict[int, str], csv_path: str) -> dict[str, int]:
    """The catalog id of each file name.

    A name is first the path relative to the CSV's folder; failing that, the one
    catalog image whose path ends with it (its file name, or its last folders and
    file name), preferring images under the CSV's folder. Names that match no
    indexed image, or several, are refused together in one error.
    """
    exact = {p: i for i, p in paths.items()}
    by_name: dict[str, list[int]] = defaultdict(list)
    for i, p in paths.items():
        by_name[os.path.basename(p)].append(i)
    folder = os.path.dirname(os.path.abspath(csv_path))
    bases = list(dict.fromkeys([folder, os.path.realpath(folder)]))
    found: dict[str, int] = {}
    unknown: list[str] = []
    ambiguous: list[tuple[str, int]] = []
    for name in dict.fromkeys(names):
        full = {os.path.abspath(os.path.join(b, name)) for b in bases}
        hits = sorted({exact[f] for f in full if f in exact})
        if not hits:
            parts = os.path.normpath(name).split(os.sep)
            tail = [i for i in by_name.get(parts[-1], []) if _ends_with(paths[i], parts)]
            under = [i for i in tail if any(paths[i].startswith(b + os.sep) for b in bases)]
            hits = under if len(tail) > 1 and under else tail
        if len(hits) == 1:
            found[name] = hits[0]
        elif hits:
            ambiguous.append((name, len(hits)))
        else:
            unknown.append(name)
    problems = []
    total = len(found) + len(unknown) + len(ambiguous)
    if unknown:
        problems.append(
            f"{len(unknown)} of {total} file names match no indexed catalog image "
            f"(first: {unknown[0]!r})"
        )
    if ambiguous:
        name, count = ambiguous[0]
        problems.append(
            f"{len(ambiguous)} of {total} match several catalog images "
            f"(first: {name!r}, {count} images): name them relative to the CSV's folder"
        )
    if problems:
        raise CbirError(f"{csv_path}: " + "; ".join(problems))
    return found


def _ends_with(path: str, parts: list[str]) -> bool:
    """Whether the last components of `path` are `parts`."""
    return path.split(os.sep)[-len(parts) :] == parts


def load_groundtruth(csv_path: str, paths: dict[int, str]) -> GroundTruth:
    """Read the CSV and map its names to catalog ids; a query listed as its own match is dropped."""
    pairs = read_pairs(csv_path)
    ids = match_names([name for pair in pairs for name in pair], paths, csv_path)
    relevant: dict[int, list[int]] = {}
    for query, rel in pairs:
        q, r = ids[query], ids[rel]
        group = relevant.setdefault(q, [])
        if r != q and r not in group:
            group.append(r)
    lonely = [q for q, group in relevant.items() if not group]
    if lonely:
        raise CbirError(
            f"{csv_path}: {len(lonely)} queries have no relevant image other than themselves "
            f"(first: {paths[lonely[0]]!r})"
        )
    return GroundTruth(list(relevant), relevant, sum(len(g) for g in relevant.values()))
