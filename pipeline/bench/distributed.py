"""`cbir bench distributed`: what Ray costs and what one driver can write.

Three measurements, in one run on one machine:

1. Indexing images/s of the local engine against the Ray engine with one
   actor of all CPUs and with one actor per CPU (equal resources), each into
   a new catalog. The steady rate (after the first batch is committed) is the
   comparison; the total includes starting the actors and loading the models.
2. The driver's commit throughput alone: generated unit vectors through the
   same writer (`jobs._Batches`: vector file append + fsync, then one SQLite
   transaction per batch), at several batch sizes.
3. A sharded IVF build merged on disk against a single-shot build of the same
   factory (see `bench_shards`).
"""

from __future__ import annotations

import hashlib
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import api
from pipeline.config import Settings
from pipeline.embed.interface import DIM, l2_normalize
from pipeline.errors import CbirError
from pipeline.ingest import jobs
from pipeline.ingest.plan import Plan
from pipeline.inputs.scan import ScannedFile, scan
from pipeline.store import writes
from pipeline.store.collection import writing


def _index_once(
    files: list[str], s: Settings, engine: jobs.Engine | None, args: tuple[Any, ...]
) -> float:
    """Seconds to index `files` into a new catalog (model loads and actor starts included).

    Every run builds the model from the same `cached_embedder` arguments: with
    int8, calibrating on each run's own files would quantise a new model each time.
    """
    api.cached_embedder.cache_clear()  # each run loads its model, as a new process would

    def load(_todo: list[str], coll: Any) -> Any:
        embedder = api.cached_embedder(*args)
        coll.check_embedder(embedder, False, list(args[5]))  # adopts it, as embedder_for does
        return embedder

    with tempfile.TemporaryDirectory(prefix="cbir-bench-") as tmp:
        settings = s.replace(catalog=str(Path(tmp) / "c.db"), index_dir=str(Path(tmp) / "i"))
        started = time.perf_counter()
        with writing(settings.catalog, settings.index_dir) as coll:
            jobs.run_index(files, coll, lambda todo: load(todo, coll), settings, engine=engine)
        return time.perf_counter() - started


def engines(
    folder: str, s: Settings, limit: int, repeats: int, log: Callable[[str], Any]
) -> list[dict[str, Any]]:
    """Images/s of the local engine and of Ray at 1 x all CPUs and all x 1 CPU.

    The steady rate is marginal: (images - one batch) / (time of the whole job
    - time of a one-batch job), so what every job pays once (loading models,
    starting actors, Ray Data planning) cancels out; the total rate includes it.
    """
    from pipeline import raycluster
    from pipeline.ingest import engine_ray

    files = sorted(f.path for f in scan([folder], labels="none"))[:limit]
    if len(files) < 2 * s.batch_size:
        raise CbirError(
            f"bench distributed needs at least {2 * s.batch_size} images under {folder}"
        )
    import os

    cpus = os.cpu_count() or 1
    # The same model for every run: the catalog's choice for these files, fixed once.
    with (
        tempfile.TemporaryDirectory(prefix="cbir-bench-") as tmp,
        writing(Path(tmp) / "c.db", Path(tmp) / "i") as coll,
    ):
        args = api.embedder_args(s, coll, todo=files)
    rows = []
    if len(files) < 8 * s.batch_size:
        log(f"  note: fewer than {8 * s.batch_size} images (8 batches): the steady rate is noisy")

    small = files[: s.batch_size]

    def measure(name: str, make: Callable[[], jobs.Engine | None]) -> None:
        once = statistics.median(_index_once(small, s, make(), args) for _ in range(repeats))
        whole = statistics.median(_index_once(files, s, make(), args) for _ in range(repeats))
        row = {
            "engine": name,
            "total": len(files) / whole,
            "steady": (len(files) - len(small)) / max(1e-9, whole - once),
            "startup_s": once,
        }
        rows.append(row)
        log(
            f"  {name:<28} {row['steady']:8.1f} img/s steady {row['total']:8.1f} img/s total "
            f"(a one-batch job: {once:.1f} s)"
        )

    log(
        f"engines: {len(files)} images under {folder}, {args[3]} {args[4]}, batch {s.batch_size}, "
        f"{cpus} CPUs, {repeats} repeat(s), medians"
    )
    _index_once(files[: 2 * s.batch_size], s, None, args)  # warm-up: int8 calibration, caches
    measure("local", lambda: None)
    with raycluster.connected(s.ray_address or None, num_cpus=cpus):

        def ray_engine(actors: int, actor_cpus: int) -> Callable[[], jobs.Engine]:
            def loader_for(todo: list[str]) -> Any:
                import functools

                return functools.partial(api.cached_embedder, *args)

            return lambda: engine_ray.RayEngine(loader_for, None, actors, None, actor_cpus)

        measure(f"ray, 1 actor x {cpus} CPUs", ray_engine(1, cpus))
        if cpus > 1:
            measure(f"ray, {cpus} actors x 1 CPU", ray_engine(cpus, 1))
    base = rows[0]["steady"]
    for row in rows[1:]:
        overhead = 1 - row["steady"] / base if base else float("nan")
        log(f"  {row['engine']}: {overhead:+.1%} overhead against local (steady rate)")
    return rows


class _Generated:
    """An embedder that is never run: the model identity for generated vectors."""

    fingerprint = {
        "architecture": "generated vectors (cbir bench distributed)",
        "pooling": "none",
        "weights_sha256": "0" * 64,
        "preprocessing": "none",
        "dimension": DIM,
        "normalization": "l2",
    }
    producer = {"runtime": "generated", "precision": "fp32", "calibration": None}
    batch_size, source = 64, "generated"

    def embed(self, pixels: np.ndarray) -> np.ndarray:
        raise AssertionError("generated vectors are never embedded")


def commit_throughput(
    n: int, batch_sizes: list[int], log: Callable[[str], Any]
) -> list[dict[str, Any]]:
    """Vectors/s through the driver's writer, fed with generated unit vectors."""
    rng = np.random.default_rng(0)
    pool = l2_normalize(rng.standard_normal((4096, DIM)).astype(np.float32))
    rows = []
    for size in batch_sizes:
        # Batches made up front: the figure is the writer's, not the generator's.
        batches = []
        for start in range(0, n, size):
            batch = []
            for i in range(start, min(n, start + size)):
                f = ScannedFile(f"/generated/{i:09d}.jpg", 1000, 0.0, None)
                sha = hashlib.sha256(str(i).encode()).hexdigest()
                batch.append((f, jobs.Embedded(sha, 224, 224, pool[i % len(pool)])))
            batches.append(batch)
        gen = _Generated()
        with (
            tempfile.TemporaryDirectory(prefix="cbir-bench-") as tmp,
            writing(Path(tmp) / "c.db", Path(tmp) / "i") as coll,
        ):
            coll.check_embedder(gen)
            run_id = writes.start_run(coll.db, "bench", {})
            job = jobs._Batches(coll, lambda _t, g=gen: g, Plan(), run_id, jobs.Summary())
            started = time.perf_counter()
            for batch in batches:
                job.commit(batch)
            seconds = time.perf_counter() - started
            writes.end_run(coll.db, run_id, "done", {})
        rows.append({"batch": size, "vectors_per_s": n / seconds, "seconds": seconds})
        log(
            f"  commit batch {size:>5}: {n / seconds:9.0f} vectors/s "
            f"({n} vectors, {n * DIM * 4 / seconds / 2**20:.0f} MB/s of vectors)"
        )
    return rows
