"""`cbir bench duplicates --scale`: how long `duplicates_in` takes at 10^4 .. 10^6 vectors.

Apart from `pipeline.bench.duplicates` because it needs no image: generated vectors
(`pipeline.bench.synth`, made from the benchmark's real features) go into a real
catalog through the indexing job's writer, and `api.duplicates_in` runs over it as
`cbir duplicates` would, exactly (FAISS flat range search, n^2 work) and through an
IVF index built with `api.build_index` (candidates re-scored exactly, pair recall).

Generated vectors alone have almost no pair above a near-duplicate threshold, so
every fifth one is an edited copy of another: that vector plus a real edit's
displacement (edit's vector minus its original's, from the quality benchmark),
normalised. Copies of an IVF's pairs are a subset of the exact ones (each is
re-scored exactly), so at a size measured both ways the pair recall is exact:
IVF pairs / exact pairs.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import api
from pipeline.bench import synth
from pipeline.bench.distributed import _Generated
from pipeline.embed.interface import l2_normalize
from pipeline.ingest import jobs
from pipeline.ingest.plan import Plan
from pipeline.inputs.scan import ScannedFile
from pipeline.retrieval import duplicates as dups
from pipeline.retrieval import factories, indexes
from pipeline.retrieval.factories import ivf_lists
from pipeline.store import writes
from pipeline.store.collection import writing

EXACT_UP_TO = 100_000  # exact range search is n^2: above this it is extrapolated
NPROBE = 2  # at 100,000 vectors: pair recall 0.9997, against 0.989 at 1 (docs/benchmarks.md)
NPROBE_SWEEP = (1, 4)  # also timed, pairs only, where the exact pairs are known
COPY_SHARE = 5  # every fifth generated vector is an edited copy of another


def generated(
    real: np.ndarray, displacements: np.ndarray, n: int, seed: int = 0
) -> Iterator[np.ndarray]:
    """n unit vectors in chunks, a fifth of each chunk copies of the rest (see above)."""
    rng = np.random.default_rng(seed + 7)
    for chunk in synth.generate(real, n, seed):
        m = len(chunk) // COPY_SHARE
        if m and len(displacements):
            source = rng.integers(0, len(chunk) - m, m)
            moved = chunk[source] + displacements[rng.integers(0, len(displacements), m)]
            chunk[len(chunk) - m :] = l2_normalize(moved)
        yield chunk


def write_catalog(chunks: Iterator[np.ndarray], folder: Path) -> dict[str, str]:
    """A catalog of the vectors (no files behind them), written as an index job writes."""
    options = {"catalog": str(folder / "c.db"), "index_dir": str(folder / "i")}
    gen = _Generated()
    with writing(options["catalog"], options["index_dir"]) as coll:
        coll.check_embedder(gen)
        run_id = writes.start_run(coll.db, "bench", {})
        plan = Plan()
        job = jobs._Batches(coll, lambda _t: gen, plan, run_id, jobs.Summary())
        n = 0
        for chunk in chunks:
            for start in range(0, len(chunk), 1024):
                batch = []
                for v in chunk[start : start + 1024]:
                    f = ScannedFile(f"/generated/{n:09d}.jpg", 1000, 0.0, None)
                    sha = hashlib.sha256(str(n).encode()).hexdigest()
                    batch.append((f, jobs.Embedded(sha, 224, 224, v)))
                    n += 1
                plan.keys = {f.path: "" for f, _ in batch}  # '' marks a file that is not there
                job.commit(batch)
        writes.end_run(coll.db, run_id, "done", {})
    return options


def _run(options: dict[str, str], index: str) -> tuple[float, dict[str, Any]]:
    coll = api.open_collection(api.settings_for(**options))
    try:
        started = time.perf_counter()
        report = api.duplicates_in(coll, include=("exact", "near"), index=index)
        return time.perf_counter() - started, report
    finally:
        coll.close()


def _other_nprobes(
    options: dict[str, str], exact_pairs: int
) -> list[tuple[int, float, int, float]]:
    """The IVF index's pair finding alone at NPROBE_SWEEP (no grouping), against the exact
    pairs: what nprobe buys."""
    coll = api.open_collection(api.settings_for(**options))
    try:
        index, ids = indexes.loaded(coll, "ivf")[0], coll.usable_ids()
        rows = []
        for nprobe in NPROBE_SWEEP:
            factories.apply_params(index, {"nprobe": nprobe})
            started = time.perf_counter()
            pairs = dups.index_pairs(index, coll.vectors, ids, dups.NEAR)
            seconds = time.perf_counter() - started
            rows.append((nprobe, seconds, len(pairs.a), len(pairs.a) / max(1, exact_pairs)))
        return rows
    finally:
        coll.close()


def bench_scale(
    real: np.ndarray,
    displacements: np.ndarray,
    sizes: list[int],
    work: Path,
    log: Callable[[str], Any] = print,
) -> list[dict[str, Any]]:
    """One row per size and method: exact `duplicates_in` (up to EXACT_UP_TO), through an
    IVF index at NPROBE (its build, and its pair recall: exact where the exact pairs are
    known, else `duplicates_in`'s sampled one), and the IVF's pairs alone at NPROBE_SWEEP."""
    rows: list[dict[str, Any]] = []
    for n in sizes:
        folder = work / f"scale-{n}"
        folder.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        options = write_catalog(generated(real, displacements, n), folder)
        log(f"{n:,} generated vectors written ({time.perf_counter() - started:.0f} s)")
        exact = None
        if n <= EXACT_UP_TO:
            seconds, exact = _run(options, "exact")
            rows.append(_row(n, "exact (flat range search)", 0, seconds, exact, 1.0))
            log(_line(rows[-1]))
        factory = f"IVF{ivf_lists(n)},Flat"
        started = time.perf_counter()
        api.build_index("ivf", factory, {"nprobe": NPROBE}, **options)
        build = time.perf_counter() - started
        seconds, approx = _run(options, "ivf")
        recall = (
            approx["pair_recall"] if exact is None else approx["pairs"] / max(1, exact["pairs"])
        )
        rows.append(_row(n, f"{factory} nprobe={NPROBE}", build, seconds, approx, recall))
        rows[-1]["sampled"] = exact is None
        log(_line(rows[-1]))
        if exact is not None:
            for nprobe, seconds, pairs, recall in _other_nprobes(options, exact["pairs"]):
                method = f"{factory} nprobe={nprobe}, pairs only"
                rows.append(_row(n, method, build, seconds, {"pairs": pairs}, recall))
                log(_line(rows[-1]))
        for f in sorted(folder.rglob("*"), reverse=True):  # 16 GB at a million: not kept
            f.rmdir() if f.is_dir() else f.unlink()
        folder.rmdir()
    return rows


def _row(n: int, method: str, build: float, seconds: float, report: dict, recall: float):
    groups = len(report["groups"]) if "groups" in report else None
    return {
        "vectors": n,
        "method": method,
        "build_s": round(build, 1),
        "seconds": round(seconds, 1),
        "pairs": report["pairs"],
        "groups": groups,
        "pair_recall": round(recall, 4),
        "sampled": False,
    }


def _line(r: dict[str, Any]) -> str:
    sampled = " (sampled)" if r.get("sampled") else ""
    return (
        f"| {r['vectors']:,} | {r['method']} | {r['build_s']:.1f} | {r['seconds']:.1f} "
        f"| {r['pairs']:,} | {r['pair_recall']:.4f}{sampled} |"
    )


def table(rows: list[dict[str, Any]]) -> list[str]:
    """The scale rows as a Markdown table."""
    head = "| vectors | method | index build s | duplicates s | pairs | pair recall |"
    return [head, "|---|---|---|---|---|---|", *(_line(r) for r in rows)]
