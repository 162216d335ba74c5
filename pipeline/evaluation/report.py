"""The evaluation report: one self-contained folder of HTML, thumbnails and a chart.

`write_report(result, out_dir)` takes what `pipeline.evaluation.run.evaluate`
returns and writes `index.html` (the figures, the per-class table, and for a
sample of queries the query and its top 10 marked relevant or not),
`per_class.png` (per-class mAP and P@10) and `thumbs/` (one JPEG per image),
rendering `templates/report.html` with Jinja (autoescaped). No JavaScript, no
external resources: the folder can be copied anywhere.

An instance benchmark's result (`pipeline.evaluation.instances`, with `groundtruth`)
gets the instance section instead of the per-class one: the worst queries by AP
and a few of the best, each with its top 10 and the relevant images missed
from the top 10, with their ranks.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import jinja2
import markupsafe

from pipeline.config import Settings
from pipeline.errors import CbirError, path_problem
from pipeline.files import shown
from pipeline.inputs.thumbs import placeholder_bytes, thumbnail_bytes

THUMB_SIZE = 160  # pixels on the longer side
THUMBS = "thumbs"
CHART = "per_class.png"


def _thumb_name(path: str) -> str:
    """The thumbnail's file name: sha1 of the image path."""
    return hashlib.sha1(path.encode("utf-8", "surrogateescape")).hexdigest() + ".jpg"


def make_thumbnail(path: str, dest: Path, max_pixels: int) -> bool:
    """Write a JPEG thumbnail of `path` to `dest` (a placeholder if it fails); True if real."""
    try:
        data, ok = thumbnail_bytes(path, max_pixels, THUMB_SIZE), True
    except Exception:  # any unreadable image: missing, truncated, not an image, too big
        data, ok = placeholder_bytes(THUMB_SIZE), False
    dest.write_bytes(data)
    return ok


def sample_queries(per_query: list[dict[str, Any]], per_class: int) -> list[dict[str, Any]]:
    """The first `per_class` queries of each label, in per_query order."""
    taken: dict[str, int] = {}
    out = []
    for q in per_query:
        if taken.get(q["label"], 0) < per_class:
            taken[q["label"]] = taken.get(q["label"], 0) + 1
            out.append(q)
    return out


def instance_samples(
    per_query: list[dict[str, Any]], worst: int, best: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The `worst` queries by AP (lowest first) and the `best` others (highest first)."""
    order = sorted(range(len(per_query)), key=lambda i: (per_query[i]["ap"], i))
    low = order[:worst]
    high = order[len(low) :][::-1][:best]
    return [per_query[i] for i in low], [per_query[i] for i in high]


def missed(query: dict[str, Any], top: int = 10) -> list[dict[str, Any]]:
    """The query's relevant images outside its top `top`, by rank (unranked ones last)."""
    out = [r for r in query["relevant"] if r["rank"] is None or r["rank"] > top]
    return sorted(out, key=lambda r: (r["rank"] is None, r["rank"] or 0))


def write_chart(result: dict[str, Any], dest: Path) -> None:
    """Per-class mAP and P@10 as side-by-side bars, with the overall mAP as a line."""
    from matplotlib.figure import Figure  # Agg canvas, no pyplot: no global backend state

    classes = list(result["per_class"])
    maps = [result["per_class"][c]["map"] for c in classes]
    p10s = [result["per_class"][c]["p_at_10"] for c in classes]
    xs = range(len(classes))
    fig = Figure(figsize=(max(6.0, 0.7 * len(classes) + 2.5), 4.8), dpi=100)
    ax = fig.add_subplot()
    ax.bar([x - 0.2 for x in xs], maps, 0.4, label="mAP", color="#3b6fb6")
    ax.bar([x + 0.2 for x in xs], p10s, 0.4, label="P@10", color="#f0a030")
    ax.axhline(
        result["map"], color="#c02a2a", ls="--", lw=1.2, label=f"overall mAP {result['map']:.3f}"
    )
    ax.set_xticks(list(xs), classes, rotation=40, ha="right")
    ax.set_xlim(-0.6, len(classes) - 0.4)
    ax.set_ylim(0, 1.22)  # headroom for the legend
    ax.set_yticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    ax.set_ylabel("score")
    ax.set_title(f"Per-class retrieval: {result['method']} (rerank {result['rerank']})")
    ax.legend(loc="upper center", ncols=3, framealpha=0.9)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(dest, format="png")


def _summary(result: dict[str, Any]) -> list[tuple[str, Any]]:
    """The header table: settings and the overall figures."""
    rerank = str(result["rerank"])
    if "rerank_n" in result:
        rerank += f" (n {result['rerank_n']}, alpha {result['rerank_alpha']})"
    rows = [
        ("method", result["method"]),
        ("rerank", rerank),
        ("protocol", result["protocol"]),
        ("queries", result["queries"]),
        ("database images", result["database"]),
        ("mAP", f"{result['map']:.4f}"),
        ("P@1", f"{result['p_at_1']:.4f}"),
        ("P@10", f"{result['p_at_10']:.4f}"),
    ]
    if "recall_at_10" in result:
        rows.append(
            (f"recall@10 of index {result.get('index', '')}", f"{result['recall_at_10']:.4f}")
        )
    return rows


def _instance_summary(result: dict[str, Any]) -> list[tuple[str, Any]]:
    """The header table of an instance benchmark, each figure with its protocol."""
    rerank = str(result["rerank"])
    if "rerank_n" in result:
        rerank += f" (n {result['rerank_n']}, alpha {result['rerank_alpha']})"
    return [
        ("method", result["method"]),
        ("rerank", rerank),
        ("ground truth", result["groundtruth"]),
        ("queries", result["queries"]),
        ("images ranked", result["database"]),
        ("relevant pairs", result["pairs"]),
        ("mAP", f"{result['map']:.4f} ({result['map_protocol']})"),
        (
            "N-S score",
            f"{result['ns_score']:.3f} of 4, {result['ns_best']:.3f} at best for these groups "
            f"({result['ns_protocol']})",
        ),
    ]


def _thumbs(paths: list[str], out: Path, src: dict[str, str], max_pixels: int) -> None:
    """A thumbnail for each path not yet in `src`, which maps path -> relative file."""
    for path in paths:
        if path not in src:
            name = _thumb_name(path)
            make_thumbnail(path, out / THUMBS / name, max_pixels)
            src[path] = f"{THUMBS}/{name}"


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("pipeline", "templates"),
        autoescape=True,
        # A file name that is not UTF-8 is shown with U+FFFD: a page cannot hold raw bytes.
        finalize=lambda v: shown(v) if isinstance(v, str) else v,
    )
    env.filters["basename"] = lambda p: Path(p).name
    # Long labels may wrap after their underscores.
    env.filters["wrappable"] = lambda v: markupsafe.escape(shown(str(v))).replace(
        "_", markupsafe.Markup("_<wbr>")
    )
    return env


def write_report(
    result: dict[str, Any],
    out_dir: str | Path,
    per_class: int = 2,
    max_pixels: int = Settings().max_pixels,
    worst: int = 20,
    best: int = 3,
) -> Path:
    """Write the HTML report of an evaluation into `out_dir`; returns its index.html.

    Shows up to `per_class` queries per label (the first ones in per_query order);
    for an instance benchmark, the `worst` queries by AP and the `best` ones.
    """
    out = Path(out_dir)
    if problem := path_problem(out, folder=True):  # before any thumbnail is made
        raise CbirError(f"cannot write the report: {problem}")
    (out / THUMBS).mkdir(parents=True, exist_ok=True)
    src: dict[str, str] = {}
    if "groundtruth" in result:
        return _write_instance_report(result, out, src, max_pixels, worst, best)
    samples = sample_queries(result["per_query"], per_class)
    for q in samples:
        _thumbs([q["query"], *(r["path"] for r in q["top10"])], out, src, max_pixels)
    write_chart(result, out / CHART)

    return _render(
        out,
        result,
        title=f"cbir evaluation: {result['method']}, rerank {result['rerank']}",
        summary=_summary(result),
        chart=CHART,
        samples=samples,
        per_class=per_class,
        src=src,
    )


def _render(out: Path, result: dict[str, Any], **page: Any) -> Path:
    """Render report.html into `out`/index.html; the score note follows the re-ranking."""
    score_note = "cosine similarity to the query"
    if result["rerank"] != "none":
        score_note = f"cosine similarity after re-ranking ({result['rerank']})"
    html = (
        _environment()
        .get_template("report.html")
        .render(result=result, score_note=score_note, **page)
    )
    index = out / "index.html"
    index.write_text(html, encoding="utf-8", errors="surrogateescape")
    return index


def _write_instance_report(
    result: dict[str, Any], out: Path, src: dict[str, str], max_pixels: int, worst: int, best: int
) -> Path:
    """The report of an instance benchmark: summary, then the worst and best queries."""
    low, high = instance_samples(result["per_query"], worst, best)
    groups = [
        (f"The {len(low)} worst queries by AP", [(q, missed(q)) for q in low]),
        (f"The {len(high)} best of the others", [(q, missed(q)) for q in high]),
    ]
    for _, queries in groups:
        for q, gone in queries:
            paths = [q["query"], *(r["path"] for r in q["top10"]), *(r["path"] for r in gone)]
            _thumbs(paths, out, src, max_pixels)
    return _render(
        out,
        result,
        title=f"cbir instance evaluation: {result['method']}, rerank {result['rerank']}",
        summary=_instance_summary(result),
        instance=True,
        groups=[g for g in groups if g[1]],
        src=src,
    )
