"""`--rerank verify` wired into search: the Python API, `cbir search` and the web API.

Fast tier, fake model, real SIFT on real files. The collection: a textured picture
(a/orig.png, also the query file), a warped and darkened copy of it (a/warp.png), five
decoys with the picture's colours in blocks but none of its texture (a/d*.png: the fake
model's cosine ranks them above the copy) and six unrelated textured pictures (b/).
Verification must move the copy up to just below the picture itself.
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
import pipeline
from fakes import assert_refused, cli, ok, opts
from pipeline import api
from pipeline.errors import CbirError

W, H = 400, 300
# 8 degrees of rotation, 0.9x scale, a shift and a little perspective.
_A = np.deg2rad(8)
WARP = np.array(
    [[0.9 * np.cos(_A), -0.9 * np.sin(_A), 40.0], [0.9 * np.sin(_A), 0.9 * np.cos(_A), 10.0],
     [2e-4, 1e-4, 1.0]]
)  # fmt: skip


def textured(seed: int) -> np.ndarray:
    """An RGB picture full of corners and blobs at many scales (SIFT finds hundreds)."""
    rng = np.random.default_rng(seed)
    img = np.full((H, W, 3), 128, np.uint8)
    for _ in range(140):
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        x, y, r = int(rng.integers(0, W)), int(rng.integers(0, H)), int(rng.integers(3, 25))
        if rng.random() < 0.5:
            cv2.circle(img, (x, y), r, colour, -1)
        else:
            cv2.rectangle(img, (x, y), (x + r, y + int(rng.integers(3, 25))), colour, -1)
    return cv2.GaussianBlur(img, (3, 3), 0)


def build(root: Path) -> Path:
    """The collection of the module's docstring under root/imgs; returns the query file."""
    a, b = root / "imgs" / "a", root / "imgs" / "b"
    a.mkdir(parents=True)
    b.mkdir(parents=True)
    base = textured(1)
    Image.fromarray(base).save(a / "orig.png")
    warped = cv2.warpPerspective(base, WARP, (W, H)).astype(np.float32) * 0.35 + 5
    Image.fromarray(warped.astype(np.uint8)).save(a / "warp.png")
    rng = np.random.default_rng(0)
    blocks = cv2.resize(cv2.resize(base, (16, 12), interpolation=cv2.INTER_AREA), (W, H),
                        interpolation=cv2.INTER_NEAREST)  # fmt: skip
    for d in range(5):
        noisy = blocks.astype(int) + rng.integers(-20, 21, blocks.shape)
        Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(a / f"d{d}.png")
    for s in range(2, 8):
        Image.fromarray(textured(s)).save(b / f"t{s}.png")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(api.models, "cached_embedder", fakes.cached)
        ok(cli("index", root / "imgs", *opts(root)))
    return a / "orig.png"


@pytest.fixture(scope="module")
def coll(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("verify")
    query = build(root)
    return {"root": root, "query": str(query), "warp": str(query.with_name("warp.png")),
            "options": {"catalog": str(root / "c.db"), "index_dir": str(root / "idx")}}  # fmt: skip


@pytest.fixture(autouse=True)
def fake_model(monkeypatch):
    monkeypatch.setattr(api.models, "cached_embedder", fakes.cached)


def search(coll, query=None, **options) -> dict:
    return pipeline.search(query or coll["query"], **coll["options"], **options)[0]


def names(answer) -> list[str]:
    return [Path(r["path"]).name for r in answer["results"]]


def test_verify_moves_a_warped_copy_from_below_k_into_the_top(coll):
    plain = search(coll, k=12)
    assert names(plain)[0] == "orig.png" and names(plain).index("warp.png") >= 5  # decoys first
    cosines = {r["id"]: r["score"] for r in plain["results"]}
    got = search(coll, k=3, rerank="verify")
    assert names(got)[:2] == ["orig.png", "warp.png"] and len(got["results"]) == 3
    assert [r["rank"] for r in got["results"]] == [1, 2, 3]
    for r in got["results"]:  # scores stay the first pass's cosines; each checked
        assert r["score"] == cosines[r["id"]] and isinstance(r["inliers"], int)
    assert got["results"][1]["verified"] and got["results"][1]["inliers"] > 12
    assert "notices" not in got


def test_only_the_top_n_is_verified_the_rest_keeps_its_order(coll):
    plain = search(coll, k=12)
    got = search(coll, k=12, rerank="verify", verify_n=3)
    first = [r["id"] for r in plain["results"]]
    ids = [r["id"] for r in got["results"]]
    assert sorted(ids[:3]) == sorted(first[:3]) and ids[3:] == first[3:]
    assert all("inliers" in r for r in got["results"][:3])
    assert not any("inliers" in r or "verified" in r for r in got["results"][3:])
    assert names(got).index("warp.png") == names(plain).index("warp.png")  # not checked


def test_verify_after_dba_and_with_a_filter(coll):
    got = search(coll, k=3, rerank="verify+dba", shortlist=20)
    assert names(got)[:2] == ["orig.png", "warp.png"]
    folder = str(Path(coll["query"]).parent)
    got = search(coll, k=4, rerank="verify", under=folder)
    assert names(got)[:2] == ["orig.png", "warp.png"]
    assert all(r["path"].startswith(folder + "/") for r in got["results"])
    assert got["filter"]["matching"] == 7
    turned = search(coll, k=3, rerank="verify", rotations="0,90,180,270")  # after the merge
    assert names(turned)[:2] == ["orig.png", "warp.png"]
    cut = search(coll, k=12, rerank="verify", min_score=0.9)  # min_score cuts by cosine
    assert "warp.png" not in names(cut) and all(r["score"] >= 0.9 for r in cut["results"])


def test_an_id_query_is_verified_from_its_file(coll):
    qid = search(coll)["results"][0]["id"]  # orig.png's id
    by_file = search(coll, k=3, rerank="verify")
    by_id = search(coll, qid, k=3, rerank="verify")
    assert by_id["query_id"] == qid and names(by_id)[:2] == ["orig.png", "warp.png"]
    assert [r["inliers"] for r in by_id["results"]] == [r["inliers"] for r in by_file["results"]]


def test_cli_search_rerank_verify_shows_matches(coll):
    out = ok(cli("search", coll["query"], "-k", "3", "--rerank", "dba+verify", "--verify-n", "20",
                 *opts(coll["root"])))  # fmt: skip
    lines = out.splitlines()
    assert "warp.png" in lines[3] and "matches)" in lines[3]
    got = json.loads(ok(cli("search", coll["query"], "-k", "3", "--rerank", "verify", "--json",
                            *opts(coll["root"]))))  # fmt: skip
    assert got["results"][1]["path"] == coll["warp"] and got["results"][1]["verified"]


@pytest.mark.parametrize("value", ["0", "-1", "1001", "99999999999999999999", "x", "nan"])
def test_hostile_verify_n_is_refused_in_one_line(coll, value):
    assert_refused(
        cli(
            "search", coll["query"], "--rerank", "verify", "--verify-n", value, *opts(coll["root"])
        ),
        "verify",
    )


@pytest.mark.parametrize("options", [{"verify_n": 0}, {"verify_n": "x"}, {"verify_n": True},
                                     {"verify_n": 10**6}, {"rerank": "verify+foo"}])  # fmt: skip
def test_hostile_api_values_are_refused(coll, options):
    with pytest.raises(CbirError) as e:
        search(coll, **{"rerank": "verify", **options})
    assert "\n" not in str(e.value)


def test_verify_alone_needs_no_shortlist_but_dba_does(coll):
    assert len(search(coll, k=12, rerank="verify", shortlist=5)["results"]) == 12
    with pytest.raises(CbirError, match="shortlist"):
        search(coll, k=12, rerank="dba+verify", shortlist=5)


def test_a_file_changed_since_indexing_gives_a_notice_not_a_crash(tmp_path):
    query = build(tmp_path)
    warp = query.with_name("warp.png")
    Image.fromarray(textured(99)).save(warp)  # another picture under the indexed name
    options = {"catalog": str(tmp_path / "c.db"), "index_dir": str(tmp_path / "idx")}
    got = pipeline.search(str(query), k=12, rerank="verify", allow_stale=True, **options)[0]
    assert any(str(warp) in line and "changed" in line for line in got["notices"])
    row = next(r for r in got["results"] if r["path"] == str(warp))
    assert "inliers" not in row  # not verified: it keeps its cosine and its place
    for f in (tmp_path / "imgs" / "b").iterdir():  # undecodable files: notices too, no crash
        f.write_bytes(b"not an image any more")
    got = pipeline.search(str(query), k=12, rerank="verify", **options)[0]
    assert sum("not verified" in line for line in got["notices"]) >= 6
    truth = tmp_path / "gt.csv"
    truth.write_text("query,relevant\norig.png,warp.png\n")
    with pytest.raises(CbirError, match="cannot check every candidate"):  # not a wrong figure
        api.evaluate(groundtruth=str(truth), rerank="verify", **options)


def test_web_upload_is_verified_from_its_own_bytes(coll):
    pytest.importorskip("flask")
    from pipeline.web import server

    app = server.open_app(api.settings_for(**coll["options"]), thumbs_dir=coll["root"] / "th")
    client = app.test_client()
    data = Path(coll["query"]).read_bytes()
    r = client.post("/api/search", data={"image": (io.BytesIO(data), "q.png"), "k": "3",
                                         "rerank": "verify"})  # fmt: skip
    assert r.status_code == 200, r.get_data(as_text=True)
    answer = r.get_json()
    want = search(coll, k=3, rerank="verify")
    assert names(answer) == names(want)[:3]
    # the upload's own pixels, not the model's 224 x 224 input: the same matches as the file
    assert [x["inliers"] for x in answer["results"]] == [x["inliers"] for x in want["results"]]
    page = client.post("/search", data={"image": (io.BytesIO(data), "q.png"), "k": "3",
                                        "rerank": "verify"}).get_data(as_text=True)  # fmt: skip
    assert page.count('class="verified"') >= 2 and "matches</span>" in page
    assert '<option value="dba+verify">' in client.get("/").get_data(as_text=True)
    for body in ({"rerank": "verify+x"}, {"rerank": "verify", "verify_n": 0},
                 {"verify_n": "x"}, {"verify_n": 10**30},
                 {"rerank": "verify", "verify_n": 201}):  # more than a server verifies  # fmt: skip
        bad = client.post("/api/search", json={"id": 0, **body})
        assert bad.status_code == 400 and "\n" not in bad.get_json()["error"], body
    some = client.post("/api/search", json={"id": 0, "k": 12, "rerank": "verify", "verify_n": 3})
    assert ["inliers" in x for x in some.get_json()["results"]] == [True] * 3 + [False] * 9


def test_evaluate_measures_the_same_verification_as_search(coll, tmp_path):
    truth = tmp_path / "gt.csv"
    truth.write_text("query,relevant\norig.png,warp.png\n")
    plain = api.evaluate(groundtruth=str(truth), **coll["options"])
    got = api.evaluate(groundtruth=str(truth), rerank="verify", verify_n=12, **coll["options"])
    assert plain["map"] < 0.3 and got["map"] == 1.0  # the copy: rank 5+ -> rank 1 of the others
    assert got["rerank"] == "verify" and got["verify_n"] == 12
    # leave-one-out over labels: the same code, the query an indexed id
    loo = api.evaluate(leave_one_out=True, rerank="verify", verify_n=12, **coll["options"])
    assert loo["rerank"] == "verify" and loo["queries"] == 13
    folder = str(coll["root"] / "imgs")  # labelled query files: each verified from its file
    held = api.evaluate(folder, rerank="verify", verify_n=12, **coll["options"])
    assert held["protocol"] == f"held-out queries from {folder}" and held["queries"] == 13
    assert held["per_query"][0]["top10"][0]["score"] > 0.99  # its own file, a cosine
