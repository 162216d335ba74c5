"""`cbir bench scores`: what a search score means for the catalog's descriptor, and which
cut-off keeps the right results.

The shared datasets (Corel-1K, Holidays-150, UKBench-1000) are indexed with the real
model through the API into one catalog; then, from the stored vectors (an exact search's
scores are these cosines):

1. **Pair distributions**: the cosine of every pair of images, by kind: the same object
   (Holidays' and UKBench's ground truth), the same Corel-1K category, different Corel-1K
   categories, different objects of one instance set, and images of different datasets.
2. **Cut-off sweeps** on the top 10 of each query. Same-object tasks (Holidays, UKBench):
   the catalog is Holidays + UKBench, each ground-truth query ranks it (itself left out),
   and as many Corel-1K images, which have no match there, query it too. Same-category
   task: each Corel-1K image ranks Corel-1K, and UKBench images query it. A kept result
   is right when it is relevant; micro precision counts the unrelated queries' kept
   results as wrong, recall is over min(relevant, 10). Each rule's parameters are swept,
   the best F1 is reported, and a setting tuned on one set is applied to another
   (transfer: what a user with one fixed setting would get): between the two same-object
   sets, and UKBench's on Corel-1K, whose queries have 99 matches each.
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import api
from pipeline.errors import CbirError
from pipeline.inputs.groundtruth import load_groundtruth
from pipeline.store import reads

K = 10  # results shown (cbir search's default k); the cut-offs act on these
SETS = {"corel": "corel1k", "holidays": "holidays150/images", "ukbench": "ukbench1000/images"}
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
# (key, label) of each pair kind, in the order of the table and the plot.
PAIR_KINDS = (
    ("object", "same object (Holidays, UKBench)"),
    ("category", "same Corel-1K category"),
    ("other_category", "different Corel-1K categories"),
    ("other_object", "different objects (Holidays, UKBench)"),
    ("cross", "different datasets"),
)


@dataclass
class Labels:
    """Per catalog row: its dataset, and its group (object or category; -1 = none); the
    rows of each instance set's ground-truth queries."""

    dataset: np.ndarray  # str
    group: np.ndarray  # int64, unique across datasets
    queries: dict[str, np.ndarray]


def labels_of(paths: list[str], datasets: str) -> Labels:
    """Dataset by folder; Corel-1K's group is its class folder, an instance set's is its
    ground truth's query together with the query's relevant images."""
    root = {k: os.path.realpath(os.path.join(datasets, sub)) + os.sep for k, sub in SETS.items()}
    real = [os.path.realpath(p) for p in paths]
    dataset = np.array([next((k for k, r in root.items() if p.startswith(r)), "") for p in real])
    group = np.full(len(paths), -1, dtype=np.int64)
    queries: dict[str, np.ndarray] = {}
    classes: dict[str, int] = {}
    for n, p in enumerate(real):
        if dataset[n] == "corel":
            group[n] = classes.setdefault(os.path.basename(os.path.dirname(p)), len(classes))
    for name in ("holidays", "ukbench"):
        rows = {n: p for n, p in enumerate(paths) if dataset[n] == name}
        csv = os.path.join(datasets, SETS[name].split("/")[0], "groundtruth.csv")
        truth = load_groundtruth(csv, rows)
        queries[name] = np.array(truth.queries, dtype=np.int64)
        for q in truth.queries:
            members = [q, *truth.relevant[q]]
            known = [int(group[m]) for m in members if group[m] >= 0]
            g = min(known) if known else int(group.max()) + 1
            group[members] = g
    return Labels(dataset, group, queries)


def pair_scores(gram: np.ndarray, lab: Labels) -> dict[str, np.ndarray]:
    """The cosine of every pair of rows (`gram`: the unit vectors' inner products), split
    by `PAIR_KINDS`."""
    a, b = np.triu_indices(len(gram), 1)
    cos = gram[a, b]
    same_set = lab.dataset[a] == lab.dataset[b]
    same_group = same_set & (lab.group[a] == lab.group[b]) & (lab.group[a] >= 0)
    corel = lab.dataset[a] == "corel"
    masks = {
        "object": same_group & ~corel,
        "category": same_group & corel,
        "other_category": same_set & ~same_group & corel,
        "other_object": same_set & ~same_group & ~corel,
        "cross": ~same_set,
    }
    return {k: cos[m] for k, m in masks.items()}


@dataclass
class Task:
    """One sweep's data: the top-`depth` scores of each query that has relevant images,
    whether each of its top K is relevant, its relevant count (at most K), and the
    top-`depth` scores of the queries that have none."""

    name: str
    scores: np.ndarray  # (queries, depth), best first
    relevant: np.ndarray  # (queries, K) bool
    n_relevant: np.ndarray  # (queries,)
    unrelated: np.ndarray  # (unrelated queries, depth)


def _ranked(gram: np.ndarray, queries: np.ndarray, rows: np.ndarray, depth: int):
    """(scores, rows) of each query's best `depth` among `rows`, itself left out; past
    the end of a small catalog, -inf and row -1."""
    s = np.full((len(queries), max(len(rows), depth)), -np.inf)
    s[:, : len(rows)] = gram[np.ix_(queries, rows)]
    s[:, : len(rows)][queries[:, None] == rows[None, :]] = -np.inf
    order = np.argsort(-s, axis=1, kind="stable")[:, :depth]
    padded = np.append(rows, -1)
    return np.take_along_axis(s, order, 1), padded[np.minimum(order, len(rows))]


def make_task(
    name: str,
    gram: np.ndarray,
    lab: Labels,
    queries: np.ndarray,
    catalog: np.ndarray,
    unrelated: np.ndarray,
    depth: int = 2 * K,
) -> Task:
    scores, found = _ranked(gram, queries, catalog, depth)
    same = (lab.group[found[:, :K]] == lab.group[queries][:, None]) & (found[:, :K] >= 0)
    count = np.array([np.sum(lab.group[catalog] == lab.group[q]) - 1 for q in queries])
    return Task(
        name, scores, same, np.minimum(count, K), _ranked(gram, unrelated, catalog, depth)[0]
    )


# A rule keeps some of a query's top K from its top-`depth` scores and its parameters.
Rule = Callable[[np.ndarray, tuple[float, ...]], np.ndarray]


def _grid(*axes: np.ndarray) -> list[tuple[float, ...]]:
    return [tuple(round(float(v), 3) for v in p) for p in itertools.product(*axes)]


FLOORS = np.arange(0.40, 0.99, 0.01)
MARGINS = np.arange(0.0, 0.30, 0.005)
# name: (what it keeps, with {0}, {1} for its parameters; the rule; the sweep)
RULES: dict[str, tuple[str, Rule, list[tuple[float, ...]]]] = {
    "flat": ("score >= {0}", lambda s, p: s[:, :K] >= p[0], _grid(FLOORS)),
    "top1": (
        "score >= {0} x top-1 score",
        lambda s, p: s[:, :K] >= p[0] * s[:, :1],
        _grid(np.arange(0.50, 1.0, 0.01)),
    ),
    "kth": (
        "score >= 10th score + {0}",
        lambda s, p: s[:, :K] >= s[:, K - 1 : K] + p[0],
        _grid(MARGINS),
    ),
    "floor+kth": (
        "score >= max({0}, 10th score + {1})",
        lambda s, p: s[:, :K] >= np.maximum(p[0], s[:, K - 1 : K] + p[1]),
        _grid(FLOORS[FLOORS <= 0.9], MARGINS),
    ),
}


def rule_text(rule: str, params: tuple[float, ...]) -> str:
    return RULES[rule][0].format(*(f"{p:.3g}" for p in params))


def figures(task: Task, rule: Rule, p: tuple[float, ...]) -> dict[str, Any]:
    """Precision, recall and F1 of the kept results; the share of queries with a match
    left with nothing; wrongly kept results per unrelated query, and the share of
    unrelated queries that keep any."""
    # -inf: no result there (a query's own row, or past the end of a small catalog)
    keep = rule(task.scores, p) & np.isfinite(task.scores[:, :K])
    wrong = rule(task.unrelated, p) & np.isfinite(task.unrelated[:, :K])
    right = int(np.sum(keep & task.relevant))
    kept = int(keep.sum() + wrong.sum())
    prec = right / kept if kept else 1.0
    rec = right / max(int(task.n_relevant.sum()), 1)
    return {
        "params": p,
        "precision": prec,
        "recall": rec,
        "f1": 2 * prec * rec / (prec + rec) if prec + rec else 0.0,
        "empty": float(np.mean(~keep.any(axis=1))),
        "wrong_per_unrelated": float(wrong.sum(axis=1).mean()),
        "unrelated_any": float(np.mean(wrong.any(axis=1))),
    }


def best(task: Task, rule: str) -> dict[str, Any]:
    """The rule's setting with the best F1 (ties: the stricter, i.e. the larger, one)."""
    _, fn, sweep = RULES[rule]
    return max(
        (figures(task, fn, p) for p in sweep), key=lambda r: (round(r["f1"], 6), r["params"])
    )


def sweeps(tasks: dict[str, Task]) -> dict[str, Any]:
    """Every rule's best setting on every task, and its transfer: tuned on one set,
    applied to another."""
    out: dict[str, Any] = {"best": {}, "transfer": {}}
    for t in tasks:
        out["best"][t] = {r: best(tasks[t], r) for r in RULES}
    # ukbench->corel: a same-object setting on queries with 99 matches each (a category,
    # or a burst of shots of one thing): what a rule costs past its k-th neighbour.
    pairs = [("holidays", "ukbench"), ("ukbench", "holidays"), ("ukbench", "corel")]
    for a, b in (p for p in pairs if p[0] in tasks and p[1] in tasks):
        out["transfer"][f"{a}->{b}"] = {
            r: figures(tasks[b], RULES[r][1], out["best"][a][r]["params"]) for r in RULES
        }
    # The flat cut-offs to recommend: the best mean F1 over the same-object sets, and
    # the best on the same-category one.
    objects = [tasks[t] for t in ("holidays", "ukbench") if t in tasks]
    flat = RULES["flat"][1]
    out["recommended"] = {
        "object": max(
            RULES["flat"][2], key=lambda p: np.mean([figures(t, flat, p)["f1"] for t in objects])
        )[0]
        if objects
        else None,
        "category": out["best"]["corel"]["flat"]["params"][0] if "corel" in tasks else None,
    }
    return out


def quantile_rows(pairs: dict[str, np.ndarray]) -> list[str]:
    labels = dict(PAIR_KINDS)
    out = [
        "| pairs | count | " + " | ".join(f"{q:.0%}" for q in QUANTILES) + " |",
        "|---|---|" + "---|" * len(QUANTILES),
    ]
    for key, s in pairs.items():
        qs = " | ".join(f"{v:.3f}" for v in np.quantile(s, QUANTILES))
        out.append(f"| {labels[key]} | {len(s):,} | {qs} |")
    return out


def sweep_rows(result: dict[str, Any]) -> list[str]:
    out = [
        "| task | kept: the best setting | precision | recall | F1 | queries left empty "
        "| wrong kept per unrelated query | unrelated queries keeping any |",
        "|---|---|---|---|---|---|---|---|",
    ]
    rows = [(t, r, f) for t, rs in result["best"].items() for r, f in rs.items()]
    rows += [
        (f"{t} (transfer)", r, f) for t, rs in result["transfer"].items() for r, f in rs.items()
    ]
    for task, rule, f in rows:
        out.append(
            f"| {task} | {rule_text(rule, f['params'])} | {f['precision']:.3f} "
            f"| {f['recall']:.3f} | {f['f1']:.3f} | {f['empty']:.3f} "
            f"| {f['wrong_per_unrelated']:.3f} | {f['unrelated_any']:.3f} |"
        )
    return out


def plot(
    pairs: dict[str, np.ndarray],
    path: str | Path,
    producer: str = "",
    marks: dict[str, float | None] | None = None,
) -> None:
    """Densities of the pair kinds' cosines, 700 x 350 px; `marks`: cut-offs drawn."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 3.5), dpi=100)
    ax = fig.add_subplot()
    bins = np.linspace(0.0, 1.0, 101)
    for key, label in PAIR_KINDS:
        ax.hist(pairs[key], bins=bins, density=True, histtype="step", lw=1.5, label=label)
    for text, x in (marks or {}).items():
        if x is not None:
            ax.axvline(x, color="grey", ls=":", lw=1)
            ax.text(x, ax.get_ylim()[1] * 0.97, f" {text} {x:.2f}", fontsize=7, va="top")
    ax.set_xlim(0.1, 1.0)
    ax.set_xlabel("cosine similarity (the score cbir search prints)")
    ax.set_ylabel("density")
    ax.set_title(f"Scores of image pairs, default descriptor{producer}", fontsize=10)
    ax.legend(fontsize=7, loc="upper left")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def run(
    datasets: str,
    options: dict[str, Any],
    work_dir: str | None = None,
    plot_path: str | None = None,
    seed: int = 0,
    log: Callable[[str], Any] = print,
) -> dict[str, Any]:
    """Index the datasets (into `work_dir`, reused when given), measure, print."""
    import contextlib
    import tempfile

    missing = [s for s in SETS.values() if not os.path.isdir(os.path.join(datasets, s))]
    if missing:
        raise CbirError(f"{datasets} lacks {', '.join(missing)}: name the shared datasets folder")
    if work_dir:
        os.makedirs(work_dir, exist_ok=True)
    kept = contextlib.nullcontext(work_dir) if work_dir else None
    with kept or tempfile.TemporaryDirectory(prefix="cbir-scores-") as folder:
        base = Path(folder)
        opts = {**options, "catalog": str(base / "catalog.db"), "index_dir": str(base / "index")}
        started = time.perf_counter()
        roots = [os.path.join(datasets, s) for s in SETS.values()]
        summary = api.index(roots, labels="none", **opts)
        log(f"indexed {summary.indexed}, unchanged {summary.unchanged} "
            f"({time.perf_counter() - started:.0f} s)")  # fmt: skip
        coll = api.open_collection(api.settings_for(**opts))
        try:
            ids = coll.usable_ids()
            vectors = np.asarray(coll.vectors(ids), dtype=np.float32)
            rows = reads.details(coll.db, ids)
            producer = coll.producer or {}
        finally:
            coll.close()
    paths = [rows[int(i)]["path"] for i in ids]
    lab = labels_of(paths, datasets)
    if np.any(lab.dataset == ""):  # a reused work folder's catalog may hold other images
        raise CbirError(
            f"{base / 'catalog.db'} holds images outside {datasets}: use a new --work-dir"
        )
    gram = vectors @ vectors.T
    pairs = pair_scores(gram, lab)
    rng = np.random.default_rng(seed)
    rows_of = {k: np.flatnonzero(lab.dataset == k) for k in SETS}
    instances = np.concatenate([rows_of["holidays"], rows_of["ukbench"]])
    tasks = {}
    for name in ("holidays", "ukbench"):
        queries = lab.queries[name]  # Holidays' xxxx00.jpg, every UKBench image
        others = rng.choice(
            rows_of["corel"], min(len(queries), len(rows_of["corel"])), replace=False
        )
        tasks[name] = make_task(name, gram, lab, queries, instances, np.sort(others))
    tasks["corel"] = make_task(
        "corel", gram, lab, rows_of["corel"], rows_of["corel"], rows_of["ukbench"]
    )
    result = sweeps(tasks)
    who = f" ({producer.get('runtime')} {producer.get('precision')})" if producer else ""
    log(f"{len(vectors):,} images{who}; cosine of every pair:")
    for line in quantile_rows(pairs):
        log(line)
    log("")
    log(f"cut-offs on the top {K}, best F1 of each rule (transfer: tuned on the first set):")
    for line in sweep_rows(result):
        log(line)
    rec = result["recommended"]
    log(
        f"flat cut-offs with the best F1: same object {rec['object']:.2f} (mean over "
        f"Holidays and UKBench), same category {rec['category']:.2f} (Corel-1K)"
    )
    if plot_path:
        rec = result["recommended"]
        plot(pairs, plot_path, who, {"same kind": rec["category"], "same object": rec["object"]})
        log(f"wrote {plot_path}")
    result["quantiles"] = {k: np.quantile(s, QUANTILES).tolist() for k, s in pairs.items()}
    return result
