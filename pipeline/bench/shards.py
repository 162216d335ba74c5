"""A sharded IVF build merged on disk against the same build in one go (`cbir bench distributed`).

Both builds start from one trained index (trained once, on the sample
`indexes.fill` takes), so any difference in their results comes from
sharding and merging alone: with shards of contiguous ids the merged lists
hold the same entries in the same order, and the top 10s should agree
exactly. Vectors are generated in chunks straight into a vector file (a
million 2048-d vectors are an 8 GB file, never 8 GB of memory), from real
features through `synth` when given, else as tight clusters; shards read
that file memory-mapped, as they read a catalog's.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from pipeline.bench import synth
from pipeline.embed.interface import l2_normalize
from pipeline.errors import CbirError
from pipeline.retrieval import autoindex, factories, index_files, indexes
from pipeline.retrieval import shards as sharded
from pipeline.store import vectors

CHUNK = 50_000


def clustered(n: int, dim: int, seed: int = 0, chunk: int = CHUNK) -> Iterator[np.ndarray]:
    """n unit vectors around ~sqrt(n)/2 random centres, in chunks.

    The noise has norm 0.6 whatever the dimension (cosine to its centre about
    0.86), so clusters stay clusters in 2048 dimensions instead of the near
    orthogonal cloud that plain Gaussian vectors make there.
    """
    rng = np.random.default_rng(seed)
    centres = l2_normalize(
        rng.standard_normal((max(16, min(4096, int(math.sqrt(n) / 2))), dim), dtype=np.float32)
    )
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        noise = rng.standard_normal((m, dim), dtype=np.float32) * (0.6 / math.sqrt(dim))
        yield l2_normalize(centres[rng.integers(0, len(centres), m)] + noise)


def _timed(fn: Callable[..., Any], *args: Any) -> tuple[float, Any]:
    started = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - started, out


def run(
    n: int,
    dim: int,
    factory: str,
    shards: int,
    engine: str,
    workdir: str | Path,
    real: np.ndarray | None = None,
    log: Callable[[str], Any] = print,
    params: dict[str, float] | None = None,
    address: str | None = None,
    keep: bool = False,
) -> dict[str, Any]:
    """Build `factory` over n generated vectors in one go and in `shards` shards merged on
    disk (tasks under `engine`: local or ray); return seconds, sizes, recall@10 of each
    against exact search on 200 queries, and whether their top 10s agree.

    `params` are the search parameters (default nprobe=16); files go to
    `workdir` and are removed afterwards unless `keep`.
    """
    how = sharded.sharding(shards, engine, address)
    if n < 1:
        raise CbirError(f"the benchmark needs at least one vector, got n={n}")
    if real is not None:
        real = np.asarray(real, dtype=np.float32)
        dim = real.shape[1]
    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    tag = index_files.new_tag()
    vec_file = work / f"bench+{tag}.vectors"
    trained = sharded.temp_path(work, "bench", tag, "trained")
    data = work / f"bench+{tag}.ivfdata"
    made: list[Path] = [vec_file, trained, data, data.with_suffix(".faiss")]
    out: dict[str, Any] = {"n": n, "dim": dim, "factory": factory, "shards": how.shards}
    out["engine"] = how.engine
    try:
        # Generate in chunks straight to the file, with each row's CRC-32 as a catalog keeps it.
        crcs = np.empty(n, dtype=np.int64)
        started, done = time.perf_counter(), 0
        chunks = synth.generate(real, n, chunk=CHUNK) if real is not None else clustered(n, dim)
        with open(vec_file, "wb") as f:
            for chunk in chunks:
                f.write(np.ascontiguousarray(chunk, dtype=np.float32).tobytes())
                crcs[done : done + len(chunk)] = vectors.crc(chunk)
                done += len(chunk)
        out["generate_s"] = round(time.perf_counter() - started, 2)
        log(
            f"generated {n} x {dim} vectors in {out['generate_s']} s ({'synth' if real is not None else 'clustered'})"
        )
        rows = vectors.open_rows(vec_file, dim, n)
        ids = np.arange(n, dtype=np.int64)

        index = factories.make_index(factory, dim)
        sharded.check_mergeable(index, factory)
        params = dict(params if params is not None else {"nprobe": 16})
        factories.apply_params(index, params)  # a bad parameter fails before any work
        train_s, _ = _timed(indexes.train, index, rows, ids, factory)
        faiss.write_index(index, str(trained))
        out["train_s"] = round(train_s, 2)
        log(f"trained {factory} on {len(indexes.training_sample(ids))} vectors in {train_s:.1f} s")

        single = faiss.read_index(str(trained))
        known = dict(zip(ids.tolist(), crcs.tolist(), strict=True))
        add_s, _ = _timed(indexes.add_rows, single, rows, ids, known, factory)
        del known
        out["single_add_s"] = round(add_s, 2)
        out["single_s"] = round(train_s + add_s, 2)
        single_file = work / f"bench+{tag}.single.faiss"
        made.append(single_file)
        out["single_bytes"] = index_files.write_atomic(single, single_file)
        log(f"single: added {n} in {add_s:.1f} s, {out['single_bytes']:,} bytes")

        tasks = sharded.shard_tasks(
            trained, vec_file, dim, n, ids, crcs, how.shards,
            lambda k: sharded.temp_path(work, "bench", tag, f"shard{k}"), factory,
        )  # fmt: skip
        made += [Path(t["out"]) for t in tasks]
        shard_s, results = _timed(sharded.run_tasks, tasks, how)
        merged = faiss.read_index(str(trained))
        started = time.perf_counter()
        sources = [faiss.read_index(t["out"], faiss.IO_FLAG_MMAP) for t in tasks]
        sharded.merge(merged, sources, data)
        del sources
        sharded.fsync_data(data)
        merge_s = time.perf_counter() - started
        out["shard_add_s"] = round(shard_s, 2)
        out["shard_task_s"] = [round(r["seconds"], 2) for r in results]
        out["merge_s"] = round(merge_s, 2)
        out["sharded_s"] = round(train_s + shard_s + merge_s, 2)
        faiss_bytes = index_files.write_atomic(merged, data.with_suffix(".faiss"))
        out["sharded_bytes"] = faiss_bytes + data.stat().st_size
        del merged
        # Searched as `cbir search` reads it: the lists mapped from the .ivfdata.
        ondisk = index_files.read(data.with_suffix(".faiss"), ondisk=True)
        log(
            f"sharded: {len(tasks)} shards ({how.engine}) added in {shard_s:.1f} s, merged in "
            f"{merge_s:.1f} s, {out['sharded_bytes']:,} bytes"
        )

        probe = autoindex.make_probe(rows, ids, 200)
        out["params"] = params
        out["recall_single"] = round(autoindex.measure_recall(single, probe, params), 4)
        out["recall_sharded"] = round(autoindex.measure_recall(ondisk, probe, params), 4)
        d1, i1 = single.search(probe.queries, probe.k)
        d2, i2 = ondisk.search(probe.queries, probe.k)
        out["top10_same"] = bool(np.array_equal(i1, i2) and np.allclose(d1, d2, atol=1e-5))
        out["top10_agree_fraction"] = round(float(np.mean(i1 == i2)), 4)
        log(
            f"recall@10 single {out['recall_single']:.4f}, sharded {out['recall_sharded']:.4f}; "
            f"top 10s {'identical' if out['top10_same'] else 'differ'} "
            f"({out['top10_agree_fraction']:.4f} of positions agree)"
        )
        del ondisk, single
    finally:
        if not keep:
            for f in made:
                f.unlink(missing_ok=True)
    return out
