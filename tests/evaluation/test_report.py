"""The HTML report on a fake evaluation result over tiny generated images (no model)."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

from PIL import Image

from pipeline.evaluation.report import THUMB_SIZE, write_report

ODD = "<b>&"  # a label that must be escaped


class Page(HTMLParser):
    """The parts of index.html the tests look at: img tags and figure classes, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.imgs: list[dict[str, str | None]] = []
        self.figures: list[str] = []
        self.query_blocks = 0
        self.scripts = 0
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "img":
            self.imgs.append(a)
        elif tag == "figure":
            self.figures.append(a.get("class") or "")
        elif tag == "div" and a.get("class") == "query":
            self.query_blocks += 1
        elif tag in ("script", "link", "iframe"):
            self.scripts += 1

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def make_images(root: Path) -> dict[str, str]:
    """Small images of several kinds, by name; 'missing' does not exist."""
    root.mkdir()
    paths = {}
    for name, colour in [("red", (220, 30, 30)), ("green", (30, 200, 60)), ("blue", (30, 60, 220))]:
        p = root / f"{name}.jpg"
        Image.new("RGB", (64, 48), colour).save(p)
        paths[name] = str(p)
    Image.new("L", (300, 200), 128).save(root / "grey.png")  # larger than a thumbnail
    Image.new("RGBA", (40, 40), (0, 0, 255, 100)).save(root / "alpha.png")
    rotated = Image.new("RGB", (80, 40), (250, 200, 0))  # landscape pixels...
    exif = Image.Exif()
    exif[0x0112] = 6  # ...shown rotated 90 degrees: portrait
    rotated.save(root / "rotated.jpg", exif=exif)
    (root / "broken.jpg").write_bytes(b"not a jpeg")
    for name in ("grey", "alpha", "rotated", "broken"):
        paths[name] = str(root / f"{name}{'.png' if name in ('grey', 'alpha') else '.jpg'}")
    paths["missing"] = str(root / "missing.jpg")
    return paths


def fake_result(paths: dict[str, str]) -> dict[str, Any]:
    """A result shaped like pipeline.evaluation.run.evaluate's, with 3 classes and 6 queries."""
    label_of = {
        "red": "cats",
        "green": "cats",
        "blue": ODD,
        "grey": ODD,
        "alpha": "dogs",
        "rotated": "dogs",
        "broken": "cats",
        "missing": ODD,
    }
    pool = list(label_of)
    queries = [("red", "cats"), ("blue", ODD), ("green", "cats"), ("missing", ODD)]
    queries += [("broken", "cats"), ("rotated", "dogs")]  # a third "cats": not shown
    per_query = []
    for qi, (qname, qlabel) in enumerate(queries):
        names = [pool[(qi + j) % len(pool)] for j in range(10)]
        per_query.append(
            {
                "query": paths[qname],
                "label": qlabel,
                "ap": 0.5 + qi / 20,
                "p_at_1": 1.0,
                "p_at_10": 0.3,
                "top10": [
                    {"id": j, "path": paths[n], "label": label_of[n], "score": 0.9 - j / 50}
                    for j, n in enumerate(names)
                ],
            }
        )
    per_class = {
        c: {"queries": sum(q["label"] == c for q in per_query), "map": 0.4, "p_at_10": 0.35}
        for c in sorted({q["label"] for q in per_query})
    }
    return {
        "method": "resnet50",
        "rerank": "none",
        "queries": len(per_query),
        "database": len(pool),
        "protocol": "held-out queries from manifest.csv",
        "map": 0.61234,
        "p_at_1": 1.0,
        "p_at_10": 0.3,
        "per_class": per_class,
        "index": "hnsw",
        "recall_at_10": 0.98765,
        "per_query": per_query,
    }


def test_report_folder(tmp_path):
    paths = make_images(tmp_path / "images")
    result = fake_result(paths)
    out = tmp_path / "report"
    index = write_report(result, out)

    assert index == out / "index.html" and index.is_file()
    text = index.read_text(encoding="utf-8")
    page = Page()
    page.feed(text)
    assert "0.6123" in text and "0.9877" in text  # mAP and recall@10, formatted

    # Two queries per class at most, in per_query order: the third "cats" query is left out.
    shown = [q for i, q in enumerate(result["per_query"]) if i != 4]
    assert page.query_blocks == len(shown) == 5
    results = [c for c in page.figures if c.startswith("result")]
    assert len(results) == 10 * len(shown)
    assert sum(c == "query-image" for c in page.figures) == len(shown)
    expected = [
        "result rel" if r["label"] == q["label"] else "result irr"
        for q in shown
        for r in q["top10"]
    ]
    assert results == expected
    assert "result rel" in expected and "result irr" in expected
    body = "".join(page.text)
    assert body.count("✓ relevant") == expected.count("result rel")
    assert body.count("✗ not relevant") == expected.count("result irr")
    # Scores with 3 decimals, in rank order.
    first = [f"{r['score']:.3f}" for r in shown[0]["top10"]]
    assert re.findall(r"#\d+ · (\d\.\d{3})", body)[:10] == first

    # Every image is a relative path to a file inside the folder, and Pillow opens it.
    assert len(page.imgs) == 11 * len(shown) + 1
    for img in page.imgs:
        src = img["src"] or ""
        assert not Path(src).is_absolute() and "://" not in src
        target = (out / src).resolve()
        assert target.is_relative_to(out.resolve()) and target.is_file()
        with Image.open(target) as im:
            im.verify()

    # One JPEG thumbnail per distinct image; the unreadable ones got a placeholder.
    distinct = {q["query"] for q in shown} | {r["path"] for q in shown for r in q["top10"]}
    thumbs = sorted((out / "thumbs").iterdir())
    assert len(thumbs) == len(distinct) == 8
    for t in thumbs:
        with Image.open(t) as im:
            assert im.format == "JPEG" and im.mode == "RGB" and max(im.size) <= THUMB_SIZE
    src_of = {img["title"]: img["src"] for img in page.imgs if img.get("title")}
    with Image.open(out / src_of[paths["grey"]]) as im:
        assert im.width == THUMB_SIZE and abs(im.height - THUMB_SIZE * 2 / 3) <= 1  # aspect kept
    with Image.open(out / src_of[paths["rotated"]]) as im:
        assert im.size == (40, 80)  # EXIF orientation applied
    with Image.open(out / src_of[paths["missing"]]) as im:
        assert all(abs(v - 170) <= 3 for v in im.getpixel((THUMB_SIZE - 5, 5)))  # grey placeholder

    # The chart is a real PNG of a sensible size.
    with Image.open(out / "per_class.png") as im:
        assert im.format == "PNG"
        assert 500 <= im.size[0] <= 2500 and 300 <= im.size[1] <= 1000

    # Text is escaped; the page is self-contained.
    assert ODD not in text and "&lt;b&gt;&amp;" in text
    assert ODD in body  # and reads back as the label
    assert page.scripts == 0 and "http://" not in text and "https://" not in text


def test_per_class_and_rewrite(tmp_path):
    paths = make_images(tmp_path / "images")
    result = fake_result(paths)
    out = tmp_path / "report"
    write_report(result, out)
    index = write_report(result, str(out), per_class=1)  # a str and an existing folder
    page = Page()
    page.feed(index.read_text(encoding="utf-8"))
    assert page.query_blocks == 3  # one per class
    assert [img["title"] for img in page.imgs if img.get("alt", "").startswith("query")] == [
        paths["red"],
        paths["blue"],
        paths["rotated"],
    ]
