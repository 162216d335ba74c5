"""`cbir bench duplicates`, fast tier: the edits make valid images of the expected kinds,
the benchmark set is assembled without touching the datasets, the pair-level precision
and recall are right on a hand-made grouping, the threshold rule picks what it says,
and the scale path runs end to end on a thousand generated vectors. No model runs; the
real benchmark is `cbir bench duplicates` (minutes: no slow test, see docs/benchmarks.md).
"""

from __future__ import annotations

import csv
import io
import random

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageOps

from pipeline.bench import duplicates as bench
from pipeline.bench import duplicates_scale
from pipeline.bench.edits import EDITS, Item, edited, make_set
from pipeline.embed.interface import l2_normalize


def photo(w: int = 120, h: int = 80, seed: int = 0) -> Image.Image:
    """A small image with edges and colour, unlike its mirror image."""
    rng = np.random.default_rng(seed)
    x = np.linspace(0, 255, w)[None, :, None] * np.ones((h, 1, 3))
    x[..., 1] = np.linspace(0, 255, h)[:, None]
    im = Image.fromarray((x * 0.8 + rng.uniform(0, 6, (h, w, 3))).astype(np.uint8))
    ImageDraw.Draw(im).rectangle((10, 10, 40, 50), fill=(250, 30, 30))
    return im


def opened(data: bytes) -> Image.Image:
    im = Image.open(io.BytesIO(data))
    im.load()
    return im


def diff(a: Image.Image, b: Image.Image) -> float:
    return float(np.abs(np.asarray(a, float) - np.asarray(b.convert("RGB"), float)).mean())


def test_every_edit_makes_a_valid_image_of_its_kind():
    im = photo()
    out = {k: opened(edited(im, k, random.Random(1))[0]) for k in EDITS}
    assert len(EDITS) >= 11
    for kind, e in out.items():
        assert e.mode == "RGB" and e.width > 8 and e.height > 8, kind
    assert out["resize 50%"].size == (60, 40)
    assert out["rotate 90"].size == (80, 120)
    for kind in ("jpeg q30", "jpeg q95", "rotate 3-5", "flip", "colour", "blur", "text"):
        assert out[kind].size == im.size and out[kind].format == "JPEG", kind
    assert len(edited(im, "jpeg q30", random.Random(1))[0]) < len(
        edited(im, "jpeg q95", random.Random(1))[0]
    )
    assert diff(im, out["jpeg q95"]) < 3
    assert 0.79 * 120 <= out["crop 5-20%"].width <= 0.96 * 120
    assert out["crop 5-20%"].width / out["crop 5-20%"].height == pytest.approx(1.5, abs=0.05)
    assert diff(ImageOps.mirror(im), out["flip"]) < diff(im, out["flip"]) / 3
    # Letterboxed to a square with black bars, or framed in white on every side.
    borders = {opened(edited(im, "border", random.Random(n))[0]).size for n in range(8)}
    assert borders - {(120, 120)} and all(
        size == (120, 120) or (size[0] > 120 and size[1] > 80) for size in borders
    )
    assert out["screenshot"].format == "PNG" and 0.9 * 120 < out["screenshot"].width < 120
    blur = np.asarray(out["blur"].convert("L"), float)
    sharp = np.asarray(im.convert("L"), float)
    assert np.abs(np.diff(blur, axis=1)).mean() < 0.7 * np.abs(np.diff(sharp, axis=1)).mean()
    corner = np.asarray(out["rotate 3-5"])[:2, :2]
    assert corner.mean() < 40  # black comes in at the corners
    for kind in ("colour", "text"):
        assert diff(im, out[kind]) > 3, kind
    # Seeded: the same rng gives the same bytes.
    assert edited(im, "crop 5-20%", random.Random(5)) == edited(im, "crop 5-20%", random.Random(5))


def fake_datasets(root):
    """corel1k (2 classes x 3), holidays150 (places 1000: 2 photos, 1001: 1), ukbench (8)."""
    corel = root / "corel1k"
    rows = []
    for c, label in enumerate(("bus", "horses")):
        (corel / label).mkdir(parents=True)
        for n in range(3):
            photo(seed=10 * c + n).save(corel / label / f"{n}.jpg")
            rows.append((f"{label}/{n}.jpg", label, "database"))
    with (corel / "manifest.csv").open("w", newline="") as f:
        csv.writer(f).writerows([("path", "label", "split"), *rows])
    (root / "holidays150" / "images").mkdir(parents=True)
    for name in ("100000", "100001", "100100"):
        photo(seed=int(name) % 97).save(root / "holidays150" / "images" / f"{name}.jpg")
    (root / "holidays150" / "groundtruth.csv").write_text("query,relevant\n100000.jpg,100001.jpg\n")
    (root / "ukbench1000" / "images").mkdir(parents=True)
    for n in range(8):
        photo(60, 40, seed=50 + n).save(root / "ukbench1000" / "images" / f"ukbench{n:05d}.jpg")


def test_make_set_edits_the_originals_into_the_work_folder_only(tmp_path):
    fake_datasets(tmp_path / "data")
    before = sorted(p for p in (tmp_path / "data").rglob("*"))
    items = make_set(tmp_path / "data", tmp_path / "work", originals=2, seed=3)
    assert sorted(p for p in (tmp_path / "data").rglob("*")) == before
    kinds = [i.kind for i in items.values()]
    # 2 Corel + 2 Holidays queries are originals; each edited once per kind.
    assert kinds.count("original") == 4 and kinds.count("distractor") == 4
    assert kinds.count("holidays") == 1 and kinds.count("ukbench") == 8
    assert all(kinds.count(k) == 4 for k in EDITS)
    for path, item in items.items():
        if item.kind in EDITS:
            assert path.startswith(str((tmp_path / "work").resolve()))
            assert items[item.family].kind == "original"
            assert items[item.family].scene == item.scene
    uk = [i.scene for p, i in sorted(items.items()) if i.kind == "ukbench"]
    assert uk == ["ukbench:0"] * 4 + ["ukbench:1"] * 4
    truth = bench.true_pairs(items)
    assert len(truth["flip"]) == 4 and len(truth["similar"]) == 12
    assert truth["holidays"] == [tuple(str(tmp_path / "data" / "holidays150" / "images" / n)
                                       for n in ("100000.jpg", "100001.jpg"))]  # fmt: skip
    # The same seed chooses the same originals.
    again = make_set(tmp_path / "data", tmp_path / "work2", originals=2, seed=3)
    assert sorted(p for p, i in again.items() if i.kind == "original") == sorted(
        p for p, i in items.items() if i.kind == "original"
    )


def hand_made() -> dict[str, Item]:
    """Originals A and B with two edits each, a distractor D, UKBench shots U1 U2 (one
    object) and Holidays photos H1 H2 (one place, H1 an original with one edit)."""
    items = {
        "A": Item("A", "A", "original"),
        "A-flip": Item("A", "A", "flip"),
        "A-blur": Item("A", "A", "blur"),
        "B": Item("B", "B", "original"),
        "B-flip": Item("B", "B", "flip"),
        "B-blur": Item("B", "B", "blur"),
        "D": Item("D", "D", "distractor"),
        "U1": Item("U1", "uk:0", "ukbench"),
        "U2": Item("U2", "uk:0", "ukbench"),
        "H1": Item("H1", "hol:1", "original"),
        "H1-flip": Item("H1", "hol:1", "flip"),
        "H2": Item("H2", "hol:1", "holidays"),
    }
    return items


def test_pair_precision_and_recall_on_a_hand_made_grouping():
    items = hand_made()
    truth = bench.true_pairs(items)
    assert sorted(truth["flip"]) == [("A", "A-flip"), ("B", "B-flip"), ("H1", "H1-flip")]
    assert truth["similar"] == [("U1", "U2")] and truth["holidays"] == [("H1", "H2")]
    groups = [
        ["A", "A-flip", "A-blur", "D"],  # 3 right pairs, 3 wrong (D)
        ["B", "B-flip"],  # 1 right; B-blur missed
        ["U1", "U2"],  # similar shots merged as copies: 1 wrong
        ["H1", "H1-flip", "H2"],  # 1 right, 2 wrong (H2 is another photo of the place)
    ]
    f = bench.near_figures(groups, items, truth)
    assert f["pairs"] == 6 + 1 + 1 + 3
    assert f["precision"] == pytest.approx(5 / 11)
    # (original, edit) pairs: A-flip A-blur B-flip H1-flip found; B-blur not.
    assert f["recall"] == pytest.approx(4 / 5)
    assert f["kinds"]["flip"]["recall"] == 1.0 and f["kinds"]["blur"]["recall"] == 0.5
    # Pairs with a blur edit: A-blur with A, A-flip (right) and D (wrong).
    assert f["kinds"]["blur"]["precision"] == pytest.approx(2 / 3)
    # With a flip edit: A-flip with A, A-blur, D; B-flip with B; H1-flip with H1, H2.
    assert f["kinds"]["flip"]["precision"] == pytest.approx(4 / 6)
    assert f["kinds"]["resize 50%"] == {"precision": None, "recall": None, "pairs": 0}
    assert f["ukbench_merged"] == 1.0 and f["holidays_merged"] == 1.0
    # Judged by scene: only the 3 pairs with D show two scenes.
    s = bench.similar_figures(groups, items, truth)
    assert s["precision"] == pytest.approx(8 / 11) and s["pairs"] == 11
    assert s["recall"] == 1.0 and s["ukbench_precision"] == 1.0 and s["holidays_recall"] == 1.0
    s = bench.similar_figures([["U1", "D"], ["B", "B-blur"]], items, truth)
    assert s["precision"] == 0.5 and s["ukbench_precision"] == 0.0 and s["recall"] == 0.0


def test_the_threshold_rule():
    rows = [
        {"threshold": 0.90, "precision": 0.95, "recall": 0.95},
        {"threshold": 0.92, "precision": 0.99, "recall": 0.91},
        {"threshold": 0.94, "precision": 0.995, "recall": 0.90},
    ]
    assert bench.choose(rows, (0.99, 0.90))["threshold"] == 0.92  # the lowest that meets it
    # None meets it: the best F0.5 (precision counted twice).
    rows = [
        {"threshold": 0.90, "precision": 0.80, "recall": 0.90},
        {"threshold": 0.92, "precision": 0.90, "recall": 0.70},
        {"threshold": 0.94, "precision": 0.97, "recall": 0.40},
    ]
    assert [round(bench.f_score(r), 3) for r in rows] == [0.818, 0.851, 0.755]
    assert bench.choose(rows, (0.99, 0.90))["threshold"] == 0.92
    assert bench.choose(rows, None)["threshold"] == 0.92


def test_scale_path_on_generated_vectors(tmp_path):
    rng = np.random.default_rng(0)
    d = 2048  # the generated catalog's model is ResNet50's shape
    centres = rng.standard_normal((10, d))
    real = l2_normalize(centres[rng.integers(0, 10, 200)] + 0.5 * rng.standard_normal((200, d)))
    moved = (0.3 * rng.standard_normal((50, d)) / np.sqrt(d)).astype(np.float32)
    chunk = next(duplicates_scale.generated(real.astype(np.float32), moved, 100))
    assert chunk.shape == (100, d)
    assert np.allclose(np.linalg.norm(chunk, axis=1), 1, atol=1e-5)
    # The last fifth are edited copies: each close to one of the rest.
    best = (chunk[80:] @ chunk[:80].T).max(axis=1)
    assert (best > 0.9).all()
    rows = duplicates_scale.bench_scale(real.astype(np.float32), moved, [1000], tmp_path)
    exact, ivf, *sweep = rows
    assert [r["vectors"] for r in rows] == [1000] * 4 and len(sweep) == 2
    assert exact["method"].startswith("exact") and exact["pairs"] >= 100
    assert ivf["method"] == "IVF16,Flat nprobe=2" and not ivf["sampled"]
    # An IVF's pairs are re-scored exactly: a subset of the exact ones, recall = their share.
    for r in (ivf, *sweep):
        assert r["pairs"] <= exact["pairs"]
        assert r["pair_recall"] == round(r["pairs"] / exact["pairs"], 4)
    assert duplicates_scale.table(rows)[2].startswith("| 1,000 | exact")
    assert not any(tmp_path.iterdir())  # the generated catalogs are removed
