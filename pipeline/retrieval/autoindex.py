"""Choosing an index for a collection, and measuring and tuning its recall.

`choose` is a pure function, after autofaiss: (vector count, dimension, memory
budget) -> a FAISS factory string and search parameters. `tune` then raises
nprobe or efSearch until recall@10, measured against exact search on queries
sampled from the collection itself, reaches the target. (`growing` updates
an IVF index without retraining.)
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from pipeline.errors import CbirError
from pipeline.retrieval import (
    exact,
    factories,
    index_files,
    indexes,
    shards,
    whitening,
    whitening_fit,
)
from pipeline.retrieval.metrics import recall_at
from pipeline.retrieval.ranking import ranked
from pipeline.store import reads, writes

_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str | int) -> int:
    """'2GB', '512M', '1.5g', 1000 -> bytes (binary units); at least one byte."""
    shown = repr(text) if len(repr(text)) <= 40 else repr(text)[:37] + "..."
    size: float = 0
    if isinstance(text, int) and not isinstance(text, bool):
        size = text
    elif m := re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmgtKMGT]?)(i?[bB])?\s*", str(text)):
        size = float(m.group(1)) * _UNITS[m.group(2).upper()]
    else:
        raise CbirError(f"cannot read memory size {shown}: use e.g. 2GB or 512MB")
    # float() of 400 digits is inf, and int(inf) an OverflowError.
    if size < 1 or size == math.inf:
        raise CbirError(f"memory size must be at least 1 byte and finite, got {shown}")
    return int(size)


@dataclass(frozen=True)
class Choice:
    factory: str
    params: dict[str, float]
    bytes_estimate: int
    reason: str


def choose(
    n: int,
    dim: int,
    max_memory: int,
    flat_threshold: int = 20_000,
    hnsw_threshold: int = 100_000,
    hnsw_m: int = 32,
    flat_overhead: float = 1.1,
    hnsw_overhead: float = 1.2,
    pq_overhead: float = 1.2,
    pq_refine: int = 40,
) -> Choice:
    """The index to build for n vectors of `dim` floats within `max_memory` bytes.

    - Up to `flat_threshold` vectors, exact search is fast enough: Flat.
    - Up to `hnsw_threshold`, HNSW (`hnsw_m` links) when the vectors fit: fast
      single queries, high recall.
    - Beyond, IVF-Flat when the vectors fit (builds much faster than HNSW on few cores).
    - Otherwise IVF-PQ: compressed codes, with refine=`pq_refine`, i.e. that many
      x k candidates re-scored exactly from the memory-mapped vector file, which
      is not counted in the index's memory.

    The overheads are safety factors on the raw estimates (allocator slack,
    training buffers). A pure function: the thresholds are parameters, after
    autofaiss' get_optimal_index_keys_v2.
    """
    raw = n * dim * 4
    links = n * hnsw_m * 2 * 8  # HNSW: 2M neighbour ids of 8 bytes at level 0
    if n <= flat_threshold and raw * flat_overhead <= max_memory:
        return Choice("Flat", {}, raw, f"{n} vectors: exact search is fast enough")
    if n <= hnsw_threshold and raw * hnsw_overhead + links <= max_memory:
        return Choice(
            f"HNSW{hnsw_m}",
            {"efSearch": 64},
            int(raw * flat_overhead + links),
            "fits in memory; HNSW",
        )
    nlist = factories.ivf_lists(n)
    centroids = nlist * dim * 4
    if raw * flat_overhead + centroids + n * 8 <= max_memory:
        return Choice(
            f"IVF{nlist},Flat", {"nprobe": 16}, raw + centroids + n * 8, "fits in memory; IVF-Flat"
        )
    # 4-bit fast-scan PQ: 16 centroids per sub-quantizer train in seconds where
    # 8-bit PQ over 2048 dimensions takes many minutes on two cores.
    for m in (512, 256, 128, 64, 32, 16):
        if dim % m:
            continue
        est = n * (m // 2 + 8) + centroids + 16 * dim * 4
        if est * pq_overhead <= max_memory:
            return Choice(
                f"IVF{nlist},PQ{m}x4fs",
                {"nprobe": 16, "refine": pq_refine},
                est,
                f"{raw / 2**30:.1f} GiB of vectors exceed the budget; IVF-PQ with {m // 2}-byte "
                f"codes and exact re-scoring of {pq_refine} x k candidates from the vector file",
            )
    raise CbirError(
        f"no index for {n} vectors fits in {max_memory / 2**20:.0f} MiB; raise --max-memory"
    )


@dataclass
class RecallProbe:
    """Queries sampled from the collection and their exact top k."""

    queries: np.ndarray
    truth: np.ndarray  # (q, k) ids
    lookup: Any  # ids -> stored vectors, for exact re-scoring as search does it
    k: int = 10


def make_probe(rows, ids: np.ndarray, n_queries: int = 200, k: int = 10, seed: int = 0, space=None):
    """Queries sampled from rows[ids] and their exact top k; with `space` (a whitened
    index's transform) the exact top k in that space, which is where it ranks."""
    rng = np.random.default_rng(seed)
    picked = np.sort(rng.choice(ids, min(n_queries, len(ids)), replace=False))
    queries = np.asarray(rows[picked], dtype=np.float32)
    if space is None:
        truth = exact.top_k(rows, ids, queries, k)[1]
    else:
        truth = exact.top_k(whitening.TransformedRows(rows, space), ids, space(queries), k)[1]
    return RecallProbe(
        queries, truth, lambda i: np.asarray(rows[np.asarray(i, dtype=np.int64)], np.float32), k
    )


def recall_probe(coll, index: Any = None) -> RecallProbe:
    """A recall probe over the collection's indexed vectors (in `index`'s whitened space,
    when it is a whitened index)."""
    space = whitening.transform_of(index) if index is not None else None
    return make_probe(coll.rows(), coll.indexed_ids(), space=space)


def measure_recall(index: faiss.Index, probe: RecallProbe, params: dict[str, float]) -> float:
    """recall@k of `index` with `params`, searched the way `cbir search` does."""
    factories.apply_params(index, params)
    found, _ = ranked(
        index, probe.lookup, probe.queries, probe.k, refine=int(params.get("refine", 1))
    )
    return recall_at(found, probe.truth, probe.k)


def tune(
    index: faiss.Index, probe: RecallProbe, target: float, params: dict[str, float]
) -> dict[str, float]:
    """Smallest nprobe / efSearch (doubling) that reaches `target` recall; else the largest tried."""
    inner = faiss.try_extract_index_ivf(index)  # a bare IVF, or one under IDMap2 / a transform
    if inner is None:
        inner = faiss.downcast_index(index)
        if isinstance(inner, faiss.IndexPreTransform):  # a whitened index
            inner = faiss.downcast_index(inner.index)
        if isinstance(inner, faiss.IndexIDMap | faiss.IndexIDMap2):
            inner = faiss.downcast_index(inner.index)
    if isinstance(inner, faiss.IndexIVF):
        key, values = (
            "nprobe",
            [v for v in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512) if v <= inner.nlist],
        )
    elif isinstance(inner, faiss.IndexHNSW):
        key, values = "efSearch", [16, 32, 64, 128, 256, 512]
    else:
        return params
    tried = dict(params)
    for v in values:
        tried = {**params, key: v}
        if measure_recall(index, probe, tried) >= target:
            return tried
    return tried


def build_and_save(
    coll,
    name: str,
    factory: str,
    params: dict[str, float] | None = None,
    target_recall: float | None = None,
    note: str | None = None,
    sharding: shards.Sharding | None = None,
    whiten: whitening_fit.Plan | None = None,
) -> dict[str, Any]:
    """Build, persist and record an index with its measured recall@10; returns the record.

    With `target_recall`, search parameters (nprobe, efSearch) are raised
    until the measured recall@10 reaches it. With `sharding`, an IVF index is
    built in shards and merged on disk (`shards.build_ondisk`); the returned
    record then also has `timings` (train, add, merge seconds). With `whiten`
    (a validated `whitening_fit.Plan`) the index is whitened: its record's factory
    is 'WhitenD,FACTORY', its note the whitening's JSON, and its recall@10 is
    measured against exact search in the same whitened space.
    """
    index_files.index_path(coll.index_dir, name)  # refuse a bad name before any work
    gen = coll.generation
    started = time.perf_counter()
    data, timings = None, {}
    if whiten is not None:
        if sharding is not None:
            raise CbirError("a whitened index is one file: leave out --shards and --engine ray")
        index = indexes.build(coll, factory, params, whiten=whiten.pca)
    elif sharding is None:
        index = indexes.build(coll, factory, params)
    else:
        index, data, timings = shards.build_ondisk(coll, name, factory, sharding, params)
    seconds = time.perf_counter() - started
    try:
        params = dict(params or {})
        recall = 1.0
        if factory != indexes.EXACT_FACTORY or whiten is not None:
            probe = recall_probe(coll, index)
            if target_recall:
                params = tune(index, probe, target_recall, params)
            recall = measure_recall(index, probe, params)
        if whiten is not None:
            factory, note = whitening.factory_name(whiten.dim, factory), whiten.note(note)
        record = {
            "factory": factory,
            "params": json.dumps(params),
            "generation": gen,
            "build_seconds": round(seconds, 3),
            "built_at": writes.now(),
            "recall_at_10": round(recall, 4),
            "note": note,
            "trained_recall": round(recall, 4),
        }
        saved = indexes.save(coll, name, index, record, data)
    except BaseException:
        discard_unpublished(coll, name, data)
        raise
    return {**saved, "timings": timings} if timings else saved


def discard_unpublished(coll, name: str, data: Path | None) -> None:
    """Remove a new .ivfdata that no committed record names (a failed build or update)."""
    if data is None:
        return
    record = reads.index_record(coll.db, name)
    if not record or record.get("file") != data.with_suffix(".faiss").name:
        index_files.remove_files([data])
