"""The evaluation report: one self-contained folder of HTML, thumbnails and a chart.

`write_report(result, out_dir)` takes what `pipeline.evaluation.evaluate`
returns and writes `index.html` (the figures, the per-class table, and for a
sample of queries the query and its top 10 marked relevant or not),
`per_class.png` (per-class mAP and P@10) and `thumbs/` (one JPEG per image).
No JavaScript, no external resources: the folder can be copied anywhere.
"""

from __future__ import annotations

import hashlib
import html
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageOps

THUMB_SIZE = 160  # pixels on the longer side
THUMBS = "thumbs"
CHART = "per_class.png"

CSS = """
body { font-family: system-ui, sans-serif; margin: 24px; color: #222; }
h1 { margin-bottom: 4px; }
table { border-collapse: collapse; margin: 12px 0; }
th, td { border: 1px solid #ccc; padding: 3px 10px; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
table.summary th { text-align: left; background: #f4f4f4; }
tr.total td { font-weight: bold; background: #f4f4f4; }
img.chart { max-width: 100%; border: 1px solid #ddd; }
.query { display: flex; gap: 18px; align-items: flex-start; padding: 14px 0;
         border-top: 1px solid #ddd; }
.results { display: grid; grid-template-columns: repeat(5, 176px); gap: 8px; }
figure { margin: 0; width: 176px; font-size: 12px; }
figure img { display: block; width: 164px; height: 164px; object-fit: contain;
             background: #eee; border: 6px solid #999; }
figure.query-image img { border-color: #1f5fbf; }
figure.rel img { border-color: #1a9c3a; }
figure.irr img { border-color: #d0302f; }
figcaption { margin-top: 3px; line-height: 1.35; overflow-wrap: anywhere; }
.mark { font-weight: bold; }
figure.rel .mark { color: #137a2c; }
figure.irr .mark { color: #b3201f; }
.path { color: #666; }
"""


def _esc(value: Any) -> str:
    """Text made safe for HTML content and attribute values."""
    return html.escape("" if value is None else str(value), quote=True)


def _label(value: Any) -> str:
    """An escaped label that may wrap after its underscores."""
    return _esc(value).replace("_", "_<wbr>")


def _thumb_name(path: str) -> str:
    """The thumbnail's file name: sha1 of the image path."""
    return hashlib.sha1(path.encode("utf-8", "surrogateescape")).hexdigest() + ".jpg"


def _placeholder() -> Image.Image:
    """A small grey image standing in for one that cannot be opened."""
    img = Image.new("RGB", (THUMB_SIZE, THUMB_SIZE * 3 // 4), (170, 170, 170))
    ImageDraw.Draw(img).text((10, 10), "no image", fill=(70, 70, 70))
    return img


def make_thumbnail(path: str, dest: Path) -> bool:
    """Write a JPEG thumbnail of `path` to `dest` (a placeholder if it fails); True if real."""
    try:
        with Image.open(path) as im:
            im.draft("RGB", (THUMB_SIZE, THUMB_SIZE))  # fast JPEG downscale; no-op otherwise
            img = ImageOps.exif_transpose(im).convert("RGB")
        img.thumbnail((THUMB_SIZE, THUMB_SIZE))
        ok = True
    except Exception:  # any unreadable image: missing, truncated, not an image, too big
        img, ok = _placeholder(), False
    img.save(dest, "JPEG", quality=85)
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


def _summary(result: dict[str, Any]) -> str:
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
    body = "".join(f"<tr><th>{_esc(k)}</th><td>{_esc(v)}</td></tr>" for k, v in rows)
    return f'<table class="summary">{body}</table>'


def _class_table(result: dict[str, Any]) -> str:
    """The per-class table, with the overall figures as its last row."""
    head = '<tr><th>class</th><th class="num">queries</th><th class="num">mAP</th><th class="num">P@10</th></tr>'
    rows = [
        f'<tr><td>{_esc(label)}</td><td class="num">{c["queries"]}</td>'
        f'<td class="num">{c["map"]:.4f}</td><td class="num">{c["p_at_10"]:.4f}</td></tr>'
        for label, c in result["per_class"].items()
    ]
    rows.append(
        f'<tr class="total"><td>all</td><td class="num">{result["queries"]}</td>'
        f'<td class="num">{result["map"]:.4f}</td><td class="num">{result["p_at_10"]:.4f}</td></tr>'
    )
    return f"<table>{head}{''.join(rows)}</table>"


def _query_block(q: dict[str, Any], src: dict[str, str]) -> str:
    """One query: its thumbnail, then its top 10 in rank order, each marked."""
    name = Path(q["query"]).name
    query_fig = (
        f'<figure class="query-image"><img src="{_esc(src[q["query"]])}" alt="query {_esc(name)}" '
        f'title="{_esc(q["query"])}"><figcaption><b>query</b><br>{_label(q["label"])}<br>'
        f'<span class="path">{_esc(name)}</span><br>AP {q["ap"]:.3f} · P@10 {q["p_at_10"]:.2f}'
        "</figcaption></figure>"
    )
    figs = []
    for rank, r in enumerate(q["top10"], 1):
        rel = r["label"] == q["label"]
        mark = "✓ relevant" if rel else "✗ not relevant"
        figs.append(
            f'<figure class="result {"rel" if rel else "irr"}">'
            f'<img src="{_esc(src[r["path"]])}" alt="rank {rank}: {_esc(r["label"])}" '
            f'title="{_esc(r["path"])}"><figcaption><b>#{rank}</b> · {r["score"]:.3f}<br>'
            f'<span class="mark">{mark}</span><br>{_label(r["label"])}</figcaption></figure>'
        )
    return f'<div class="query">{query_fig}<div class="results">{"".join(figs)}</div></div>'


def write_report(result: dict[str, Any], out_dir: str | Path, per_class: int = 2) -> Path:
    """Write the HTML report of an evaluation into `out_dir`; returns its index.html.

    Shows up to `per_class` queries per label (the first ones in per_query order).
    """
    out = Path(out_dir)
    (out / THUMBS).mkdir(parents=True, exist_ok=True)
    samples = sample_queries(result["per_query"], per_class)
    src: dict[str, str] = {}
    for q in samples:
        for path in [q["query"], *(r["path"] for r in q["top10"])]:
            if path not in src:
                name = _thumb_name(path)
                make_thumbnail(path, out / THUMBS / name)
                src[path] = f"{THUMBS}/{name}"
    write_chart(result, out / CHART)

    score_note = "cosine similarity to the query"
    if result["rerank"] != "none":
        score_note = f"cosine similarity after re-ranking ({result['rerank']})"
    title = f"cbir evaluation: {result['method']}, rerank {result['rerank']}"
    page = f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{_esc(title)}</title>
<style>{CSS}</style>
</head>
<body>
<h1>{_esc(title)}</h1>
{_summary(result)}
<h2>Per class</h2>
{_class_table(result)}
<img class="chart" src="{CHART}" alt="per-class mAP and P@10 bar chart">
<h2>Sample queries ({len(samples)}: up to {per_class} per class, the first in query order)</h2>
<p>Top 10 in rank order, each with its score: {_esc(score_note)}. Relevant (same label
as the query): green border and ✓; not relevant: red border and ✗.</p>
{"".join(_query_block(q, src) for q in samples)}
</body>
</html>
"""
    index = out / "index.html"
    index.write_text(page, encoding="utf-8")
    return index
