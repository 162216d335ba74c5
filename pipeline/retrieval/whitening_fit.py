"""Fitting a whitening to the collection: learning it, and the guard that validates it
on held-out queries before any index uses it.

The guard: a transform is learned on a seeded random 80% of the indexed
vectors (or, with a ground-truth CSV, on every vector but the CSV's queries)
and the held-out queries rank all indexed vectors, themselves excluded, with
and without it. If the whitened mAP is lower, nothing is built (exit 1). The
transform that was validated is the one the index uses (it is not refitted on
all vectors afterwards).

This is the part of whitening that reads the collection (its vectors, labels
and the ground-truth CSV); the transform itself (request, files, the whitened
index) is in `whitening`, which this module builds on.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import faiss
import numpy as np

from pipeline.errors import CbirError
from pipeline.inputs.groundtruth import load_groundtruth
from pipeline.retrieval import metrics
from pipeline.retrieval.whitening import (
    DEFAULT_SHRINKAGE,
    SUGGEST,
    Request,
    eigen_power,
    load_transform,
    resolve_dim,
    shrinkage_of,
    transform_problem,
    whitened,
    write_transform,
)
from pipeline.store import reads, vectors

HOLDOUT = 0.2  # share of the indexed vectors held out as validation queries
SEED = 0
MAX_QUERIES = 1000  # validation queries at most (a seeded sample of the held-out ones)
FIT_ROWS = 65_536  # vectors a transform is learned from at most (a seeded sample)
BLOCK_ENTRIES = 1 << 24  # query x database scores in memory at a time


def learn(rows: np.ndarray, ids: np.ndarray, dim: int, shrinkage: float) -> faiss.PCAMatrix:
    """A PCAMatrix d -> dim with eigen_power -0.5 * (1 - shrinkage), learned on rows[ids]."""
    if len(ids) > FIT_ROWS:
        ids = np.sort(np.random.default_rng(SEED).choice(ids, FIT_ROWS, replace=False))
    x = np.ascontiguousarray(vectors.take(rows, ids), dtype=np.float32)
    pca = faiss.PCAMatrix(x.shape[1], dim, eigen_power(shrinkage), False)
    try:
        pca.train(x)
    except (RuntimeError, MemoryError) as e:
        last = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise CbirError(f"cannot learn a whitening to {dim} dimensions: {last}", 1) from None
    if transform_problem(pca):  # what a --whitening file is refused for, refused here too
        raise CbirError(
            f"whitening refused: the {len(ids)} fitting vectors span fewer than {dim} "
            f"dimensions, so full whitening divides by (nearly) zero; {SUGGEST}",
            1,
        )
    return pca


# --- validation ----------------------------------------------------------------------------


@dataclass
class Holdout:
    """Validation data: the ids to fit on, the query ids, each query's relevant ids."""

    kind: str  # "labels" or "groundtruth"
    fit_ids: np.ndarray
    queries: np.ndarray
    relevant: list[np.ndarray] = field(default_factory=list)
    source: str | None = None  # the CSV


def holdout(coll, validate: str | None) -> Holdout | None:
    """The validation split for `validate` ("labels", a CSV, or None = labels when usable)."""
    ids = coll.indexed_ids()
    if validate not in (None, "labels"):
        return _groundtruth_holdout(coll, ids, str(validate))
    rng = np.random.default_rng(SEED)
    held = np.zeros(len(ids), dtype=bool)
    held[rng.permutation(len(ids))[: max(1, round(HOLDOUT * len(ids)))]] = True
    fit_ids, queries = ids[~held], ids[held]
    rows = reads.lookup(coll.db, ids)
    labels = np.array([rows[int(i)]["label"] or "" for i in ids], dtype=object)
    label_of = dict(zip(ids.tolist(), labels.tolist(), strict=True))
    counts: dict[str, int] = {}
    for lab in labels:
        counts[lab] = counts.get(lab, 0) + 1
    usable = [int(q) for q in queries if label_of[int(q)] and counts[label_of[int(q)]] > 1]
    per_label: dict[str, int] = {}
    for q in usable:
        per_label[label_of[q]] = per_label.get(label_of[q], 0) + 1
    if sum(n >= 2 for n in per_label.values()) < 2:
        if validate == "labels":
            raise CbirError(
                f"the catalog's labels cannot validate whitening: the {len(queries)} held-out "
                "images need at least 2 labels with 2 images each; give --validate FILE.csv",
                1,
            )
        return None
    q_ids = np.array(usable, dtype=np.int64)
    if len(q_ids) > MAX_QUERIES:
        q_ids = np.sort(rng.choice(q_ids, MAX_QUERIES, replace=False))
    by_label: dict[str, list[int]] = {}
    for i, lab in label_of.items():
        by_label.setdefault(lab, []).append(i)
    relevant = [
        np.array([i for i in by_label[label_of[int(q)]] if i != int(q)], dtype=np.int64)
        for q in q_ids
    ]
    return Holdout("labels", fit_ids, q_ids, relevant)


def _groundtruth_holdout(coll, ids: np.ndarray, csv_path: str) -> Holdout:
    """Fit on every vector but the CSV's queries; validate on those queries."""
    rows = reads.lookup(coll.db, ids)
    truth = load_groundtruth(csv_path, {int(i): rows[int(i)]["path"] for i in ids})
    queries = np.array(truth.queries, dtype=np.int64)
    relevant = [np.array(truth.relevant[int(q)], dtype=np.int64) for q in queries]
    if len(queries) > MAX_QUERIES:
        keep = np.sort(np.random.default_rng(SEED).choice(len(queries), MAX_QUERIES, False))
        queries, relevant = queries[keep], [relevant[k] for k in keep]
    fit_ids = np.setdiff1d(ids, np.array(truth.queries, dtype=np.int64))
    return Holdout("groundtruth", fit_ids, queries, relevant, csv_path)


def mean_ap(
    rows: np.ndarray,
    ids: np.ndarray,
    hold: Holdout,
    space: Callable[[np.ndarray], np.ndarray] | None = None,
) -> float:
    """mAP of the held-out queries ranking every indexed vector (themselves excluded),
    by cosine of the raw vectors, or of the whitened ones with `space`.

    Ties go to the smaller id. With `space` the whitened database (n x D floats)
    is held in memory; queries go in blocks of BLOCK_ENTRIES scores.
    """
    if space is None:
        db = _Raw(rows, ids)
    else:
        db = np.concatenate(
            [space(vectors.take(rows, ids[s : s + 65536])) for s in range(0, len(ids), 65536)]
        )
    pos = {int(i): p for p, i in enumerate(ids)}
    q_all = vectors.take(rows, hold.queries)
    if space is not None:
        q_all = space(q_all)
    aps: list[float] = []
    block = max(1, BLOCK_ENTRIES // max(1, len(ids)))
    for b in range(0, len(hold.queries), block):
        scores = _scores(db, q_all[b : b + block])
        for j, s in enumerate(scores):
            qi = b + j
            s[pos[int(hold.queries[qi])]] = -np.inf  # the query is not its own result
            order = np.argsort(-s, kind="stable")[:-1]  # ids ascending: ties by id
            rel = np.isin(ids[order], hold.relevant[qi])
            aps.append(metrics.average_precision(rel, len(hold.relevant[qi])))
    return float(np.mean(aps)) if aps else 0.0


class _Raw:
    def __init__(self, rows, ids):
        self.rows, self.ids = rows, ids


def _scores(db, queries: np.ndarray) -> np.ndarray:
    if isinstance(db, _Raw):
        parts = [
            queries @ np.asarray(vectors.take(db.rows, db.ids[s : s + 65536]), np.float32).T
            for s in range(0, len(db.ids), 65536)
        ]
        return np.hstack(parts)
    return queries @ db.T


# --- the plan: fit or read, validate ---------------------------------------------------------


@dataclass
class Plan:
    """A validated transform and what the index record says about it."""

    pca: faiss.PCAMatrix
    info: dict[str, Any]

    @property
    def dim(self) -> int:
        return int(self.pca.d_out)

    def note(self, chosen: str | None = None) -> str:
        out: dict[str, Any] = {"whitening": self.info}
        if chosen:
            out["chosen"] = chosen
        return json.dumps(out, sort_keys=True)


def plan(coll, req: Request) -> Plan:
    """Learn (or read) the transform of `req` and validate it; refused in one line when it hurts.
    With `req.save`, the validated transform is written there and its sha256 recorded.
    """
    made = _plan(coll, req)
    if req.save is not None:
        made.info.update(
            saved_file=os.path.abspath(req.save), saved_sha256=write_transform(made.pca, req.save)
        )
    return made


def _plan(coll, req: Request) -> Plan:
    """`plan` before any file is written.

    Bad values (a dimension over the catalog's, an unreadable file or CSV) are
    exit 2; a transform that lowers the validation mAP, a collection too small
    to learn D dimensions, or no way to validate a learned one are exit 1.
    """
    d_in = coll.dim
    ids = coll.indexed_ids()
    if d_in == 0 or len(ids) == 0:
        raise CbirError("the catalog has no indexed images yet: run 'cbir index FOLDER' first")
    # Every row is checked before any is learned from or ranked (validation ranks them all),
    # so a damaged one is the only line, not numpy's overflow warnings first.
    coll.refuse_damaged()
    dim = resolve_dim(req, d_in)
    shrinkage = DEFAULT_SHRINKAGE if req.shrinkage is None else req.shrinkage
    if req.file is None and dim > d_in:
        raise CbirError(f"--whiten-dim {dim} is more than the vectors' {d_in} dimensions")
    pca, digest = load_transform(req.file, d_in, req.digest) if req.file else (None, None)
    rows = coll.rows()
    validate_arg = req.validate
    if validate_arg not in (None, "labels"):
        validate_arg = os.path.abspath(validate_arg)  # a rebuild validates the same way
    info: dict[str, Any] = {"d_in": d_in, "validate_arg": validate_arg}
    hold = holdout(coll, validate_arg)
    if pca is None:
        if hold is None:
            raise CbirError(
                "whitening refused: nothing to validate a learned whitening on (the catalog "
                "has no usable labels); give --validate FILE.csv (query,relevant), or a "
                "fitted --whitening FILE",
                1,
            )
        if dim >= len(hold.fit_ids):
            raise CbirError(
                f"whitening refused: the collection is too small to learn {dim} dimensions from "
                f"{len(hold.fit_ids)} fitting vectors; {SUGGEST}",
                1,
            )
        pca = learn(rows, hold.fit_ids, dim, shrinkage)
        info.update(source="learned", fit_vectors=int(min(len(hold.fit_ids), FIT_ROWS)))
        info["seed"] = SEED
    else:
        info.update(source="file", file=os.path.abspath(str(req.file)), file_sha256=digest)
    info.update(dim=int(pca.d_out), shrinkage=shrinkage_of(pca))
    if hold is None:
        info.update(validation=None)
        return Plan(pca, info)
    raw = mean_ap(rows, ids, hold)
    white = mean_ap(rows, ids, hold, whitened(pca))
    what = "labels" if hold.kind == "labels" else f"ground truth {hold.source}"
    info.update(
        validation=what,
        queries=int(len(hold.queries)),
        map_unwhitened=round(raw, 4),
        map_whitened=round(white, 4),
    )
    if not (white >= raw) or not math.isfinite(white):
        where = f"the transform in {req.file}" if req.file else "whitening"
        raise CbirError(
            f"{where} refused: it lowers the validation mAP from {raw:.4f} (unwhitened) to "
            f"{white:.4f} (whitened) ({what}, {len(hold.queries)} held-out queries, "
            f"PCA {d_in}->{pca.d_out}, shrinkage {shrinkage_of(pca):g}); {SUGGEST}",
            1,
        )
    return Plan(pca, info)
