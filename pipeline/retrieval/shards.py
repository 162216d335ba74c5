"""Sharded IVF builds merged on disk.

A sharded build trains one empty IVF index on the driver, on the sample
`indexes.fill` trains on, and writes it to a temporary file. Each shard of
the collection's ids is then a task (a plain call under the local engine, a
Ray task under `ray`) that gets paths, not objects: it reads the trained
index, memory-maps the vector file, checks each vector's CRC-32, adds the
vectors under their ids and writes its shard file. The driver merges the
shards' inverted lists into a new `NAME+TAG.ivfdata` (`merge`, after
`faiss.contrib.ondisk.merge_ondisk`) and fsyncs it; the caller writes the
index as `NAME+TAG.faiss` and commits the record, which switches indexes.
Growing an on-disk index (`growing`) merges [the live index, a shard of the
added ids] the same way into a new .ivfdata: the live files are only read.

Every node must see the vector file and the index folder at the same paths
(a shared filesystem), as for `cbir index --engine ray`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from pipeline import faults, raycluster, specs
from pipeline.errors import CbirError
from pipeline.retrieval import factories, index_files, indexes
from pipeline.store import reads, vectors

# More shards than this buys nothing (each is a task with its own copy of the
# trained index) and would only make huge option values cost memory.
MAX_SHARDS = 1024


@dataclass(frozen=True)
class Sharding:
    """How to build an on-disk index: shards, and where their tasks run."""

    shards: int = 1
    engine: str = "local"
    address: str | None = None


def sharding(shards: Any = 1, engine: Any = "local", address: str | None = None) -> Sharding:
    """A checked Sharding (API callers reach here without Click's checks)."""
    if engine not in specs.ENGINES:
        raise CbirError(f"unknown engine {engine!r}: use {' or '.join(specs.ENGINES)}")
    if isinstance(shards, bool) or not isinstance(shards, int | np.integer):
        raise CbirError(f"--shards must be a whole number from 1 to {MAX_SHARDS}, got {shards!r}")
    if not 1 <= shards <= MAX_SHARDS:
        raise CbirError(f"--shards must be from 1 to {MAX_SHARDS}, got {shards}")
    if engine == "ray":
        raycluster.require()  # before any work: one line if Ray is not installed
    return Sharding(int(shards), str(engine), address or None)


def check_mergeable(index: faiss.Index, factory: str) -> faiss.IndexIVF:
    """The IVF index inside `index`, or a one-line error if it cannot live on disk."""
    ivf = factories.ivf_core(index)
    if ivf is None:
        raise CbirError(
            f"--shards, --engine ray and on-disk indexes need an IVF factory, and {factory!r} "
            "is not one (e.g. 'IVF1024,Flat' or 'IVF1024,PQ64'); leave them out to build it"
        )
    if isinstance(ivf, faiss.IndexIVFFastScan | faiss.IndexIVFPQR):
        # Fast-scan lists are packed in blocks, IVFPQR keeps a second code table: neither
        # fits FAISS' on-disk inverted lists.
        raise CbirError(
            f"{factory!r} cannot be merged on disk (fast-scan and IVFPQR codes); use e.g. "
            "'IVF1024,PQ64' or 'IVF1024,Flat', or build it without --shards and --engine ray"
        )
    return ivf


def split(ids: np.ndarray, shards: int) -> list[np.ndarray]:
    """Contiguous runs of ids, one per shard (no empty ones): the merged lists keep id order."""
    return [part for part in np.array_split(ids, max(1, shards)) if len(part)]


def temp_path(index_dir: Path, name: str, tag: str, kind: str) -> Path:
    """.NAME+TAG.KIND.faiss: a build's temporary, which `index_files._own_files` cleans up."""
    return index_dir / f".{name}+{tag}.{kind}.faiss"


def add_shard(
    trained: str,
    vectors_file: str,
    dim: int,
    rows: int,
    ids: np.ndarray,
    crcs: np.ndarray,
    out: str,
    factory: str = "",
) -> dict[str, Any]:
    """One shard's task: the trained index plus rows[ids] of the vector file, written to `out`.

    `crcs` holds each id's recorded CRC-32 (-1: none recorded). Failures come
    back as {"error", "exit_code"}, so a Ray worker returns them as data.
    """
    started = time.perf_counter()
    try:
        index = faiss.read_index(trained)
        mapped = vectors.open_rows(Path(vectors_file), dim, rows)
        known = {int(i): (None if c < 0 else int(c)) for i, c in zip(ids, crcs, strict=True)}
        indexes.add_rows(index, mapped, np.asarray(ids, dtype=np.int64), known, factory)
        faiss.write_index(index, out)
    except CbirError as e:
        return {"error": str(e), "exit_code": e.exit_code}
    except (OSError, RuntimeError, MemoryError) as e:
        last = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        return {"error": f"shard {Path(out).name} failed: {last}", "exit_code": 1}
    faults.step(f"write {Path(out).name}")
    return {
        "ntotal": int(index.ntotal),
        "pid": os.getpid(),
        "seconds": time.perf_counter() - started,
    }


def run_tasks(tasks: list[dict[str, Any]], how: Sharding) -> list[dict[str, Any]]:
    """Run `add_shard` tasks: one after another here, or as Ray tasks (1 CPU each)."""
    if how.engine == "ray" and tasks:
        with raycluster.connected(how.address) as ray:
            # A task only writes its own temporary shard file, so a retry is safe.
            remote = ray.remote(num_cpus=1, max_retries=2)(add_shard)
            try:
                results = ray.get([remote.remote(**t) for t in tasks])
            except ray.exceptions.RayError as e:
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise CbirError(
                    f"a shard task failed on Ray ({first}); the index was left as it was", 1
                ) from None
    else:
        results = [add_shard(**t) for t in tasks]
    for r in results:
        if "error" in r:
            raise CbirError(r["error"], r["exit_code"])
    return results


def shard_tasks(
    trained: Path,
    vectors_file: Path,
    dim: int,
    rows: int,
    ids: np.ndarray,
    crcs: np.ndarray,
    shards: int,
    out: Callable[[int], Path],
    factory: str = "",
) -> list[dict[str, Any]]:
    """The `add_shard` arguments for `ids` (with their CRCs, -1 = none) split in `shards`.

    Paths are absolute: a Ray worker's working folder is not the driver's.
    """
    tasks, start = [], 0
    for k, part in enumerate(split(ids, shards)):
        tasks.append(
            {
                "trained": os.path.abspath(trained),
                "vectors_file": os.path.abspath(vectors_file),
                "dim": dim,
                "rows": rows,
                "ids": part,
                "crcs": crcs[start : start + len(part)],
                "out": os.path.abspath(out(k)),
                "factory": factory,
            }
        )
        start += len(part)
    return tasks


def collection_tasks(
    coll, trained: Path, ids: np.ndarray, shards: int, name: str, tag: str, factory: str
) -> list[dict[str, Any]]:
    """`shard_tasks` over a collection's vector file, with the CRCs its catalog records."""
    recorded = reads.vector_crcs(coll.db)
    crcs = np.fromiter(
        (-1 if recorded.get(int(i)) is None else recorded[int(i)] for i in ids),
        dtype=np.int64,
        count=len(ids),
    )
    return shard_tasks(
        trained,
        coll.vectors_path,
        coll.dim,
        coll.next_id,
        ids,
        crcs,
        shards,
        lambda k: temp_path(coll.index_dir, name, tag, f"shard{k}"),
        factory,
    )


def write_temp(index: faiss.Index, path: Path) -> None:
    """Write a build's temporary (no fsync: it is read back by this build, then removed)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        faiss.write_index(index, str(path))
    except (OSError, RuntimeError):
        raise CbirError(
            f"could not write {path.name} in {path.parent} (the disk is full or the folder "
            "is not writable); free space and rerun",
            1,
        ) from None
    faults.step(f"write {path.name}")


def merge(target: faiss.Index, sources: list[faiss.Index], data: Path) -> None:
    """Merge the inverted lists of `sources` into empty, trained `target`, held in `data`.

    As faiss.contrib.ondisk.merge_ondisk, but the sources stay owned by their
    indexes (the caller keeps them alive), so nothing leaks in a long process.
    """
    ivf = faiss.extract_index_ivf(target)
    if target.ntotal:
        raise CbirError("internal: merging into an index that is not empty", 1)
    lists = faiss.InvertedListsPtrVector()
    for s in sources:
        lists.push_back(faiss.extract_index_ivf(s).invlists)
    with index_files.quiet():
        ondisk = faiss.OnDiskInvertedLists(ivf.nlist, ivf.code_size, os.path.abspath(data))
        try:
            ntotal = ondisk.merge_from_multiple(lists.data(), lists.size(), False)
        except RuntimeError as e:
            last = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            raise CbirError(f"could not merge the shards into {data.name}: {last}", 1) from None
    target.ntotal = ivf.ntotal = ntotal
    ivf.replace_invlists(ondisk, True)
    ondisk.this.disown()  # the index owns it now


def fsync_data(data: Path) -> None:
    """Make the merged inverted lists durable before any record can name them."""
    fd = os.open(data, os.O_RDONLY)
    try:
        os.fsync(fd)  # also writes back the pages FAISS changed through its mapping
    finally:
        os.close(fd)
    faults.step(f"fsync {data.name}")


def merge_shards(
    coll, name: str, tag: str, factory: str, trained: Path, first: list[faiss.Index],
    ids: np.ndarray, how: Sharding, timings: dict[str, Any],
) -> tuple[faiss.Index, Path]:  # fmt: skip
    """Add `ids` in shards to the trained index in `trained`, merge [first..., shards] on disk."""
    data = coll.index_dir / f"{name}+{tag}.ivfdata"
    tasks = collection_tasks(coll, trained, ids, how.shards, name, tag, factory) if len(ids) else []
    try:
        started = time.perf_counter()
        results = run_tasks(tasks, how)
        timings["add_s"] = time.perf_counter() - started
        timings["pids"] = sorted({r["pid"] for r in results})  # which processes added shards
        started = time.perf_counter()
        merged = faiss.read_index(str(trained))
        # Mapped, not read: the shards' lists together may exceed memory.
        sources = first + [faiss.read_index(t["out"], faiss.IO_FLAG_MMAP) for t in tasks]
        merge(merged, sources, data)
        del sources
        timings["merge_s"] = time.perf_counter() - started
        timings["shards"] = len(tasks)
    except BaseException:
        index_files.remove_files([data])
        raise
    finally:
        index_files.remove_files([trained] + [Path(t["out"]) for t in tasks])
    return merged, data


def build_ondisk(
    coll, name: str, factory: str, how: Sharding, params: dict[str, float] | None = None
) -> tuple[faiss.Index, Path, dict[str, Any]]:
    """Train, add in shards, merge: (index, its new .ivfdata, fsynced; timings in seconds,
    and the `pids` of the processes that added shards).

    Nothing is published: the caller saves the index and commits the record.
    """
    ids = coll.indexed_ids()
    if coll.dim == 0 or len(ids) == 0:
        raise CbirError("the catalog has no indexed images yet: run 'cbir index FOLDER' first")
    index = factories.make_index(factory, coll.dim)
    check_mergeable(index, factory)
    if params:
        factories.apply_params(index, params)  # a bad parameter fails before any work
    tag = index_files.new_tag()
    trained = temp_path(coll.index_dir, name, tag, "trained")
    timings: dict[str, Any] = {}
    started = time.perf_counter()
    try:
        indexes.train(index, coll.rows(), ids, factory)
        write_temp(index, trained)
    except BaseException:
        index_files.remove_files([trained])
        raise
    timings["train_s"] = time.perf_counter() - started
    merged, data = merge_shards(coll, name, tag, factory, trained, [], ids, how, timings)
    try:
        fsync_data(data)
    except BaseException:
        index_files.remove_files([data])
        raise
    return merged, data, timings
