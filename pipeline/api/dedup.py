"""`duplicates`: groups of the same photo (same bytes, or edited) and of similar shots.

No model runs: the groups come from the stored vectors (each row's CRC-32 checked;
a damaged row is left out with one notice, as in a search) and the files' recorded
sha256. Each group carries what a person compares copies by and the copy to keep
(`keeper`): the highest resolution, then the largest file, then the oldest.
"""

from __future__ import annotations

import datetime as dt
import io
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import specs
from pipeline.api.dedup_export import chosen_moves, write_csv
from pipeline.api.models import open_collection, settings_for
from pipeline.errors import CbirError
from pipeline.ingest import movefiles, moves
from pipeline.retrieval import duplicates as dups
from pipeline.retrieval import indexes
from pipeline.store import reads
from pipeline.store.collection import Collection, writing

RECALL_SAMPLE = 200  # ids whose exact pairs measure an approximate index's pair recall
KIND_NAMES = {"exact": "same bytes", "near": "near-identical", "similar": "similar shots"}


def check_include(include: Any) -> tuple[str, ...]:
    """The kinds asked for, as a tuple in the order of `dups.KINDS`; one line if unknown."""
    if isinstance(include, str):
        include = [x.strip() for x in include.split(",")]
    wanted = set()
    for kind in include or ():
        wanted.add(specs.check("include", kind, spec=specs.OPTIONS["include"]))
    if not wanted:
        raise CbirError(f"include must name at least one of {', '.join(dups.KINDS)}")
    return tuple(k for k in dups.KINDS if k in wanted)


def _threshold(key: str, value: float | None, default: float) -> float:
    return default if value is None else specs.check(key, value, spec=specs.OPTIONS[key])


def _keeper_key(row: dict[str, Any]) -> tuple:
    """Higher is better: an existing file, pixels, bytes, then the older file, lower id."""
    pixels = (row.get("width") or 0) * (row.get("height") or 0)
    return (row["exists"], pixels, row.get("size") or 0, -(row.get("mtime") or 0), -row["id"])


def _image(i: int, score: float, row: dict[str, Any]) -> dict[str, Any]:
    mtime = row.get("mtime")
    return {
        "id": i,
        "path": row["path"],
        "score": round(float(score), 6),
        "width": row.get("width"),
        "height": row.get("height"),
        "size": row.get("size"),
        "mtime": mtime,
        "date": dt.datetime.fromtimestamp(mtime, dt.UTC).isoformat(timespec="seconds")
        if mtime
        else None,
        "label": row.get("label"),
        "sha256": row.get("sha256"),
        "exists": os.path.exists(row["path"]),
    }


def _group(n: int, g: dups.Group, rows: dict[int, dict[str, Any]]) -> dict[str, Any]:
    images = [_image(i, s, rows[i]) for i, s in zip(g.ids, g.scores, strict=True)]
    keeper = max(images, key=_keeper_key)
    for im in images:
        im["keeper"] = im is keeper
    return {
        "group": n,
        "kind": g.kind,
        "centre": g.centre,
        "keeper": keeper["id"],
        "images": images,
    }


def _sample_pairs(coll: Collection, ids: np.ndarray, threshold: float) -> tuple[np.ndarray, Any]:
    """Exact pairs of a seeded sample of ids (the reference for an index's pair recall)."""
    rng = np.random.default_rng(0)
    sample = np.sort(rng.choice(ids, size=min(RECALL_SAMPLE, len(ids)), replace=False))
    q = coll.vectors(sample)
    # Empty first parts: no usable ids gives no pairs, not a failed concatenate.
    a, b, s = [np.empty(0, np.int64)], [np.empty(0, np.int64)], [np.empty(0, np.float32)]
    for start in range(0, len(ids), dups.QUERY_BLOCK):
        block = ids[start : start + dups.QUERY_BLOCK]
        scores = dups.snapped(q @ coll.vectors(block).T)  # as the pairs are scored
        qi, bi = np.nonzero(scores >= threshold)
        pa, pb = sample[qi], block[bi]
        a.append(np.minimum(pa, pb))
        b.append(np.maximum(pa, pb))
        s.append(scores[qi, bi])
    a, b, s = (np.concatenate(x) for x in (a, b, s))
    keep = a != b
    return sample, dups.Pairs(a[keep], b[keep], s[keep], threshold)


def checked_options(
    include: Any, near: float | None, similar: float | None
) -> tuple[tuple[str, ...], float, float]:
    """(include, near, similar) checked, the thresholds' defaults filled in; one line if wrong."""
    include = check_include(include)
    near = _threshold("near", near, dups.NEAR)
    similar = _threshold("similar", similar, dups.SIMILAR)
    if "near" in include and "similar" in include and similar > near:
        raise CbirError(f"--similar ({similar}) must not be above --near ({near})")
    return include, near, similar


def lowest_asked(include: tuple[str, ...], near: float, similar: float) -> float | None:
    """The lowest threshold of the kinds asked for: pairs must reach down to it (None: only
    exact, which needs no pairs)."""
    asked = [t for k, t in (("near", near), ("similar", similar)) if k in include]
    return min(asked) if asked else None


def pairs_in(
    coll: Collection,
    ids: np.ndarray,
    low: float,
    index: str = "exact",
    progress: Callable[[int], None] | None = None,
    on_total: Callable[[int], None] | None = None,
) -> tuple[dups.Pairs, float | None]:
    """Every pair among `ids` at cosine >= `low`, and the pair recall of an approximate
    `index` (None for the exact search). The costly step: a server keeps its result
    (pipeline/api/session.py) and regroups from it at any higher threshold."""
    if on_total:
        on_total(len(ids))
    if index == indexes.EXACT:
        return dups.exact_pairs(coll.vectors, ids, low, progress), None
    faiss_index = indexes.loaded(coll, index)[0]
    if not hasattr(faiss_index, "range_search") or type(faiss_index).__name__ in (
        "IndexPreTransform",
    ):
        raise CbirError(
            f"index {index!r} cannot range-search; use --index exact, or an IVF or HNSW index"
        )
    try:
        pairs = dups.index_pairs(faiss_index, coll.vectors, ids, low, progress)
    except RuntimeError as e:
        raise CbirError(
            f"index {index!r} cannot range-search ({str(e).splitlines()[0][:120]}); "
            "use --index exact, or an IVF or HNSW index"
        ) from None
    sample, reference = _sample_pairs(coll, ids, low)
    return pairs, dups.pair_recall(pairs, reference, sample)


def report_of(
    ids: np.ndarray,
    rows: dict[int, dict[str, Any]],
    pairs: dups.Pairs | None,
    recall: float | None,
    options: tuple[tuple[str, ...], float, float],
    index: str,
) -> dict[str, Any]:
    """The report of `duplicates_in` from the catalog's `rows` of `ids` (reads.details) and
    pairs reaching at least down to the lowest threshold asked (`checked_options`)."""
    include, near, similar = options
    low = lowest_asked(include, near, similar)
    if pairs is not None and low is not None:
        pairs = pairs.at_least(low)  # pairs kept from a lower threshold count as asked
    sha = {i: r["sha256"] for i, r in rows.items()}
    groups = dups.find_groups(ids, sha, pairs, include, near, similar)
    return {
        "images": int(len(ids)),
        "include": list(include),
        "thresholds": {"near": near, "similar": similar},
        "index": index,
        "pairs": int(len(pairs.a)) if pairs is not None else 0,
        "pair_recall": recall,
        "groups": [_group(n, g, rows) for n, g in enumerate(groups, 1)],
    }


def duplicates_in(
    coll: Collection,
    include: Any = ("exact", "near"),
    near: float | None = None,
    similar: float | None = None,
    index: str = "exact",
    progress: Callable[[int], None] | None = None,
    on_total: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """The groups of an open collection, with what was asked and what was measured."""
    options = checked_options(include, near, similar)
    ids = coll.usable_ids()
    rows = reads.details(coll.db, ids)
    pairs, recall = None, None
    low = lowest_asked(*options)
    if low is not None:
        pairs, recall = pairs_in(coll, ids, low, index, progress, on_total)
    return report_of(ids, rows, pairs, recall, options, index)


def duplicates_report(config: str | None = None, **options: Any) -> dict[str, Any]:
    """`duplicates_in` on the settings' collection (options: include, near, similar,
    index, progress, on_total; the rest are settings such as catalog and index_dir)."""
    own = {k: options.pop(k) for k in list(options) if k in _OWN}
    s = settings_for(config, **options)
    coll = open_collection(s)
    try:
        # The `index` setting is the search's choice; duplicates use the exact pairs
        # unless an index is named here (its pair recall is measured and reported).
        return duplicates_in(coll, index=own.pop("index", None) or indexes.EXACT, **own)
    finally:
        coll.close()


_OWN = ("include", "near", "similar", "index", "progress", "on_total")


def duplicates(config: str | None = None, **options: Any) -> list[dict[str, Any]]:
    """The duplicate groups of a collection (see `duplicates_report` for the options):
    each a dict with `group`, `kind`, `centre`, `keeper` and `images` (id, path, score
    to the centre, width, height, size, mtime, date, label, sha256, exists, keeper)."""
    return duplicates_report(config, **options)["groups"]


# --- acting on the groups: moves and their undo (pipeline/ingest/moves.py) ------------------


def _to_move(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The images `chosen_moves` picks (all but each keeper) whose file is still there."""
    ids = chosen_moves(report)
    return [
        {"id": im["id"], "path": im["path"], "group": g["group"], "kind": g["kind"]}
        for g in report["groups"]
        for im in g["images"]
        if im["id"] in ids and im["exists"]
    ]


def move_duplicates(
    move_to: str,
    config: str | None = None,
    apply: str | None = None,
    log: str | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Move every image of each group but its keeper (or those a plan CSV lists: `apply`)
    into `move_to`, keeping relative paths, under the one-writer lock; the catalog drops
    their rows and a log (`log`, default inside `move_to`) lets `undo_moves` put all back.
    First finishes a move of this catalog that a crash left pending there. Options as
    `duplicates_report`. Returns what was done (moved, bytes, groups, rows, folder, log,
    finished); the protocol and formats: pipeline/ingest/moves.py."""
    own = {k: options.pop(k) for k in list(options) if k in _OWN}
    chosen = movefiles.read_plan(apply) if apply else None  # bad input touches nothing
    s = settings_for(config, **options)
    with writing(s.catalog, s.index_dir, create=False) as coll:
        finished = moves.finish_pending(coll, move_to, log)
        if chosen is None:
            report = duplicates_in(coll, index=own.pop("index", None) or s.index, **own)
            chosen = _to_move(report)
        return {**moves.move(coll, chosen, move_to, log), "finished": finished}


def undo_moves(log: str, config: str | None = None, **options: Any) -> dict[str, Any]:
    """Put back the images a `move_duplicates` moved, byte for byte, and their catalog rows
    with their ids, from its `log` (a damaged log is one line and changes nothing)."""
    s = settings_for(config, **options)
    moves.refuse_other_catalog(movefiles.read_log(log), s.catalog)  # before it is opened
    with writing(s.catalog, s.index_dir, create=False) as coll:
        return moves.undo(coll, movefiles.read_log(log))


def write_move_plan(plan: str, config: str | None = None, **options: Any) -> dict[str, Any]:
    """Write the moves `move_duplicates` would make as a plan CSV (`--apply` carries it
    out), moving nothing; returns {"plan", "moves", "groups"}."""
    report = duplicates_report(config, **options)
    chosen = _to_move(report)
    out = io.StringIO()
    n = write_csv(report, out, only={c["id"] for c in chosen})
    data = out.getvalue().encode("utf-8", "surrogateescape")
    movefiles.write_atomic(Path(os.path.abspath(plan)), data, "plan")
    return {"plan": plan, "moves": n, "groups": len({c["group"] for c in chosen})}
