"""`cbir bench duplicates`: pair-level precision and recall of `cbir duplicates`.

Edited copies of originals (`pipeline.bench.edits`) are indexed with the real model
through the API into one throw-away catalog, beside distractors, UKBench's similar
shots and Holidays' other photos of a place; the stored vectors are then grouped the
way `cbir duplicates` groups them (`api.duplicates_in`, and for the threshold sweeps
`retrieval.duplicates.find_groups` over the pairs found once at the lowest threshold).

A pair counts, not a group: recall is the share of true pairs that end in one group,
precision the share of the pairs put in one group that belong together. The pure
scoring functions come first (the fast test checks them on a hand-made grouping);
the scale measurement is in `pipeline.bench.duplicates_scale`.
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import api
from pipeline.bench.edits import EDITS, Item, make_set
from pipeline.errors import CbirError
from pipeline.retrieval import duplicates as dups
from pipeline.store import reads

NEAR_SWEEP = tuple(round(0.80 + 0.01 * i, 2) for i in range(19))  # 0.80 .. 0.98
SIMILAR_SWEEP = tuple(round(0.60 + 0.02 * i, 2) for i in range(19))  # 0.60 .. 0.96
TARGET_PRECISION, TARGET_RECALL = 0.99, 0.90  # issue 19's target for near-identical copies

Pair = tuple[str, str]


def where(groups: list[list[str]]) -> dict[str, int]:
    """Image -> the number of its group (each image is in at most one)."""
    return {p: n for n, g in enumerate(groups) for p in g}


def recall(pairs: list[Pair], at: dict[str, int]) -> tuple[int, int]:
    """(pairs that ended in one group, pairs)."""
    found = sum(1 for a, b in pairs if a in at and at.get(b) == at[a])
    return found, len(pairs)


def precision(
    groups: list[list[str]],
    same: Callable[[str, str], bool],
    touch: Callable[[str], bool] | None = None,
) -> tuple[int, int]:
    """(right pairs, pairs) over the pairs inside groups (those with an image `touch`
    accepts, if given); a pair is right when `same` says so."""
    right = total = 0
    for g in groups:
        for a, b in itertools.combinations(g, 2):
            if touch is None or touch(a) or touch(b):
                total += 1
                right += same(a, b)
    return right, total


def ratio(counts: tuple[int, int]) -> float | None:
    return counts[0] / counts[1] if counts[1] else None


def true_pairs(items: dict[str, Item]) -> dict[str, list[Pair]]:
    """The pairs to find (each edit kind: original with its copy; `similar`: UKBench's
    shots of one object) or to keep apart as near-identical (`holidays`: two photos of
    one place, edits left out)."""
    out: dict[str, list[Pair]] = {k: [] for k in (*EDITS, "similar", "holidays")}
    original = {i.family: p for p, i in items.items() if i.kind == "original"}
    by_scene: dict[tuple[str, str], list[str]] = {}
    for p, i in sorted(items.items()):
        if i.kind in EDITS:
            out[i.kind].append((original[i.family], p))
        elif i.kind in ("ukbench", "holidays", "original") and i.scene != i.family:
            by_scene.setdefault(("similar" if i.kind == "ukbench" else "holidays", i.scene), [])
            by_scene[("similar" if i.kind == "ukbench" else "holidays", i.scene)].append(p)
    for (kind, _), photos in sorted(by_scene.items()):
        out[kind].extend(itertools.combinations(photos, 2))
    return out


def near_figures(groups: list[list[str]], items: dict[str, Item], truth) -> dict[str, Any]:
    """Near-identical copies: precision and recall over all kinds, then per kind; how
    many UKBench shots and Holidays photos of one place were merged as copies."""
    at = where(groups)

    def same(a: str, b: str) -> bool:
        return items[a].family == items[b].family

    edits = [p for k in EDITS for p in truth[k]]
    out = {
        "precision": ratio(precision(groups, same)),
        "recall": ratio(recall(edits, at)),
        "pairs": precision(groups, same)[1],
        "ukbench_merged": ratio(recall(truth["similar"], at)),
        "holidays_merged": ratio(recall(truth["holidays"], at)),
        "kinds": {},
    }
    for kind in EDITS:
        out["kinds"][kind] = {
            "precision": ratio(precision(groups, same, lambda p, k=kind: items[p].kind == k)),
            "recall": ratio(recall(truth[kind], at)),
            "pairs": len(truth[kind]),
        }
    return out


def similar_figures(groups: list[list[str]], items: dict[str, Item], truth) -> dict[str, Any]:
    """Similar shots (`--include near,similar`: groups of both kinds). precision: of the
    pairs in a group, the share showing one object, place or photo; recall: UKBench's
    same-object pairs in one group; ukbench_precision: the same precision over the pairs
    with a UKBench image only (UKBench alone, as peers report it); holidays_recall:
    Holidays' same-place pairs in one group."""
    at = where(groups)
    same_scene = lambda a, b: items[a].scene == items[b].scene  # noqa: E731
    scene = precision(groups, same_scene)
    return {
        "precision": ratio(scene),
        "recall": ratio(recall(truth["similar"], at)),
        "pairs": scene[1],
        "ukbench_precision": ratio(
            precision(groups, same_scene, lambda p: items[p].kind == "ukbench")
        ),
        "holidays_recall": ratio(recall(truth["holidays"], at)),
    }


def f_score(r: dict[str, Any], beta: float = 0.5) -> float:
    """F-beta of a row; beta 0.5 counts precision twice as much as recall."""
    p, q = r["precision"] or 0, r["recall"] or 0
    return (1 + beta**2) * p * q / (beta**2 * p + q) if p + q else 0.0


def choose(rows: list[dict[str, Any]], target: tuple[float, float] | None) -> dict[str, Any]:
    """The lowest threshold that meets the (precision, recall) target (the most recall
    at its precision); where none does, the best F0.5 (precision first, as issue 19
    puts it). Ties: the higher threshold."""
    met = [
        r
        for r in rows
        if target and (r["precision"] or 0) >= target[0] and (r["recall"] or 0) >= target[1]
    ]
    if met:
        return min(met, key=lambda r: r["threshold"])
    return max(rows, key=lambda r: (round(f_score(r), 6), r["threshold"]))


def _paths(found: list[dups.Group], path: dict[int, str]) -> list[list[str]]:
    return [[path[i] for i in g.ids] for g in found]


def bench_duplicates(
    datasets: str,
    work: str | Path,
    options: dict[str, Any],
    originals: int = 100,
    seed: int = 0,
    log: Callable[[str], Any] = print,
) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    """Make the copies, index everything, group, and score: the figures, the real
    vectors and the edits' displacements (for the scale benchmark)."""
    work = Path(work)
    options = {**options, "catalog": str(work / "catalog.db"), "index_dir": str(work / "index")}
    times: dict[str, float] = {}
    started = time.perf_counter()
    items = make_set(datasets, work, originals, seed)
    times["edits_s"] = time.perf_counter() - started
    items = {os.path.realpath(p): i for p, i in items.items()}
    copies = sum(i.kind in EDITS for i in items.values())
    log(f"{len(items):,} images, {copies:,} of them edited copies ({times['edits_s']:.0f} s)")
    root = Path(datasets)
    roots = [root / "corel1k", root / "holidays150" / "images", root / "ukbench1000" / "images"]
    started = time.perf_counter()
    summary = api.index([*roots, work / "edits"], labels="none", **options)
    times["index_s"] = time.perf_counter() - started
    log(f"indexed: {summary.indexed} embedded, {summary.failed} failed ({times['index_s']:.0f} s)")
    coll = api.open_collection(api.settings_for(**options))
    try:
        started = time.perf_counter()
        report = api.duplicates_in(coll, include=dups.KINDS)
        times["duplicates_in_s"] = time.perf_counter() - started
        ids = coll.usable_ids()
        rows = reads.details(coll.db, ids)
        path = {i: os.path.realpath(r["path"]) for i, r in rows.items()}
        missing = sorted(set(items) - set(path.values()))
        if missing:
            raise CbirError(
                f"{len(missing)} benchmark images are not in the catalog: {missing[:3]}"
            )
        sha = {i: r["sha256"] for i, r in rows.items()}
        producer = coll.producer
        started = time.perf_counter()
        pairs = dups.exact_pairs(coll.vectors, ids, min(NEAR_SWEEP + SIMILAR_SWEEP))
        vectors = coll.vectors(ids)
    finally:
        coll.close()
    # A reused work folder may hold copies of an earlier run's originals: not scored.
    keep = np.isin(ids, [i for i, p in path.items() if p in items])
    pairs = pairs.without(ids[~keep])
    ids, vectors = ids[keep], vectors[keep]
    truth = true_pairs(items)
    near_rows = []
    for t in NEAR_SWEEP:
        found = dups.find_groups(ids, sha, pairs, ("exact", "near"), near=t)
        near_rows.append({"threshold": t, **near_figures(_paths(found, path), items, truth)})
    near = choose(near_rows, (TARGET_PRECISION, TARGET_RECALL))["threshold"]
    similar_rows = []
    for t in (s for s in SIMILAR_SWEEP if s < near):
        found = dups.find_groups(ids, sha, pairs, dups.KINDS, near=near, similar=t)
        similar_rows.append({"threshold": t, **similar_figures(_paths(found, path), items, truth)})
    times["sweeps_s"] = time.perf_counter() - started
    # What `cbir duplicates --include exact,near,similar` reported with the shipped defaults.
    shipped = [
        dups.Group(
            g["kind"], tuple(i for i in (im["id"] for im in g["images"]) if path[i] in items), ()
        )
        for g in report["groups"]
    ]
    figures = {
        "images": len(items),
        "originals": sum(i.kind == "original" for i in items.values()),
        "edits": sum(i.kind in EDITS for i in items.values()),
        "producer": producer,
        "times": {k: round(v, 1) for k, v in times.items()},
        "defaults": {"near": dups.NEAR, "similar": dups.SIMILAR},
        "at_defaults": {
            "near": near_figures(
                [
                    g
                    for g, s in zip(_paths(shipped, path), shipped, strict=True)
                    if s.kind != "similar"
                ],
                items,
                truth,
            ),
            "similar": similar_figures(_paths(shipped, path), items, truth),
        },
        "near": near_rows,
        "similar": similar_rows,
        "chosen": {"near": near, "similar": choose(similar_rows, None)["threshold"]},
    }
    return figures, vectors, _displacements(items, ids, vectors, path)


def _displacements(items, ids, vectors, path) -> np.ndarray:
    """copy - original, for every copy: how edits move a vector (the scale benchmark adds
    them to generated vectors to make realistic copies)."""
    row = {path[int(i)]: n for n, i in enumerate(ids)}
    original = {i.family: p for p, i in items.items() if i.kind == "original"}
    out = [
        vectors[row[p]] - vectors[row[original[i.family]]]
        for p, i in items.items()
        if i.kind in EDITS
    ]
    return np.asarray(out, dtype=np.float32)


def _n(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def table(f: dict[str, Any]) -> list[str]:
    """The figures as Markdown tables (printed; pasted into docs/benchmarks.md)."""
    near = next(r for r in f["near"] if r["threshold"] == f["chosen"]["near"])
    producer = f["producer"] or {}
    out = [
        f"{f['images']:,} images: {f['originals']} originals, {f['edits']:,} edited copies; "
        f"model {producer.get('runtime')} {producer.get('precision')}",
        "",
        "| near | precision | recall | F0.5 | pairs in groups | UKBench shots merged "
        "| Holidays same place merged |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in f["near"]:
        out.append(
            f"| {r['threshold']:.2f} | {_n(r['precision'])} | {_n(r['recall'])} "
            f"| {f_score(r):.3f} | {r['pairs']:,} | {_n(r['ukbench_merged'])} "
            f"| {_n(r['holidays_merged'])} |"
        )
    out += ["", f"| edit (near {near['threshold']:.2f}) | recall | precision | pairs |"]
    out.append("|---|---|---|---|")
    for kind, k in near["kinds"].items():
        out.append(f"| {kind} | {_n(k['recall'])} | {_n(k['precision'])} | {k['pairs']} |")
    out += [
        "",
        f"| similar (near {near['threshold']:.2f}) | precision (one scene) "
        "| UKBench recall | F0.5 | pairs in groups | UKBench precision "
        "| Holidays same place found |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in f["similar"]:
        out.append(
            f"| {r['threshold']:.2f} | {_n(r['precision'])} | {_n(r['recall'])} "
            f"| {f_score(r):.3f} | {r['pairs']:,} | {_n(r['ukbench_precision'])} "
            f"| {_n(r['holidays_recall'])} |"
        )
    shipped = f["at_defaults"]
    out += [
        "",
        f"chosen: near {f['chosen']['near']:.2f}, similar {f['chosen']['similar']:.2f} "
        f"(shipped defaults: near {f['defaults']['near']:.2f}, "
        f"similar {f['defaults']['similar']:.2f})",
        f"cbir duplicates --include near,similar at the shipped defaults: near-identical "
        f"precision {_n(shipped['near']['precision'])} recall {_n(shipped['near']['recall'])}; "
        f"similar shots precision {_n(shipped['similar']['precision'])}, UKBench "
        f"precision {_n(shipped['similar']['ukbench_precision'])} "
        f"recall {_n(shipped['similar']['recall'])}",
        "seconds: " + ", ".join(f"{k[:-2]} {v:.1f}" for k, v in f["times"].items()),
    ]
    return out


def write_out(f: dict[str, Any], folder: str | Path) -> list[Path]:
    """duplicates.json (everything), near.csv, kinds.csv, similar.csv (and scale.csv)."""
    import csv
    import json

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "duplicates.json").write_text(json.dumps(f, indent=1) + "\n")
    tables = {
        "near.csv": [
            {k: v for k, v in r.items() if k != "kinds"} | {"f05": round(f_score(r), 4)}
            for r in f["near"]
        ],
        "kinds.csv": [
            {"threshold": r["threshold"], "kind": kind, **k}
            for r in f["near"]
            for kind, k in r["kinds"].items()
        ],
        "similar.csv": [r | {"f05": round(f_score(r), 4)} for r in f["similar"]],
        "scale.csv": f.get("scale"),
    }
    tables = {name: rows for name, rows in tables.items() if rows}
    for name, rows in tables.items():
        with open(folder / name, "w", newline="") as out:
            writer = csv.DictWriter(out, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return [folder / "duplicates.json", *(folder / n for n in tables)]


def run(
    datasets: str,
    work_dir: str | None,
    options: dict[str, Any],
    originals: int = 100,
    seed: int = 0,
    sizes: list[int] | None = None,
    out_dir: str | None = None,
    log: Callable[[str], Any] = print,
) -> dict[str, Any]:
    """`cbir bench duplicates`: the quality benchmark, then the scale one on `sizes`."""
    import tempfile

    from pipeline.bench import duplicates_scale

    if work_dir:
        os.makedirs(work_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="cbir-dups-", dir=work_dir) as tmp:
        figures, vectors, moved = bench_duplicates(datasets, tmp, options, originals, seed, log)
        for line in table(figures):
            log(line)
        if sizes:
            figures["scale"] = duplicates_scale.bench_scale(vectors, moved, sizes, Path(tmp), log)
            for line in ["", *duplicates_scale.table(figures["scale"])]:
                log(line)
    if out_dir:
        log("wrote " + ", ".join(str(p) for p in write_out(figures, out_dir)))
    return figures
