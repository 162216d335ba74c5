"""`api.explain` and its pictures (issue 21, "Why this match"), fast tier, fake model.

A textured picture and a copy warped by a known homography, among a few other images:
the explanation of the copy for the picture verifies it (inliers above the floor), its
region lies on the warped corners, the heat map has the feature map's shape, and the
pictures decode at the sizes they state. Then `cbir search --explain DIR`.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

import fakes
from fakes import assert_refused, cli, ok, opts
from pipeline import api
from pipeline.api import explain_pictures, explaining
from pipeline.errors import CbirError

H = fakes.WARP
W, HT = 360, 270


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("explain")
    imgs = root / "imgs"
    fakes.make_images(imgs / "other", 8, seed=3)
    fakes.warped_pair(imgs, (W, HT))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(api.models, "cached_embedder", fakes.cached)
        ok(cli("index", imgs, *opts(root)))
    return root


def options(root: Path) -> dict:
    return {"catalog": str(root / "c.db"), "index_dir": str(root / "idx")}


def id_of(root: Path, name: str) -> int:
    import sqlite3

    con = sqlite3.connect(root / "c.db")
    (i,) = con.execute("select id from images where path like ?", [f"%/{name}"]).fetchone()
    con.close()
    return i


@pytest.fixture
def fake_model(monkeypatch):
    monkeypatch.setattr(api.models, "cached_embedder", fakes.cached)


def explained(root: Path, query) -> explaining.Explanation:
    s = api.settings_for(**options(root))
    coll = api.models.open_collection(s)
    try:
        emb = api.models.embedder_for(s, coll)
        return explaining.explanation_in(coll, query, id_of(root, "warped.png"), s, lambda: emb)
    finally:
        coll.close()


def test_the_warped_copy_is_verified_and_located(root, fake_model):
    e = explained(root, str(root / "imgs" / "original.png"))
    d = e.data
    assert json.loads(json.dumps(d)) == d  # JSON-able as it is
    assert d["query_id"] is None and d["result"]["id"] == id_of(root, "warped.png")
    assert -1.0001 <= d["cosine"] <= 1.0001
    v = d["verification"]
    assert v["verified"] and v["inliers"] > v["floor"] and v["inliers"] == len(v["inlier_pairs"])
    assert len(v["rejected_pairs"]) <= explaining.MAX_REJECTED
    assert v["query_size"] == [W, HT] and v["result_size"] == [W, HT]
    # The homography maps the query's corners where the known warp puts them.
    corners = np.float32([[0, 0], [W, 0], [W, HT], [0, HT]]).reshape(-1, 1, 2)
    truth = cv2.perspectiveTransform(corners, H).reshape(-1, 2)
    assert np.abs(np.array(v["region"]) - truth).max() < 6.0, (v["region"], truth)
    for qx, qy, rx, ry in v["inlier_pairs"]:  # each inlier pair agrees with the true warp
        p = cv2.perspectiveTransform(np.float32([[[qx, qy]]]), H)[0, 0]
        assert np.hypot(p[0] - rx, p[1] - ry) < 8
    heat = d["heat"]
    assert (heat["rows"], heat["cols"]) == (7, 7) and heat["area"] == [0, 0, W, HT]
    values, raw = np.array(heat["values"]), np.array(heat["raw"])
    assert values.shape == raw.shape == (7, 7) and np.isfinite(raw).all()
    assert values.min() == 0.0 and values.max() == 1.0 and (np.abs(raw) <= 1.0001).all()


def test_an_id_query_and_an_upload_give_the_same_matches(root, fake_model):
    original = root / "imgs" / "original.png"
    by_id = api.explain(id_of(root, "original.png"), id_of(root, "warped.png"), **options(root))
    upload = api.Upload("q.png", original.read_bytes())
    by_bytes = api.explain(upload, id_of(root, "warped.png"), **options(root))
    assert by_id["query_id"] == id_of(root, "original.png") and by_bytes["query"] == "q.png"
    assert by_id["verification"] == by_bytes["verification"]
    assert by_id["cosine"] == pytest.approx(by_bytes["cosine"], abs=1e-5)


def test_an_unrelated_result_is_not_verified(root, fake_model):
    other = sorted((root / "imgs" / "other").rglob("*.jpg"))[0]
    d = api.explain(str(other), id_of(root, "warped.png"), **options(root))
    assert (
        not d["verification"]["verified"]
        and d["verification"]["region"] is None
        or (d["verification"]["inliers"] <= d["verification"]["floor"])
    )


def test_the_pictures_decode_at_their_sizes(root, fake_model):
    e = explained(root, str(root / "imgs" / "original.png"))
    matches = Image.open(io.BytesIO(explain_pictures.render_matches(e, height=200)))
    assert matches.format == "PNG" and matches.height == 200 + 22
    assert matches.width == 2 * round(W * 200 / HT) + explain_pictures.GAP
    heat = Image.open(io.BytesIO(explain_pictures.render_heatmap(e, height=200)))
    assert heat.size == (round(W * 200 / HT), 200) and heat.mode == "RGB"
    overlay = Image.open(io.BytesIO(explain_pictures.render_heatmap(e, overlay_only=True)))
    assert overlay.mode == "RGBA" and overlay.size == (W, HT)
    assert 0 < np.asarray(overlay)[..., 3].max() < 255  # see-through


@pytest.mark.parametrize(
    "query, image_id, words",
    [
        (-1, "warped", "id"),
        (10**6, "warped", "no indexed image"),
        ("original", 10**6, "no indexed image"),
        ("nowhere.jpg", "warped", "not found"),
        ("imgs", "warped", "folder"),
    ],
)
def test_bad_queries_and_ids_are_refused_in_one_line(root, fake_model, query, image_id, words):
    query = {"original": str(root / "imgs" / "original.png"), "imgs": str(root / "imgs")}.get(
        query, query
    )
    image_id = id_of(root, "warped.png") if image_id == "warped" else image_id
    with pytest.raises(CbirError) as e:
        api.explain(query, image_id, **options(root))
    assert words in str(e.value) and "\n" not in str(e.value)


def test_an_undecodable_upload_is_refused(root, fake_model):
    with pytest.raises(CbirError, match="cannot use query image"):
        api.explain(
            api.Upload("x.jpg", b"not an image"), id_of(root, "warped.png"), **options(root)
        )


def test_cli_search_explain_writes_the_pictures(root, tmp_path, fake_model):
    out = tmp_path / "why"
    ok(cli("search", root / "imgs" / "original.png", "-k", "3", "--explain", out, *opts(root)))
    files = sorted(p.name for p in (out / "original").iterdir())
    assert len(files) == 9, files  # per result: matches.png, heat.png, .json
    first = json.loads(
        (out / "original" / [f for f in files if f.endswith(".json")][0]).read_text()
    )
    assert first["result"]["id"] == id_of(root, "original.png")  # itself, rank 1
    for f in files:
        if f.endswith(".png"):
            Image.open(out / "original" / f).verify()


def test_cli_explain_refuses_a_bad_folder_before_work(root, tmp_path, fake_model):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    r = cli("search", root / "imgs" / "original.png", "--explain", blocker, *opts(root))
    assert_refused(r, "explain")


def test_a_result_whose_file_changed_is_not_explained(tmp_path, fake_model):
    """Its pixels are no longer the indexed image's: no matches, no heat map, a note."""
    fakes.warped_pair(tmp_path / "imgs", (160, 120))
    ok(cli("index", tmp_path / "imgs", *opts(tmp_path)))
    Image.new("RGB", (160, 120), "red").save(tmp_path / "imgs" / "warped.png")
    d = api.explain(str(tmp_path / "imgs" / "original.png"), 1, **options(tmp_path))
    assert d["result"]["path"].endswith("warped.png")
    assert d["verification"] is None and d["heat"] is None
    assert "changed since it was indexed" in d["note"]


def test_an_id_query_whose_file_changed_is_refused(tmp_path, fake_model):
    """An id query explains with its stored vector and its file's features: a file changed
    since indexing would explain another picture's matches under this image's cosine."""
    fakes.warped_pair(tmp_path / "imgs", (160, 120))
    ok(cli("index", tmp_path / "imgs", *opts(tmp_path)))
    query = id_of(tmp_path, "original.png")
    Image.new("RGB", (160, 120), "blue").save(tmp_path / "imgs" / "original.png")
    with pytest.raises(CbirError, match="changed since it was indexed") as e:
        api.explain(query, id_of(tmp_path, "warped.png"), **options(tmp_path))
    assert "\n" not in str(e.value)


def test_an_uploaded_query_is_embedded_once_for_all_its_heat_maps(root, fake_model):
    """A results page asks for one heat map per result: the upload's vector is kept."""
    s = api.settings_for(**options(root))
    coll = api.models.open_collection(s)
    try:
        inner, calls = api.models.embedder_for(s, coll), []

        class Counting:
            def embed(self, pixels):
                calls.append(len(pixels))
                return inner.embed(pixels)

            def __getattr__(self, name):
                return getattr(inner, name)

        upload = api.Upload("q.png", (root / "imgs" / "original.png").read_bytes())
        for image_id in (id_of(root, "warped.png"), id_of(root, "original.png")) * 2:
            e = explaining.explanation_in(coll, upload, image_id, s, Counting, matches=False)
            assert e.data["heat"] is not None
        assert calls == [1]
    finally:
        coll.close()
