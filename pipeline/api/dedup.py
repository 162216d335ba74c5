"""`duplicates`: groups of the same photo (same bytes, or edited) and of similar shots.

No model runs: the groups come from the stored vectors (each row's CRC-32 checked;
a damaged row is left out with one notice, as in a search) and the files' recorded
sha256. Each group carries what a person compares copies by and the copy to keep
(`keeper`): the highest resolution, then the largest file, then the oldest.
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Callable
from typing import Any

import numpy as np

from pipeline import specs
from pipeline.api.models import open_collection, settings_for
from pipeline.errors import CbirError
from pipeline.retrieval import duplicates as dups
from pipeline.retrieval import indexes
from pipeline.store import reads
from pipeline.store.collection import Collection

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
    a, b, s = [], [], []
    for start in range(0, len(ids), dups.QUERY_BLOCK):
        block = ids[start : start + dups.QUERY_BLOCK]
        scores = q @ coll.vectors(block).T
        qi, bi = np.nonzero(scores >= threshold)
        pa, pb = sample[qi], block[bi]
        a.append(np.minimum(pa, pb))
        b.append(np.maximum(pa, pb))
        s.append(scores[qi, bi])
    a, b, s = (np.concatenate(x) for x in (a, b, s))
    keep = a != b
    return sample, dups.Pairs(a[keep], b[keep], s[keep], threshold)


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
    include = check_include(include)
    near = _threshold("near", near, dups.NEAR)
    similar = _threshold("similar", similar, dups.SIMILAR)
    if "near" in include and "similar" in include and similar > near:
        raise CbirError(f"--similar ({similar}) must not be above --near ({near})")
    ids = coll.usable_ids()
    rows = reads.details(coll.db, ids)
    sha = {i: r["sha256"] for i, r in rows.items()}
    pairs, recall = None, None
    asked = [t for k, t in (("near", near), ("similar", similar)) if k in include]
    if asked:
        low = min(asked)
        if on_total:
            on_total(len(ids))
        if index == indexes.EXACT:
            pairs = dups.exact_pairs(coll.vectors, ids, low, progress)
        else:
            faiss_index = indexes.loaded(coll, index)[0]
            if not hasattr(faiss_index, "range_search") or type(faiss_index).__name__ in (
                "IndexPreTransform",
            ):
                raise CbirError(
                    f"index {index!r} cannot range-search; use --index exact or an IVF index"
                )
            try:
                pairs = dups.index_pairs(faiss_index, coll.vectors, ids, low, progress)
            except RuntimeError as e:
                raise CbirError(
                    f"index {index!r} cannot range-search ({str(e).splitlines()[0][:120]}); "
                    "use --index exact or an IVF index"
                ) from None
            sample, reference = _sample_pairs(coll, ids, low)
            recall = dups.pair_recall(pairs, reference, sample)
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


def duplicates_report(config: str | None = None, **options: Any) -> dict[str, Any]:
    """`duplicates_in` on the settings' collection (options: include, near, similar,
    index, progress, on_total; the rest are settings such as catalog and index_dir)."""
    own = {k: options.pop(k) for k in list(options) if k in _OWN}
    s = settings_for(config, **options)
    coll = open_collection(s)
    try:
        return duplicates_in(coll, index=own.pop("index", None) or s.index, **own)
    finally:
        coll.close()


_OWN = ("include", "near", "similar", "index", "progress", "on_total")


def duplicates(config: str | None = None, **options: Any) -> list[dict[str, Any]]:
    """The duplicate groups of a collection (see `duplicates_report` for the options):
    each a dict with `group`, `kind`, `centre`, `keeper` and `images` (id, path, score
    to the centre, width, height, size, mtime, date, label, sha256, exists, keeper)."""
    return duplicates_report(config, **options)["groups"]
