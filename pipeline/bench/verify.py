"""`cbir bench verify`: what local-feature verification (`retrieval.verify`) gains on the
shared benchmarks, and what it costs per query.

Three catalogs are indexed with the real model (default descriptor) into the work
folder: Holidays-150, UKBench-1000 and Corel-1K's database split. The first pass is the
ranking `cbir evaluate` measures (`ranking.ranked` over the exact index, scored by
`instances.score_query` and `metrics`), so the "without" figures are the documented
ones. Each query's top N (the largest N asked) is verified once; the rankings at every
smaller N come from the same inlier counts (`verify.reordered`), exactly what
`verify_rerank` would return at that N.

- Holidays-150: mAP (query left out), and N-S, without and with verification at each N.
- UKBench-1000: N-S (query kept) and mAP, without and with, at `ukbench_n`.
- Corel-1K: mAP by category of the 100 held-out queries, without and with, at N = 50.
- Edited copies (`bench.edits`, issue 19's 12 edits) of a seeded subset of originals,
  Holidays queries and Corel images, each copy a query against all three catalogs'
  vectors (2,305 images): how often its original is at rank 1, without and with.
- Latency: warm (indexed images' features cached), per query: the query's features
  plus the N verifications, median and p90, at each N.
"""

from __future__ import annotations

import random
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import api
from pipeline.bench.edits import EDITS, edited
from pipeline.errors import CbirError
from pipeline.evaluation import common
from pipeline.evaluation.instances import score_query
from pipeline.inputs.groundtruth import load_groundtruth
from pipeline.inputs.scan import read_label_csv
from pipeline.retrieval import indexes, local_features, metrics, verify
from pipeline.retrieval.ranking import ranked
from pipeline.store import reads

SETS = ("holidays", "ukbench", "corel", "edits", "latency")
CATALOGS = {  # name -> (what is indexed, index options), under DATASETS
    "holidays": ("holidays150/images", {}),
    "ukbench": ("ukbench1000/images", {}),
    "corel": ("corel1k/manifest.csv", {"split": "database"}),
}
CACHE_ITEMS = 3000  # every image of the three catalogs: the warm case of a server


class _Catalog:
    """One benchmark catalog: its collection, settings, rows, exact index."""

    def __init__(self, name: str, work: Path, options: dict[str, Any]):
        self.name = name
        s = api.settings_for(**_own(options, work, name))
        self.coll = api.open_collection(s)
        self.settings = api.with_descriptor(s, self.coll)
        self.ids = self.coll.indexed_ids()
        self.rows = reads.details(self.coll.db, self.ids)
        self.paths = {int(i): self.rows[int(i)]["path"] for i in self.ids}
        self.index = indexes.loaded(self.coll, indexes.EXACT)[0]

    def embed_files(self, paths: list[str]) -> np.ndarray:
        """Query vectors of files outside the catalog, as `cbir evaluate` makes them."""
        model = api.embedder_for(self.settings, self.coll)
        vecs, ok = common.descriptors(
            "resnet50", paths, None, model.embed, self.settings.max_pixels, 0.5,
            common.decode_shape(self.settings),
        )  # fmt: skip
        if len(ok) < len(paths):
            raise CbirError(common.unusable_queries(paths, ok))
        return vecs


def _own(options: dict[str, Any], work: Path, name: str) -> dict[str, Any]:
    """The options with this benchmark's own catalog and index folder in the work folder
    (the user's --catalog and --index-dir are not used)."""
    return {**options, "catalog": str(work / f"{name}.db"), "index_dir": str(work / f"{name}-idx")}


def index_catalogs(datasets: Path, work: Path, options: dict[str, Any], log) -> None:
    for name, (what, extra) in CATALOGS.items():
        t = time.perf_counter()
        s = api.index([str(datasets / what)], **{**_own(options, work, name), **extra})
        log(f"indexed {name}: {s.indexed} new, {time.perf_counter() - t:.0f} s")


class _Verifier:
    """Verification with one cache over every catalog (ids kept apart by catalog name)."""

    def __init__(self, params: verify.Params, workers: int, max_pixels: int):
        self.params, self.workers, self.max_pixels = params, workers, max_pixels
        self.cache = local_features.FeatureCache(CACHE_ITEMS, max_pixels, params)
        self._key = 0
        self._rows: dict[tuple[str, int], int] = {}

    def inliers(self, query: str, cat: _Catalog, ids: np.ndarray) -> dict[int, int]:
        """Inliers of each of `ids` (catalog `cat`) against the query file."""
        q, _ = local_features.file_features(query, self.max_pixels, self.params)
        return self.inliers_of(q, cat, ids)

    def inliers_of(
        self, q: local_features.Features, cat: _Catalog, ids: np.ndarray
    ) -> dict[int, int]:
        def features_of(i: int) -> local_features.Features | None:
            # the cache is keyed by id: give each catalog's ids a key of their own
            key = self._rows.setdefault((cat.name, i), len(self._rows))
            return self.cache.features(key, cat.rows[i])

        checks, _ = verify.check_candidates(q, ids.tolist(), features_of, self.params, self.workers)
        return {i: v.inliers for i, v in checks.items()}


def instances(cat: _Catalog, groundtruth: Path, ver: _Verifier, ns: list[int], log) -> dict:
    """mAP and N-S without and with verification at each N (one verification at max N)."""
    truth = load_groundtruth(str(groundtruth), cat.paths)
    queries = np.array(truth.queries, dtype=np.int64)
    found, scores = ranked(cat.index, cat.coll.vectors, cat.coll.vectors(queries), len(cat.ids))
    t = time.perf_counter()
    checked = [
        ver.inliers(cat.paths[q], cat, row[: max(ns)])
        for q, row in zip(queries.tolist(), found, strict=True)
    ]
    log(
        f"  {cat.name}: {len(queries)} queries x {max(ns)} verified in {time.perf_counter() - t:.0f} s"
    )

    def figures(n: int) -> tuple[float, float]:
        aps, nss = [], []
        for q, row, sc, inl in zip(queries.tolist(), found, scores, checked, strict=True):
            if n:
                row, sc = verify.reordered(row, sc, inl, n, ver.params)
            r = score_query(q, row, sc, truth.relevant[q], cat.paths)
            aps.append(r["ap"])
            nss.append(r["ns"])
        return float(np.mean(aps)), float(np.mean(nss))

    out = {"without": figures(0)}
    out.update({n: figures(n) for n in ns})
    return out


def corel(cat: _Catalog, manifest: Path, ver: _Verifier, n: int) -> dict:
    """Category mAP of the held-out queries (labels as `cbir evaluate` scores them)."""
    held_out = read_label_csv(str(manifest), split="query")
    paths, labels = list(held_out), list(held_out.values())
    found, scores = ranked(cat.index, cat.coll.vectors, cat.embed_files(paths), len(cat.ids))
    rows = reads.lookup(cat.coll.db, cat.ids)
    label_of = {int(i): rows[int(i)]["label"] for i in cat.ids}
    totals = {lab: sum(v == lab for v in label_of.values()) for lab in set(labels)}
    out: dict[Any, list[float]] = {"without": [], n: []}
    for path, lab, row, sc in zip(paths, labels, found, scores, strict=True):
        inl = ver.inliers(path, cat, row[:n])
        for key, ranking in (
            ("without", row),
            (n, verify.reordered(row, sc, inl, n, ver.params)[0]),
        ):
            rel = [label_of[int(i)] == lab for i in ranking]
            out[key].append(metrics.average_precision(rel, totals[lab]))
    return {k: float(np.mean(v)) for k, v in out.items()}


def edits(cats: dict[str, _Catalog], work: Path, ver: _Verifier, n: int, originals: int, seed: int):
    """How often an edited copy finds its original at rank 1, over all three catalogs."""
    union_ids, union_vecs, where = [], [], {}
    for cat in cats.values():
        for i in cat.ids.tolist():
            where[len(union_ids)] = (cat, i)
            union_ids.append(len(union_ids))
        union_vecs.append(cat.coll.vectors(cat.ids))
    flat, lookup = common.flat_ranker(np.vstack(union_vecs), np.array(union_ids, np.int64))
    key_of = {(cat.name, i): u for u, (cat, i) in where.items()}
    rng = random.Random(seed)
    hol, cor = cats["holidays"], cats["corel"]
    chosen = [
        ("holidays", i)
        for i in rng.sample(
            sorted(i for i, p in hol.paths.items() if p.endswith("00.jpg")), originals // 2
        )
    ]
    chosen += [("corel", i) for i in rng.sample(sorted(cor.paths), originals - originals // 2)]
    copies, family = [], []
    from PIL import Image, ImageOps

    for name, i in chosen:
        with Image.open(cats[name].paths[i]) as im:
            im = ImageOps.exif_transpose(im).convert("RGB")
            for kind in EDITS:
                data, suffix = edited(im, kind, random.Random(f"{seed}:{i}:{kind}"))
                path = work / "copies" / f"{name}-{i}-{kind.replace(' ', '_')}{suffix}"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data)
                copies.append((str(path), kind))
                family.append(key_of[(name, i)])
    vecs = cats["corel"].embed_files([p for p, _ in copies])
    found, scores = ranked(flat, lookup, vecs, n)
    per_kind: dict[str, list[tuple[bool, bool]]] = {k: [] for k in EDITS}
    for (path, kind), fam, row, sc in zip(copies, family, found, scores, strict=True):
        q, _ = local_features.file_features(path, ver.max_pixels, ver.params)
        inl: dict[int, int] = {}
        for name, cat in cats.items():  # verify each candidate in its own catalog
            mine = [u for u in row.tolist() if where[u][0] is cat]
            got = ver.inliers_of(q, cat, np.array([where[u][1] for u in mine], np.int64))
            inl.update({key_of[(name, i)]: v for i, v in got.items()})
        after = verify.reordered(row, sc, inl, n, ver.params)[0]
        per_kind[kind].append((int(row[0]) == fam, int(after[0]) == fam))
    return per_kind


def _timed(ver: _Verifier, cat: _Catalog, qs: list[int], rows, n: int, cold: bool):
    times = []
    for q, row in zip(qs, rows, strict=True):
        if cold:  # nothing cached: every candidate's features come from its file
            ver.cache = local_features.FeatureCache(CACHE_ITEMS, ver.max_pixels, ver.params)
        t = time.perf_counter()
        ver.inliers(cat.paths[q], cat, row[:n])
        times.append(time.perf_counter() - t)
    return statistics.median(times), float(np.percentile(times, 90))


def latency(cat: _Catalog, ver: _Verifier, ns: list[int], queries: int) -> dict[str, Any]:
    """Seconds per query: the query's features and N verifications. Warm (the candidates'
    features cached, as in a server) at each N; cold (computed from the files) at N = 50,
    on a fifth of the queries."""
    qs = sorted(i for i, p in cat.paths.items() if p.endswith("00.jpg"))[:queries]
    depth = max(*ns, 50)  # the cold figure is at N = 50
    found, _ = ranked(cat.index, cat.coll.vectors, cat.coll.vectors(np.array(qs)), depth)
    cold = max(1, len(qs) // 5)
    out: dict[str, Any] = {"cold": {50: _timed(ver, cat, qs[:cold], found[:cold], 50, True)}}
    _timed(ver, cat, qs, found, max(ns), False)  # fills the cache
    out["warm"] = {n: _timed(ver, cat, qs, found, n, False) for n in ns}
    return out


def run(
    datasets: str | Path,
    options: dict[str, Any],
    params: dict[str, Any] | None = None,
    ns: tuple[int, ...] = (25, 50, 100),
    ukbench_n: int = 50,
    only: tuple[str, ...] = SETS,
    originals: int = 24,
    seed: int = 0,
    latency_queries: int = 50,
    workers: int = 1,
    work_dir: str | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    root = Path(datasets).resolve()
    for what, _ in CATALOGS.values():
        if not (root / what).exists():
            raise CbirError(f"bench verify needs {root / what}")
    ns = sorted(ns)
    chosen = verify.DEFAULT.replace(**(params or {}))  # checked before any work
    with tempfile.TemporaryDirectory(prefix="cbir-verify-", dir=work_dir) as tmp:
        work = Path(work_dir) if work_dir else Path(tmp)
        index_catalogs(root, work, options, log)
        cats = {name: _Catalog(name, work, options) for name in CATALOGS}
        ver = _Verifier(chosen, workers, cats["holidays"].settings.max_pixels)
        log(f"verification: {chosen}, workers {workers}")
        result: dict[str, Any] = {}
        gt = {
            name: root / CATALOGS[name][0].split("/")[0] / "groundtruth.csv"
            for name in ("holidays", "ukbench")
        }
        parts = {
            "holidays": lambda: instances(cats["holidays"], gt["holidays"], ver, ns, log),
            "ukbench": lambda: instances(cats["ukbench"], gt["ukbench"], ver, [ukbench_n], log),
            "corel": lambda: corel(cats["corel"], root / CATALOGS["corel"][0], ver, 50),
            "edits": lambda: edits(cats, work, ver, 50, originals, seed),
            "latency": lambda: latency(cats["holidays"], ver, ns, latency_queries),
        }
        try:
            for name, measure in parts.items():
                if name in only:  # each part's lines as soon as it is measured
                    result[name] = measure()
                    for line in lines(
                        {name: result[name]}, ns, ukbench_n, originals, latency_queries
                    ):
                        log(line)
        finally:
            for cat in cats.values():
                cat.coll.close()
    return result


def lines(result: dict[str, Any], ns: list[int], ukbench_n: int, originals: int, queries: int):
    """The figures as the command prints them."""
    if h := result.get("holidays"):
        yield f"Holidays-150 mAP: without {h['without'][0]:.4f}; " + ", ".join(
            f"N={n} {h[n][0]:.4f}" for n in ns
        )
    if u := result.get("ukbench"):
        yield (
            f"UKBench-1000 N-S: without {u['without'][1]:.3f}, N={ukbench_n} "
            f"{u[ukbench_n][1]:.3f} (mAP {u['without'][0]:.4f} -> {u[ukbench_n][0]:.4f})"
        )
    if c := result.get("corel"):
        yield f"Corel-1K category mAP, 100 held-out queries: without {c['without']:.4f}, N=50 {c[50]:.4f}"
    if e := result.get("edits"):
        both = [x for v in e.values() for x in v]
        yield (
            f"edited copies with their original at rank 1 ({len(both)} copies of {originals} "
            f"originals, N=50): without {sum(a for a, _ in both)}, with {sum(b for _, b in both)}"
        )
        for kind, v in e.items():
            yield f"  {kind:12s} {sum(a for a, _ in v):3d} -> {sum(b for _, b in v):3d} of {len(v)}"
    if t := result.get("latency"):
        yield (
            f"seconds per query, {queries} Holidays queries (cold: {max(1, queries // 5)}): "
            "the query's features and N verifications"
        )
        for how, times in t.items():
            yield f"  {how}: " + ", ".join(
                f"N={n} median {a:.3f} p90 {b:.3f}" for n, (a, b) in times.items()
            )
