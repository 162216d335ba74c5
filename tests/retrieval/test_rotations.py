"""Query-time rotations (setting `rotations`, `--rotations`): photos stored sideways without EXIF.

Fast tier, fake model (an 8x8 thumbnail through a fixed projection, so turning an
image changes its vector). Images are small asymmetric PNGs: lossless, so a copy
turned by 90 degrees and turned back is the original pixel for pixel.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import fakes
import pipeline
from fakes import assert_refused, cli, opts
from pipeline import api, config, specs
from pipeline.errors import CbirError
from pipeline.inputs.decode import decode_file
from pipeline.retrieval import ranking

ALL = "0,90,180,270"


@pytest.fixture(autouse=True)
def fake_model(monkeypatch):
    monkeypatch.setattr(api.models, "cached_embedder", fakes.cached)


def scene(seed: int, w: int = 64, h: int = 48) -> np.ndarray:
    """An asymmetric image: colour ramps across and down, a bright block in one corner."""
    rng = np.random.default_rng(seed)
    x, y = np.meshgrid(np.linspace(0, 1, w), np.linspace(0, 1, h))
    base = rng.uniform(0.2, 1.0, 3)
    img = np.stack([x * base[0], y * base[1], (1 - x) * y * base[2]], axis=-1) * 200
    img[: h // 3, : w // 4] = 255
    return np.clip(img + rng.integers(0, 20, img.shape), 0, 255).astype(np.uint8)


def save(pixels: np.ndarray, path: Path, turn: int = 0) -> Path:
    """A PNG of `pixels`, turned counter-clockwise by `turn` degrees; no EXIF tag."""
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(pixels)
    if turn:
        im = im.transpose({90: Image.Transpose.ROTATE_90, 180: Image.Transpose.ROTATE_180,
                           270: Image.Transpose.ROTATE_270}[turn])  # fmt: skip
    im.save(path)
    return path


CLASSIC = ["--input", "crop", "--pooling", "avg"]


@pytest.fixture(scope="module")
def coll(tmp_path_factory) -> Path:
    """Eight scenes (imgs/scene_N.png) indexed; turned copies of scene 0 outside the catalog."""
    root = tmp_path_factory.mktemp("rotations")
    for i in range(8):
        save(scene(i), root / "imgs" / f"scene_{i}.png")
    save(scene(0), root / "queries" / "turned90.png", 90)
    save(scene(0), root / "queries" / "turned270.png", 270)
    save(scene(1), root / "queries" / "other_turned180.png", 180)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(api.models, "cached_embedder", fakes.cached)
        # The paper's 224 crop: these tests turn decoded squares (the web server's path).
        assert cli("index", root / "imgs", *CLASSIC, *opts(root)).exit_code == 0
    return root


def search(root: Path, *queries, **options):
    return pipeline.search(
        [str(q) if isinstance(q, Path) else q for q in queries],
        catalog=str(root / "c.db"), index_dir=str(root / "idx"), **options,
    )  # fmt: skip


def test_turned_copy_found_at_rank_1_with_the_originals_score(coll):
    original = coll / "imgs" / "scene_0.png"
    plain = search(coll, original)[0]["results"][0]
    assert Path(plain["path"]) == original and plain["score"] == pytest.approx(1.0, abs=1e-5)
    for rotations in (ALL, "0,90,270"):
        top = search(coll, coll / "queries" / "turned90.png", rotations=rotations)[0]["results"]
        assert Path(top[0]["path"]) == original
        assert top[0]["score"] == pytest.approx(plain["score"], abs=1e-5)
        assert len({r["id"] for r in top}) == len(top)  # no id twice
        assert [r["rank"] for r in top] == list(range(1, len(top) + 1))
        assert all(a["score"] >= b["score"] for a, b in zip(top, top[1:], strict=False))
    # Off, the fake model sees another thumbnail: the original scores clearly lower.
    off = search(coll, coll / "queries" / "turned90.png")[0]["results"]
    off_score = next(r["score"] for r in off if Path(r["path"]) == original)
    assert off_score < plain["score"] - 0.01
    # Turned the other way (270) needs the 90 degree turn back.
    top = search(coll, coll / "queries" / "turned270.png", rotations=ALL)[0]["results"][0]
    assert Path(top["path"]) == original and top["score"] == pytest.approx(1.0, abs=1e-5)


def test_merged_results_are_each_images_best_score(coll):
    """Every result's score is its best cosine over the four turned query vectors."""
    q = coll / "queries" / "other_turned180.png"
    merged = search(coll, q, rotations=ALL, k=8)[0]["results"]
    assert len(merged) == 8 and len({r["id"] for r in merged}) == 8
    per_angle = []
    for a in (0, 90, 180, 270):
        pixels = decode_file(str(q), 10**8, a).pixels[None]
        per_angle.append(fakes.FakeEmbedder().embed(pixels)[0])
    from pipeline.store.collection import reading

    c = reading(str(coll / "c.db"), str(coll / "idx"))
    try:
        stored = c.vectors(np.array([r["id"] for r in merged]))
    finally:
        c.close()
    best = (stored @ np.stack(per_angle).T).max(axis=1)
    np.testing.assert_allclose([r["score"] for r in merged], best, atol=1e-5)
    assert Path(merged[0]["path"]).name == "scene_1.png"


def test_best_over_keeps_each_ids_best_score_once():
    ids = np.array([[3, 1, 2, -1], [2, 3, 4, 5]])
    scores = np.array([[0.9, 0.5, 0.4, 0.0], [0.95, 0.8, 0.5, 0.1]], np.float32)
    got, got_scores = ranking.best_over(ids, scores, 3)
    assert got.tolist() == [2, 3, 1] and got_scores.tolist() == pytest.approx([0.95, 0.9, 0.5])
    got, _ = ranking.best_over(ids, scores, 10)
    assert got.tolist() == [2, 3, 1, 4, 5]  # ties (1 and 4 at 0.5) by id; -1 dropped
    merged, merged_scores = ranking.merge_variants(
        np.vstack([ids, [[7, -1, -1, -1]]]), np.vstack([scores, [[0.3, 0, 0, 0]]]), [2, 1]
    )
    assert merged.tolist() == [[2, 3, 1, 4], [7, -1, -1, -1]]
    assert merged_scores[1, 0] == pytest.approx(0.3)


def test_one_model_call_and_one_ranking_for_all_angles(coll, tmp_path, monkeypatch):
    log = tmp_path / "batches"
    monkeypatch.setattr(api.models, "cached_embedder", lambda *a: fakes.cached(*a, log=str(log)))
    calls = []
    real = ranking.ranked

    def counted(index, lookup, queries, *args, **kwargs):
        calls.append(len(queries))
        return real(index, lookup, queries, *args, **kwargs)

    monkeypatch.setattr(ranking, "ranked", counted)
    q = coll / "queries"
    answers = search(coll, q / "turned90.png", q / "turned270.png", 1, rotations=ALL)
    assert log.read_text().split() == ["8"]  # 2 images x 4 angles, one batch
    assert calls == [9]  # and the id's one stored vector, in one ranking
    assert [len(a["results"]) for a in answers] == [8, 8, 8]  # the whole catalog, once each


def test_id_queries_use_the_stored_vector(coll):
    assert search(coll, 1, rotations=ALL) == search(coll, 1)


def test_decoded_pixels_are_turned_as_the_square(coll):
    """Pixels (the web server's decoded uploads) are turned with np.rot90."""
    original = decode_file(str(coll / "imgs" / "scene_2.png"), 10**8).pixels
    s = api.settings_for(catalog=str(coll / "c.db"), index_dir=str(coll / "idx"))
    c = api.open_collection(s)
    try:
        q = api.Pixels("turned", np.rot90(original))
        on = api.search_in(c, [q], s.replace(rotations=ALL), lambda: fakes.FakeEmbedder())[0]
        off = api.search_in(c, [q], s, lambda: fakes.FakeEmbedder())[0]
    finally:
        c.close()
    assert Path(on["results"][0]["path"]).name == "scene_2.png"
    assert on["results"][0]["score"] == pytest.approx(1.0, abs=1e-5)
    assert off["results"][0]["score"] < 0.99


def test_decode_rotate_turns_before_the_crop(coll):
    turned = decode_file(str(coll / "queries" / "turned90.png"), 10**8, 270).pixels
    assert np.array_equal(turned, decode_file(str(coll / "imgs" / "scene_0.png"), 10**8).pixels)
    with pytest.raises(ValueError):
        decode_file(str(coll / "imgs" / "scene_0.png"), 10**8, 45)


@pytest.mark.parametrize("bad", ["45", "90", "0,90", "0,90,180,270,360", ""])
def test_bad_values_one_line(coll, bad):
    q = coll / "queries" / "turned90.png"
    assert_refused(cli("search", q, "--rotations", bad, *opts(coll)), "--rotations")
    assert_refused(cli("evaluate", "--leave-one-out", "--rotations", bad, *opts(coll)), "--rotations")  # fmt: skip


def test_bad_values_elsewhere(coll, tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text('rotations = "90"\n')
    r = cli("search", coll / "queries" / "turned90.png", "--config", toml, *opts(coll))
    assert_refused(r, "rotations must be one of 0, 0,90,180,270, 0,90,270", "'90'")
    with pytest.raises(CbirError, match="rotations must be"):
        search(coll, 1, rotations=90)
    assert specs.rotation_angles(ALL) == (0, 90, 180, 270)


def test_web_form_takes_rotations():
    from werkzeug.datastructures import MultiDict

    from pipeline.web import params

    chosen = params.from_form(MultiDict({"rotations": ALL}))
    assert chosen.settings(config.Settings()).rotations == ALL
    assert params.from_form(MultiDict({})).settings(config.Settings()).rotations == "0"
    with pytest.raises(CbirError, match="rotations"):
        params.from_form(MultiDict({"rotations": "45"}))


# --- evaluate --groundtruth --rotations --------------------------------------------------


def write_gt(path: Path, pairs: list[tuple[str, str]]) -> Path:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["query", "relevant"])
        w.writerows(pairs)
    return path


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> Path:
    """q.png and its relevant copy stored turned (sideways.png); near.png, a look-alike
    of q that is not relevant, outranks the sideways copy unless the query is turned."""
    root = tmp_path_factory.mktemp("rotbench")
    q = scene(10)
    save(q, root / "imgs" / "q.png")
    save(q, root / "imgs" / "sideways.png", 90)
    near = q.astype(int)
    near[:, :8] = 255 - near[:, :8]  # a stripe changed: similar, not the same
    save(np.clip(near, 0, 255).astype(np.uint8), root / "imgs" / "near.png")
    for i in range(5):
        save(scene(20 + i), root / "imgs" / f"other_{i}.png")
    save(scene(30), root / "imgs" / "q2.png")
    save(scene(30), root / "imgs" / "q2_copy.png")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(api.models, "cached_embedder", fakes.cached)
        # The paper's 224 crop: these tests turn decoded squares (the web server's path).
        assert cli("index", root / "imgs", *CLASSIC, *opts(root)).exit_code == 0
    write_gt(root / "gt.csv", [("q.png", "sideways.png"), ("q2.png", "q2_copy.png")])
    return root


def test_evaluate_groundtruth_with_rotations(bench):
    r = cli("evaluate", "--groundtruth", bench / "gt.csv", "--json", *opts(bench))
    assert r.exit_code == 0, r.output
    off = json.loads(r.stdout)
    r = cli("evaluate", "--groundtruth", bench / "gt.csv", "--rotations", ALL, "--json", *opts(bench))  # fmt: skip
    assert r.exit_code == 0, r.output
    on = json.loads(r.stdout)
    assert off["rotations"] == "0" and on["rotations"] == ALL
    q_off, q2_off = off["per_query"]
    q_on, q2_on = on["per_query"]
    assert q_off["ap"] < 1.0 and q_off["relevant"][0]["rank"] > 1  # near.png comes first
    assert q_on["ap"] == 1.0 and q_on["relevant"][0]["rank"] == 1
    assert q2_on["ap"] == q2_off["ap"] == 1.0
    assert on["map"] >= off["map"] and on["map"] == 1.0
    assert on["database"] == off["database"] == 10


def test_evaluate_rotations_excludes_the_query(bench):
    result = pipeline.evaluate(
        groundtruth=str(bench / "gt.csv"), rotations=ALL,
        catalog=str(bench / "c.db"), index_dir=str(bench / "idx"),
    )  # fmt: skip
    for q in result["per_query"]:
        top = [t["id"] for t in q["top10"]]
        assert q["id"] not in top and len(top) == len(set(top)) == 9
    r = cli("evaluate", "--groundtruth", bench / "gt.csv", "--rotations", ALL, *opts(bench))
    assert r.exit_code == 0 and "rotations 0,90,180,270" in r.stdout.splitlines()[0]


def test_evaluate_rotations_refusals(bench):
    gt = bench / "gt.csv"
    r = cli("evaluate", "--groundtruth", gt, "--rotations", ALL, "--method", "color", *opts(bench))
    assert_refused(r, "--method resnet50")
    assert_refused(cli("evaluate", "--leave-one-out", "--rotations", ALL, *opts(bench)), "--groundtruth")  # fmt: skip
