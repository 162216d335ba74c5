"""`cbir bench scores`, fast tier: the pair kinds, the cut-off rules and their figures on
hand-made scores, and the whole command on a tiny copy of the datasets' layout with the
fake model. The real figures come from `cbir bench scores` (docs/benchmarks.md)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pipeline.bench import scores
from tests import fakes


def tiny_datasets(root) -> None:
    """corel1k (2 classes x 3), holidays150 (2 groups: 2 + 3 images), ukbench1000 (2 x 4),
    with ground truths as the shared ones are written."""
    rng = np.random.default_rng(0)

    def image(path, base):
        path.parent.mkdir(parents=True, exist_ok=True)
        px = np.clip(base + rng.integers(0, 40, (40, 60, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(px).save(path, quality=90)

    for c, name in enumerate(("beaches", "bus")):
        for i in range(3):
            image(root / "corel1k" / name / f"{c * 100 + i}.jpg", 30 + 100 * c)
    hol = root / "holidays150"
    for g, n in ((1000, 2), (1001, 3)):
        for i in range(n):
            image(hol / "images" / f"{g}{i:02d}.jpg", g - 900)
    (hol / "groundtruth.csv").write_text(
        "query,relevant\n100000.jpg,100001.jpg\n100100.jpg,100101.jpg\n100100.jpg,100102.jpg\n"
    )
    ukb = root / "ukbench1000"
    rows = ["query,relevant"]
    for i in range(8):
        image(ukb / "images" / f"ukbench{i:05d}.jpg", 60 * (i // 4) + 20)
        rows += [
            f"ukbench{i:05d}.jpg,ukbench{j:05d}.jpg" for j in range(i // 4 * 4, i // 4 * 4 + 4)
        ]
    (ukb / "groundtruth.csv").write_text("\n".join(rows) + "\n")


def test_labels_and_pair_kinds(tmp_path):
    tiny_datasets(tmp_path)
    paths = sorted(str(p) for p in tmp_path.rglob("*.jpg"))
    lab = scores.labels_of(paths, str(tmp_path))
    assert sorted(set(lab.dataset)) == ["corel", "holidays", "ukbench"]
    assert np.all(lab.group >= 0)
    assert len(lab.queries["holidays"]) == 2 and len(lab.queries["ukbench"]) == 8
    gram = np.eye(len(paths))
    pairs = scores.pair_scores(gram, lab)
    # same object: Holidays 1 + 3 pairs, UKBench 2 x 6; Corel: 2 x 3 same class, 9 across
    assert len(pairs["object"]) == 4 + 12
    assert len(pairs["category"]) == 6 and len(pairs["other_category"]) == 9
    assert len(pairs["other_object"]) == 6 + 16  # Holidays 2 x 3, UKBench 4 x 4
    n = len(paths)
    assert sum(len(v) for v in pairs.values()) == n * (n - 1) // 2


def hand_task() -> scores.Task:
    """Two queries with a match (depth 20 scores) and one without."""
    top = np.linspace(0.7, 0.51, 20)
    a = top.copy()
    a[:2] = (0.95, 0.9)  # two matches well above the crowd
    b = top.copy()
    b[0] = 0.85  # one match
    relevant = np.zeros((2, scores.K), bool)
    relevant[0, :2] = relevant[1, 0] = True
    return scores.Task("t", np.stack([a, b]), relevant, np.array([2, 1]), top[None])


def test_rules_and_figures_on_hand_made_scores():
    task = hand_task()
    flat = scores.figures(task, scores.RULES["flat"][1], (0.8,))
    assert (flat["precision"], flat["recall"], flat["empty"]) == (1.0, 1.0, 0.0)
    assert flat["wrong_per_unrelated"] == 0 and flat["unrelated_any"] == 0
    low = scores.figures(task, scores.RULES["flat"][1], (0.655,))
    # kept: query a 2 + 3 of the crowd, b 1 + 4, the unrelated one 5 (0.70 .. 0.66)
    assert low["precision"] == pytest.approx(3 / 15) and low["recall"] == 1.0
    assert low["wrong_per_unrelated"] == 5 and low["unrelated_any"] == 1.0
    # top-1 ratio always keeps the unrelated query's best result
    top1 = scores.figures(task, scores.RULES["top1"][1], (0.99,))
    assert top1["unrelated_any"] == 1.0
    kth = scores.figures(task, scores.RULES["kth"][1], (0.1,))  # 10th score 0.61: >= 0.71
    assert kth["recall"] == 1.0 and kth["precision"] == 1.0
    both = scores.figures(task, scores.RULES["floor+kth"][1], (0.9, 0.1))
    assert both["recall"] == pytest.approx(2 / 3) and both["empty"] == 0.5
    assert scores.rule_text("floor+kth", (0.9, 0.1)) == "score >= max(0.9, 10th score + 0.1)"


def test_sweeps_pick_the_best_f1_and_transfer():
    task = hand_task()
    out = scores.sweeps({"holidays": task, "ukbench": task, "corel": task})
    assert out["best"]["holidays"]["flat"]["f1"] == 1.0
    assert 0.71 <= out["best"]["holidays"]["flat"]["params"][0] <= 0.85  # ties: the stricter
    assert out["transfer"]["holidays->ukbench"]["flat"]["f1"] == 1.0
    assert 0.71 <= out["recommended"]["object"] <= 0.85
    assert set(out["transfer"]) == {"holidays->ukbench", "ukbench->holidays", "ukbench->corel"}


def test_the_command_on_tiny_datasets_with_the_fake_model(tmp_path, monkeypatch):
    from pipeline.api import models

    monkeypatch.setattr(models, "cached_embedder", fakes.cached)
    tiny_datasets(tmp_path / "data")
    png = tmp_path / "scores.png"
    out = fakes.ok(
        fakes.cli("bench", "scores", tmp_path / "data", "--work-dir", tmp_path / "w", "--plot", png)
    )
    assert "| same object (Holidays, UKBench) | 16 |" in out
    assert "flat cut-offs with the best F1" in out and "ukbench->corel (transfer)" in out
    assert Image.open(png).size == (700, 350)
    again = fakes.ok(fakes.cli("bench", "scores", tmp_path / "data", "--work-dir", tmp_path / "w"))
    assert "indexed 0, unchanged 19" in again  # the work folder's catalog is reused


def test_a_folder_without_the_datasets_is_refused(tmp_path):
    fakes.assert_refused(fakes.cli("bench", "scores", tmp_path), "lacks corel1k")
