"""Measuring retrieval quality on a labelled catalog: mAP, P@1, P@10, per class, recall.

Queries come from a manifest CSV (its `split=query` rows, held out of the
catalog), a folder of labelled images, or leave-one-out over the catalog.
Rankings go through `ranking.ranked`, the code that `cbir search` runs, over
the whole database, so the figures describe what users get. Instance
benchmarks (a ground-truth CSV of query,relevant pairs) are in `instances`;
`run.evaluate` picks one of the two, and what both use is in `common`.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np
from tqdm import tqdm

from pipeline.config import Settings
from pipeline.errors import CbirError
from pipeline.evaluation import common
from pipeline.evaluation.common import decode_shape, descriptors, flat_ranker, unusable_queries
from pipeline.evaluation.verifying import Verifying
from pipeline.inputs.scan import csv_columns, read_label_csv, scan
from pipeline.retrieval import indexes, metrics
from pipeline.retrieval.ranking import ranked, rerank_from
from pipeline.store import reads
from pipeline.store.collection import Collection


@dataclass
class Queries:
    paths: list[str]
    labels: list[str]
    ids: list[int | None]  # catalog ids for leave-one-out, else None


def load_queries(db, source: str | None, leave_one_out: bool, usable=None) -> Queries:
    """Labelled queries from a manifest CSV, a folder, or the catalog itself (its `usable`
    ids, when given: those whose vectors pass their checksum)."""
    if leave_one_out:
        rows = list(
            db.query(
                "select id, path, label from images where status = 'indexed' "
                "and label is not null order by id"
            )
        )
        if usable is not None:
            keep = set(np.asarray(usable).tolist())
            rows = [r for r in rows if r["id"] in keep]
        return Queries(
            [r["path"] for r in rows], [r["label"] for r in rows], [r["id"] for r in rows]
        )
    if not source:
        raise CbirError("give a query set (manifest CSV or folder) or --leave-one-out")
    if source.lower().endswith(".csv"):
        has_split = "split" in csv_columns(source, "query")
        labelled = read_label_csv(source, split="query" if has_split else "")
        pairs = [(p, lab) for p, lab in labelled.items() if lab]
    elif os.path.isdir(source):
        pairs = [(f.path, f.label) for f in scan([source], labels="folder") if f.label]
    else:
        raise CbirError(f"query set must be a CSV or a folder: {source}")
    if not pairs:
        raise CbirError(f"no labelled queries in {source}")
    return Queries([p for p, _ in pairs], [lab for _, lab in pairs], [None] * len(pairs))


def evaluate_labels(
    coll: Collection,
    settings: Settings,
    source: str | None = None,
    leave_one_out: bool = False,
    method: str = "resnet50",
    index_name: str | None = None,
    hybrid_weight: float = 0.5,
    embed=None,
) -> dict[str, Any]:
    """Evaluate the catalog against labelled queries; returns metrics and every ranking.

    `method` and `hybrid_weight` are checked by `run.evaluate`, which calls this.
    """
    if source and leave_one_out:  # one of them would be silently ignored
        raise CbirError("give either QUERIES or --leave-one-out, not both")
    if index_name and index_name != indexes.EXACT and method != "resnet50":
        raise CbirError("--index evaluates the catalog's ResNet50 vectors: use --method resnet50")
    if settings.rotations != "0":
        raise CbirError(
            f"rotations {settings.rotations}: only --groundtruth evaluates turned queries; "
            "use --rotations 0 here"
        )
    how = rerank_from(settings)
    db = coll.db
    verify = Verifying(db, settings)  # `--rerank verify`: after `ranked`, per query
    coll.refuse_damaged()  # a figure over fewer images than indexed is a wrong answer
    ids = coll.indexed_ids()
    if not len(ids):
        raise CbirError("the catalog has no indexed images")
    rows = reads.lookup(db, ids)
    db_labels = np.array([rows[int(i)]["label"] or "" for i in ids])
    db_paths = [rows[int(i)]["path"] for i in ids]
    if not any(db_labels):
        raise CbirError("the catalog has no labels: index with --labels folder or a label CSV")
    deep_db = coll.vectors(ids)
    queries = load_queries(db, source, leave_one_out, ids)
    max_pixels = settings.max_pixels

    db_desc, db_ok = descriptors(
        method, db_paths, deep_db, embed, max_pixels, hybrid_weight, decode_shape(settings)
    )
    if leave_one_out:
        pos = {int(i): p for p, i in enumerate(ids)}
        q_deep = deep_db[[pos[i] for i in queries.ids]]
    else:
        q_deep = None
    q_desc, q_ok = descriptors(
        method, queries.paths, q_deep, embed, max_pixels, hybrid_weight, decode_shape(settings)
    )
    if len(q_ok) < len(queries.paths):
        raise CbirError(unusable_queries(queries.paths, q_ok))
    db_ids = ids[db_ok]
    db_labels = db_labels[db_ok]

    flat, lookup = flat_ranker(db_desc, db_ids)
    n = len(db_ids)
    result: dict[str, Any] = {"method": method, "rerank": "+".join(how.methods) or "none"}
    if how.methods:
        result["rerank_n"], result["rerank_alpha"] = how.n, how.alpha
    approx = None
    if index_name and index_name != indexes.EXACT:
        approx, _, in_force = indexes.loaded(coll, index_name)
        approx_lookup, refine = coll.vectors, int(in_force.get("refine", 1))
        result["index"] = index_name

    label_of = dict(zip(db_ids.tolist(), db_labels.tolist(), strict=True))
    per_query: list[dict[str, Any]] = []
    exact_tops: list[np.ndarray] = []
    approx_tops: list[np.ndarray] = []
    # Queries go in blocks, so memory holds block x database rankings, not the whole
    # query x database matrix (leave-one-out over 20,000 images needed 11.8 GB).
    block = max(1, min(len(q_desc), common.BLOCK_ENTRIES // max(n, 1)))
    starts = range(0, len(q_desc), block)
    for b in tqdm(starts, desc="evaluating", unit="block", disable=None, file=sys.stderr):
        q_block, q_ids = q_desc[b : b + block], queries.ids[b : b + block] if leave_one_out else []
        found, found_scores = ranked(flat, lookup, q_block, n, how)
        if approx is not None:
            k_eval = min(n, 1000)
            approx_found, found_scores = ranked(approx, approx_lookup, q_block, k_eval, how, refine)
            exact_top = [r[r >= 0][:11] for r in found]
            approx_top = [r[r >= 0][:11] for r in approx_found]
            if leave_one_out:
                exact_top = [t[t != q][:10] for t, q in zip(exact_top, q_ids, strict=True)]
                approx_top = [t[t != q][:10] for t, q in zip(approx_top, q_ids, strict=True)]
            exact_tops += exact_top
            approx_tops += approx_top
            found = approx_found
        for j, row in enumerate(found):
            qi = b + j
            keep = row >= 0
            if leave_one_out:
                keep &= row != queries.ids[qi]
            row, row_scores = row[keep], found_scores[j][keep]
            # leave-one-out: the query is an indexed id (its file); else a query file
            query = int(queries.ids[qi]) if leave_one_out else queries.paths[qi]
            row, row_scores = verify(query, row, row_scores)
            rel = np.array([label_of[int(i)] == queries.labels[qi] for i in row], dtype=bool)
            total = int((db_labels == queries.labels[qi]).sum()) - (1 if leave_one_out else 0)
            per_query.append(
                {
                    "query": queries.paths[qi],
                    "label": queries.labels[qi],
                    "ap": metrics.average_precision(rel, total),
                    "p_at_1": metrics.precision_at(rel, 1),
                    "p_at_10": metrics.precision_at(rel, 10),
                    "top10": [
                        {
                            "id": int(i),
                            "path": rows[int(i)]["path"],
                            "label": label_of[int(i)],
                            "score": round(float(sc), 6),
                        }
                        for i, sc in zip(row[:10], row_scores[:10], strict=True)
                    ],
                }
            )
    verify.describe(result)
    if approx is not None:
        result["recall_at_10"] = metrics.recall_at(approx_tops, exact_tops, 10)
    classes = sorted({q["label"] for q in per_query})
    per_class = {
        c: {
            "queries": sum(q["label"] == c for q in per_query),
            "map": float(np.mean([q["ap"] for q in per_query if q["label"] == c])),
            "p_at_10": float(np.mean([q["p_at_10"] for q in per_query if q["label"] == c])),
        }
        for c in classes
    }
    result.update(
        {
            "queries": len(per_query),
            "database": n,
            "protocol": "leave-one-out" if leave_one_out else f"held-out queries from {source}",
            "map": float(np.mean([q["ap"] for q in per_query])),
            "p_at_1": float(np.mean([q["p_at_1"] for q in per_query])),
            "p_at_10": float(np.mean([q["p_at_10"] for q in per_query])),
            "per_class": per_class,
            "per_query": per_query,
        }
    )
    return result
