"""The "why this match" routes (pipeline/web/explain_routes.py), fast tier, fake model:
JSON, PNGs and the page for an id query and for an upload's carried query, the links
and the switch on the results pages, and hostile parameters (one-line 400/404).
The same page in headless Chromium: tests/web/test_explain_browser.py.
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest
from PIL import Image

import fakes

pytest.importorskip("flask")


def open_app(options: dict, **kwargs):
    from pipeline import api
    from pipeline.web import server as serve

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(api.models, "cached_embedder", fakes.cached)
        return serve.open_app(api.settings_for(**options), **kwargs)


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> dict:
    from pipeline import api

    tmp = tmp_path_factory.mktemp("explain-web")
    fakes.make_images(tmp / "imgs" / "other", 8, seed=5)
    fakes.warped_pair(tmp / "imgs")
    options = {"catalog": str(tmp / "c.db"), "index_dir": str(tmp / "idx")}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(api.models, "cached_embedder", fakes.cached)
        api.index([str(tmp / "imgs")], **options)
    app = open_app(options, thumbs_dir=tmp / "thumbs")
    import sqlite3

    con = sqlite3.connect(options["catalog"])
    ids = {Path(p).name: i for i, p in con.execute("select id, path from images")}
    con.close()
    return {"client": app.test_client(), "ids": ids, "tmp": tmp}


def one_line(r, code: int) -> str:
    assert r.status_code == code, r.get_data(as_text=True)[:300]
    body = r.get_data(as_text=True)
    message = json.loads(body)["error"] if r.is_json else body
    assert "Traceback" not in body
    if r.is_json:
        assert "\n" not in message
    return message


def test_api_explain_by_id(served):
    ids = served["ids"]
    r = served["client"].get(f"/api/explain?query={ids['original.png']}&id={ids['warped.png']}")
    assert r.status_code == 200
    d = r.get_json()
    assert d["query_id"] == ids["original.png"] and d["result"]["id"] == ids["warped.png"]
    assert d["verification"]["verified"] and len(d["verification"]["region"]) == 4
    assert d["heat"]["rows"] == 7 and len(d["heat"]["values"]) == 7


@pytest.mark.parametrize("kind, mode", [("matches", "RGB"), ("heat", "RGB"), ("overlay", "RGBA")])
def test_explain_png(served, kind, mode):
    ids = served["ids"]
    url = f"/explain.png?query={ids['original.png']}&id={ids['warped.png']}&kind={kind}"
    r = served["client"].get(url)
    assert r.status_code == 200 and r.mimetype == "image/png"
    im = Image.open(io.BytesIO(r.data))
    assert im.format == "PNG" and im.mode == mode and im.height <= 480 + 22


def test_the_id_results_page_links_and_the_page_renders(served):
    ids, client = served["ids"], served["client"]
    html = client.get(f"/image/{ids['original.png']}").get_data(as_text=True)
    assert 'id="heat-overlays"' in html
    links = re.findall(r'href="(/explain\?query=\d+&amp;id=\d+)"', html)
    assert len(links) == 10
    page = client.get(links[0].replace("&amp;", "&"))
    assert page.status_code == 200
    text = page.get_data(as_text=True)
    assert "Why this match" in text and 'id="heat-toggle"' in text
    assert text.count("data:image/png;base64,") == 3


def test_an_uploads_page_posts_its_carried_query(served):
    ids, client = served["ids"], served["client"]
    data = (served["tmp"] / "imgs" / "original.png").read_bytes()
    html = client.post(
        "/search", data={"image": (io.BytesIO(data), "q.png")}, content_type="multipart/form-data"
    ).get_data(as_text=True)
    assert 'formaction="/explain"' in html and 'id="heat-overlays"' in html
    form = {
        name: re.search(rf'name="{name}" value="([^"]*)"', html).group(1)
        for name in ("query_name", "query_png", "query_thumb")
    }
    r = client.post("/api/explain", data={**form, "id": str(ids["warped.png"])})
    assert r.status_code == 200 and r.get_json()["query"] == "q.png"
    assert r.get_json()["verification"]["inliers"] > 0  # the carried copy is small: fewer
    page = client.post("/explain", data={**form, "id": str(ids["warped.png"])})
    assert page.status_code == 200 and "Why this match" in page.get_data(as_text=True)
    r = client.post("/explain.png", data={**form, "id": str(ids["warped.png"]), "kind": "overlay"})
    assert r.status_code == 200 and Image.open(io.BytesIO(r.data)).mode == "RGBA"
    upload = {"image": (io.BytesIO(data), "up.png"), "id": str(ids["warped.png"])}
    r = client.post("/api/explain", data=upload, content_type="multipart/form-data")
    assert r.status_code == 200 and r.get_json()["verification"]["verified"]


@pytest.mark.parametrize(
    "query, code, words",
    [
        ("id=1", 400, "give id="),
        ("query=1", 400, "give id="),
        ("query=abc&id=1", 400, "query must be a catalog id"),
        ("query=1&id=-3", 400, "id must be a catalog id"),
        ("query=1&id=99999999999999999999", 400, "id must be a catalog id"),
        ("query=1&id=%D9%A3", 400, "id must be a catalog id"),
        ("query=1&id=999999", 404, "no indexed image"),
        ("query=999999&id=1", 404, "no indexed image"),
        ("query=1&id=1&kind=../x", 400, "kind must be"),
    ],
)
def test_hostile_parameters_are_refused_in_one_line(served, query, code, words):
    base = "/explain.png" if "kind" in query else "/api/explain"
    message = one_line(served["client"].get(f"{base}?{query}"), code)
    assert words in message and str(served["tmp"]) not in message


def test_bad_carried_query_and_upload_are_400(served):
    ids, client = served["ids"], served["client"]
    r = client.post("/api/explain", data={"query_png": "!!", "id": str(ids["warped.png"])})
    assert "not base64" in one_line(r, 400)
    bad = {"image": (io.BytesIO(b"not an image"), "x.jpg"), "id": str(ids["warped.png"])}
    r = client.post("/api/explain", data=bad, content_type="multipart/form-data")
    assert "cannot use query image" in one_line(r, 400)
    html = client.get("/explain?query=abc&id=1")
    assert html.status_code == 400 and "query must be a catalog id" in html.get_data(as_text=True)
