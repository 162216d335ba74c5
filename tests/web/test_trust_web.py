"""Issue 17 on the web server, with the fake model: the login's `next` never leaves this
server (item 9), thumbnails load when the server is started as the README says, `cd coll
&& cbir serve` with the relative default catalog (item 10), and integer parameters written
in other digits are a one-line 400, not a 500 or another number (item 11)."""

from __future__ import annotations

import html
import io
import json
import re
import urllib.request
from pathlib import Path
from urllib.parse import quote

import pytest

import fakes

pytest.importorskip("flask")

TOKEN = "tok-17"
N_IMAGES = 12


@pytest.fixture(scope="module")
def collection(tmp_path_factory) -> Path:
    """A folder holding photos/ and, under the default names, catalog.db and index/."""
    import pipeline
    import pipeline.api

    coll = tmp_path_factory.mktemp("trust-web") / "coll"
    fakes.make_images(coll / "photos", N_IMAGES)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pipeline.api.models, "cached_embedder", fakes.cached)
        mp.chdir(coll)
        assert pipeline.index(["photos"]).indexed == N_IMAGES  # catalog.db, index: the defaults
        pipeline.build_index("flat2", factory="Flat")  # index/, loaded on its first request
    return coll


def opened_in(folder: Path, **kwargs):
    """The app as `cd FOLDER && cbir serve` opens it (no path given); the working directory
    is back where it was before any request."""
    import pipeline.api
    from pipeline import api
    from pipeline.web import server as serve

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pipeline.api.models, "cached_embedder", fakes.cached)
        mp.chdir(folder)
        return serve.open_app(api.settings_for(), **kwargs)


@pytest.fixture(scope="module")
def client(collection):
    return opened_in(collection).test_client()


@pytest.fixture(scope="module")
def guarded_app(collection):
    return opened_in(collection, token=TOKEN)


@pytest.fixture
def guarded(guarded_app):
    return guarded_app.test_client()  # a new one each test: no login cookie yet


# ---- item 9: `next` after logging in -------------------------------------------------------

# Each as the form field arrives (already form-decoded); each must become "/".
BYPASSES = [
    "//evil.example", "//evil.example/x", "///evil.example", "////evil.example",
    "/\\evil.example", "\\\\evil.example", "/\\/evil.example", "\\/evil.example",
    "/%5Cevil.example", "/%5cevil.example", "/%2F/evil.example", "/%2Fevil.example",
    "%2F%2Fevil.example", "/%2F%2Fevil.example", "/%252F%252Fevil.example", "/%25252F/x",
    "https://evil.example", "http:evil.example", "HTTPS://evil.example/", "//good@evil.example",
    "javascript:alert(1)", "JaVaScRiPt:alert(1)", " javascript:alert(1)", "data:text/html,x",
    "/\t/evil.example", "/\n/evil.example", "/\r\n/evil.example", "\t//evil.example",
    "/%09/evil.example", "/%0d%0a/evil.example", "/x\r\nSet-Cookie: a=b", "/\x00/evil.example",
    "/ /evil.example", "/\uff0fevil.example", "/\uff3cevil.example", "/%EF%BC%8Fevil.example",
    "/%EF%BC%BCevil.example", "/\u2215evil.example", "/\u2044evil.example", "\uff0f\uff0fevil",
    "/.//evil.example", "/..//evil.example", "/%2E//evil.example", "/%2e%2e//evil.example",
    "/./%2F/evil.example", "/%25252525252525252F%25252525252525252Fevil.example",
    "/%" + "25" * 5000 + "2F", "evil.example", "image/3", "", "/" + "a" * 20_000,
]  # fmt: skip
# Paths of this server: each must come back exactly.
GOOD = [
    "/", "/image/3?k=5", "/image/3?k=5&rerank=dba&relevant=4,7", "/?label=red&page=2",
    "/image/4/full", "/thumb/2", "/?label=caf%C3%A9", "/image/3?k=5#results",
    "/?label=a%2Fb", "/image/3?next=//evil.example",
]  # fmt: skip


def form_next(page: str) -> str:
    """The `next` the login form would send back."""
    (value,) = re.findall(r'<input type="hidden" name="next" value="([^"]*)">', page)
    return html.unescape(value)


@pytest.mark.parametrize("target", BYPASSES + GOOD)
def test_login_goes_back_only_to_a_path_of_this_server(guarded, client, target):
    want = target if target in GOOD else "/"
    r = guarded.post("/login", data={"token": TOKEN, "next": target})
    assert r.status_code == 303 and r.headers["Location"] == want, r.headers["Location"]
    r = guarded.post("/login", data={"token": "wrong", "next": target})
    assert r.status_code == 401 and form_next(r.get_data(as_text=True)) == want
    r = guarded.get("/login?next=" + quote(target, safe=""))
    assert r.status_code == 200 and form_next(r.get_data(as_text=True)) == want
    r = client.post("/login", data={"next": target})  # no token needed: straight back
    assert r.status_code == 303 and r.headers["Location"] == want


def test_the_login_page_of_a_guarded_page_goes_back_to_it(guarded):
    page = guarded.get("/image/3?k=5&relevant=4").get_data(as_text=True)
    assert form_next(page) == "/image/3?k=5&relevant=4"


# ---- item 10: thumbnails with the relative default catalog ---------------------------------


def thumb_urls(page: str) -> list[str]:
    return re.findall(r'src="(/thumb/\d+)"', page)


def check_jpeg(data: bytes) -> None:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        assert im.format == "JPEG" and min(im.size) > 0


def test_thumbnails_of_the_relative_default_catalog(client, collection):
    """Opened in the collection's folder, then asked from another one: every thumbnail is
    made beside the catalog (catalog.thumbs/), not looked for in the package's folder."""
    urls = thumb_urls(client.get("/").get_data(as_text=True))
    assert len(urls) == N_IMAGES
    for url in urls:
        r = client.get(url)
        assert r.status_code == 200 and r.mimetype == "image/jpeg", (url, r.status_code)
        check_jpeg(r.get_data())
    assert len(list((collection / "catalog.thumbs").glob("*.jpg"))) == N_IMAGES


def test_an_index_first_asked_for_after_start_up(client):
    """The index folder, too, is where it was when the server started."""
    exact = client.post("/api/search", json={"id": 1, "k": 3})
    flat = client.post("/api/search", json={"id": 1, "k": 3, "index": "flat2"})
    assert exact.status_code == 200 and flat.status_code == 200, flat.get_data(as_text=True)
    assert [r["id"] for r in flat.get_json()["results"]] == [
        r["id"] for r in exact.get_json()["results"]
    ]


def test_thumbnails_through_cbir_serve_started_as_the_readme_says(collection, tmp_path):
    with fakes.served(collection, tmp_path / "serve.log") as url:
        with urllib.request.urlopen(url + "/", timeout=30) as r:
            urls = thumb_urls(r.read().decode())
        assert len(urls) == N_IMAGES
        for path in urls[:4]:
            with urllib.request.urlopen(url + path, timeout=30) as r:
                assert r.status == 200 and r.headers["Content-Type"] == "image/jpeg"
                check_jpeg(r.read())


# ---- item 11: integers in other digits -----------------------------------------------------

OTHER_DIGITS = ["²", "٣", "５", "𝟓", "¹⁰", "1²", "1_0", "9" * 5000]


@pytest.mark.parametrize("value", OTHER_DIGITS)
@pytest.mark.parametrize("key", ["k", "shortlist", "relevant", "not_relevant"])
def test_integer_parameters_in_other_digits_are_a_one_line_400(client, key, value):
    r = client.get(f"/image/1?{key}={quote(value)}")
    page = r.get_data(as_text=True)
    assert r.status_code == 400 and 'id="error"' in page, (r.status_code, page[-300:])
    assert "Traceback" not in page and "internal error" not in page
    sent = [value] if key in ("relevant", "not_relevant") else value
    r = client.post("/api/search", json={"id": 1, key: sent})
    body = r.get_data(as_text=True).strip()
    assert r.status_code == 400 and "\n" not in body, body[:300]
    assert key in json.loads(body)["error"]


@pytest.mark.parametrize("url", ["/image/٣", "/image/%D9%A3", "/thumb/３", "/image/٣/full"])
def test_ids_in_urls_are_ascii_digits(client, url):
    assert client.get(url).status_code == 404


def test_ascii_integers_still_work(client):
    for k in ("5", " 5 ", "05"):
        r = client.post("/api/search", json={"id": 1, "k": k, "shortlist": "20"})
        assert r.status_code == 200 and len(r.get_json()["results"]) == 5
    assert client.get("/image/1?k=5&relevant=2,3&not_relevant=4").status_code == 200
    assert client.get("/image/1/full").status_code == 200


def test_an_original_swapped_for_a_fifo_is_a_404_not_a_hung_worker(tmp_path):
    """/image/ID/full opens the file without blocking and checks it on the descriptor: a photo
    replaced by a FIFO after indexing (no writer ever comes) answers 404 at once."""
    import os
    import threading

    coll = tmp_path / "coll"
    paths = fakes.make_images(coll / "photos", 3)
    import pipeline
    import pipeline.api

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pipeline.api.models, "cached_embedder", fakes.cached)
        mp.chdir(coll)
        pipeline.index(["photos"])
    client = opened_in(coll).test_client()
    import sqlite3

    with sqlite3.connect(f"file:{coll / 'catalog.db'}?mode=ro", uri=True) as db:
        image_id, path = db.execute("select id, path from images order by id limit 1").fetchone()
    row_path = Path(path)
    assert row_path in paths, row_path
    assert client.get(f"/image/{image_id}/full").status_code == 200
    row_path.unlink()
    os.mkfifo(row_path)
    answers: list = []
    worker = threading.Thread(target=lambda: answers.append(client.get(f"/image/{image_id}/full")))
    worker.start()
    worker.join(timeout=20)
    assert not worker.is_alive(), "the request hung on a FIFO"
    assert answers[0].status_code == 404
