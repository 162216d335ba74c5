"""`cbir serve`: pages, JSON API, options, feedback, auth and waitress.

Fast tier: a fake model (tests/fakes.py) over images generated here. Slow
tier (marked): what needs the real ResNet50 on Corel-1K, and headless Chromium.
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

import fakes

pytest.importorskip("flask")

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
TOKEN = "s3cret-Token_42"
N_IMAGES = 60


def with_fake_model(fn):
    """Run fn with every model load returning the fake model (only while loading)."""
    import pipeline.api

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pipeline.api.models, "cached_embedder", fakes.cached)
        return fn()


def open_app(options: dict, **kwargs):
    from pipeline import api
    from pipeline.web import server as serve

    return with_fake_model(lambda: serve.open_app(api.settings_for(**options), **kwargs))


@pytest.fixture(scope="module")
def collection(tmp_path_factory) -> dict:
    """60 generated images (labels red and blue), indexed with the fake model; index flat2."""
    import pipeline

    tmp = tmp_path_factory.mktemp("web")
    fakes.make_images(tmp / "images", N_IMAGES)
    options = {"catalog": str(tmp / "cat.db"), "index_dir": str(tmp / "index")}
    with_fake_model(lambda: pipeline.index([tmp / "images"], **options))
    pipeline.build_index("flat2", factory="Flat", **options)
    return {**options, "tmp": tmp}


def options_of(collection: dict) -> dict:
    return {k: collection[k] for k in ("catalog", "index_dir")}


@pytest.fixture(scope="module")
def app(collection):
    return open_app(
        options_of(collection), thumbs_dir=collection["tmp"] / "thumbs", max_upload=2_000_000
    )


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture(scope="module")
def guarded(collection):
    """The same collection served with a token."""
    return open_app(options_of(collection), thumbs_dir=collection["tmp"] / "thumbs", token=TOKEN)


@pytest.fixture
def fake_model(monkeypatch):
    import pipeline.api

    monkeypatch.setattr(pipeline.api.models, "cached_embedder", fakes.cached)


def row(collection: dict, n: int = 0) -> dict:
    import sqlite3

    with sqlite3.connect(collection["catalog"]) as con:
        id_, path, label = con.execute(
            "select id, path, label from images where status = 'indexed' order by id limit 1 offset ?",
            [n],
        ).fetchone()
    return {"id": id_, "path": path, "label": label}


def check_answer(answer: dict, k: int = 10) -> None:
    """The shape of `cbir search --json`, best first."""
    assert list(answer) == ["query", "query_id", "results"]
    assert len(answer["results"]) == k
    for rank, r in enumerate(answer["results"], start=1):
        assert list(r) == ["rank", "id", "path", "label", "score"]
        assert r["rank"] == rank and isinstance(r["id"], int) and -1.0001 <= r["score"] <= 1.0001
    scores = [r["score"] for r in answer["results"]]
    assert scores == sorted(scores, reverse=True)


def one_line_error(r, tmp: Path | None = None) -> str:
    body = r.get_data(as_text=True)
    assert "\n" not in body.strip(), body
    message = json.loads(body)["error"]
    assert message and "\n" not in message and "Traceback" not in message
    if tmp is not None:
        assert str(tmp) not in message, message
    return message


def upload(data: bytes, name: str = "q.jpg", **fields) -> dict:
    return {"image": (io.BytesIO(data), name), **fields}


def card_ids(html: str) -> list[int]:
    return [int(i) for i in re.findall(r'class="mark-rel" name="relevant" value="(\d+)"', html)]


def hidden(html: str, name: str) -> list[str]:
    return re.findall(rf'<input type="hidden" name="{name}" value="([^"]*)">', html)


# ---- searching: the same answers as the CLI's API ---------------------------------------------


def test_search_by_id(client, collection):
    r0 = row(collection, 7)
    r = client.post("/api/search", json={"id": r0["id"]})
    assert r.status_code == 200, r.get_json()
    answer = r.get_json()
    check_answer(answer)
    assert answer["query_id"] == r0["id"] and answer["query"] == r0["path"]
    assert answer["results"][0]["id"] == r0["id"] and answer["results"][0]["score"] >= 0.999


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"k": 5},
        {"index": "flat2", "k": 3},
        {"rerank": "dba+aqe"},
        {"rerank": "aqe", "k": 20, "shortlist": 40},
        {"relevant": [4, 6], "not_relevant": [9]},
        {"relevant": [2], "rerank": "dba", "index": "flat2"},
    ],
)
def test_search_matches_the_cli_api(client, collection, options):
    import pipeline

    r0 = row(collection, 3)
    expected = pipeline.search([r0["id"]], **options_of(collection), **options)[0]
    r = client.post("/api/search", json={"id": r0["id"], **options})
    assert r.status_code == 200, r.get_json()
    assert r.get_json() == expected


def test_upload_search(client, collection, fake_model):
    import pipeline

    r0 = row(collection, 25)
    data = Path(r0["path"]).read_bytes()
    r = client.post("/api/search", data=upload(data, k="10"))
    assert r.status_code == 200, r.get_json()
    answer = r.get_json()
    check_answer(answer)
    assert answer["query"] == "q.jpg" and answer["query_id"] is None
    assert answer["results"][0]["id"] == r0["id"] and answer["results"][0]["score"] >= 0.999
    # Options and feedback in the form fields, as `cbir search FILE` takes them.
    fields = {"k": "7", "rerank": "dba+aqe", "relevant": ["3", "5"], "not_relevant": "8,10"}
    got = client.post("/api/search", data=upload(data, **fields)).get_json()
    expected = pipeline.search(
        [r0["path"]], k=7, rerank="dba+aqe", relevant=[3, 5], not_relevant=[8, 10],
        **options_of(collection),
    )[0]  # fmt: skip
    assert got["results"] == expected["results"]


@pytest.mark.parametrize("fmt", ["HEIF", "AVIF"])
def test_upload_of_a_phone_photo(client, collection, fake_model, fmt):
    """A HEIC or AVIF upload (as a phone sends it) is searched like the JPEG it was made from."""
    import pillow_heif
    from PIL import Image

    pillow_heif.register_heif_opener()
    r0 = row(collection, 25)
    buf = io.BytesIO()
    Image.open(r0["path"]).save(buf, format=fmt, quality=95)
    r = client.post("/api/search", data=upload(buf.getvalue(), f"IMG_0001.{fmt.lower()}"))
    assert r.status_code == 200, r.get_json()
    top = r.get_json()["results"][0]
    assert top["id"] == r0["id"] and top["score"] > 0.99


def test_upload_form_renders_results(client, collection):
    r0 = row(collection, 40)
    data = Path(r0["path"]).read_bytes()
    r = client.post("/search", data=upload(data))
    assert r.status_code == 200
    html = r.get_data(as_text=True)
    assert html.count('class="card result"') == 10
    assert 'src="data:image/jpeg;base64,' in html
    assert re.search(r'class="score">1\.000<', html)
    assert card_ids(html)[0] == r0["id"]
    assert len(hidden(html, "query_png")) == 1 and hidden(html, "query_name") == ["q.jpg"]


def test_feedback_round_trip_of_an_upload(client, collection):
    """The page carries the upload; the second round equals the API's answer with feedback."""
    data = Path(row(collection, 11)["path"]).read_bytes()
    first = client.post("/search", data=upload(data, k="8")).get_data(as_text=True)
    api_first = client.post("/api/search", data=upload(data, k="8")).get_json()
    assert card_ids(first) == [r["id"] for r in api_first["results"]]  # same pixels, same vector
    shown = card_ids(first)
    form = {
        "query_name": hidden(first, "query_name")[0],
        "query_png": hidden(first, "query_png")[0],
        "query_thumb": hidden(first, "query_thumb")[0],
        "k": "8",
        "index": "exact",
        "rerank": "",
        "relevant": [str(shown[2]), str(shown[3])],
        "not_relevant": [str(shown[1])],
    }
    r = client.post("/search", data=form)
    assert r.status_code == 200, r.get_data(as_text=True)
    second = r.get_data(as_text=True)
    fb = {"relevant": [str(shown[2]), str(shown[3])], "not_relevant": [str(shown[1])]}
    api_second = client.post("/api/search", data=upload(data, k="8", **fb)).get_json()
    assert card_ids(second) == [r["id"] for r in api_second["results"]]
    assert card_ids(second) != shown  # the feedback moved something
    assert "2 relevant, 1 not relevant" in second
    for i in (shown[2], shown[3]):
        if i in card_ids(second):
            assert f'name="relevant" value="{i}" checked' in second
        else:  # marked, no longer shown: still sent with the next round
            assert str(i) in hidden(second, "relevant")
    assert hidden(second, "query_png") == [form["query_png"]]


def test_feedback_on_an_id_page(client, collection):
    import pipeline

    r = client.get("/image/3?k=5&relevant=5&relevant=7&not_relevant=9")
    assert r.status_code == 200, r.get_data(as_text=True)
    html = r.get_data(as_text=True)
    expected = pipeline.search(
        [3], k=5, relevant=[5, 7], not_relevant=[9], **options_of(collection)
    )[0]
    assert card_ids(html) == [x["id"] for x in expected["results"]]
    shown = set(card_ids(html))
    for i, name in ((5, "relevant"), (7, "relevant"), (9, "not_relevant")):
        if i in shown:
            assert f'name="{name}" value="{i}" checked' in html
        else:
            assert str(i) in hidden(html, name)
    assert 'method="get" action="/image/3"' in html and 'id="search-again"' in html


def test_page_options(client):
    html = client.get("/image/0?k=5&index=flat2&rerank=dba%2Baqe").get_data(as_text=True)
    assert html.count('class="card result"') == 5
    assert "<option selected>flat2</option>" in html
    assert '<option value="dba+aqe" selected>' in html and 'value="5"' in html
    default = client.get("/image/0").get_data(as_text=True)
    assert (
        default.count('class="card result"') == 10 and "<option selected>exact</option>" in default
    )


# ---- status by kind of error -------------------------------------------------------------------


@pytest.mark.parametrize(
    "data, words",
    [
        (b"this is not an image", "not an image"),
        (b"", "empty"),
        (None, "corrupt or truncated"),  # a JPEG cut in half
    ],
)
def test_bad_upload_is_400(client, collection, data, words):
    if data is None:
        whole = Path(row(collection)["path"]).read_bytes()
        data = whole[: len(whole) // 2]
    r = client.post("/api/search", data=upload(data, "bad.jpg"))
    assert r.status_code == 400
    assert words in one_line_error(r, collection["tmp"])
    page = client.post("/search", data=upload(data, "bad.jpg"))
    assert page.status_code == 400 and words in page.get_data(as_text=True)
    assert client.get("/api/info").status_code == 200  # still serving


def test_missing_file_field_is_400(client):
    r = client.post("/api/search", data={"other": "x"})
    assert r.status_code == 400 and "image" in one_line_error(r)
    assert client.post("/search", data={"k": "3"}).status_code == 400


def test_oversize_upload_is_413(client):
    r = client.post("/api/search", data=upload(b"\xff" * 3_000_000, "big.jpg"))
    assert r.status_code == 413 and "too large" in one_line_error(r)
    page = client.post("/search", data=upload(b"\xff" * 3_000_000, "big.jpg"))
    assert page.status_code == 413 and "too large" in page.get_data(as_text=True)


def test_too_many_pixels_is_400(collection, tmp_path):
    from PIL import Image

    small = open_app({**options_of(collection), "max_pixels": 10_000}, thumbs_dir=tmp_path)
    buf = io.BytesIO()
    Image.new("RGB", (200, 200)).save(buf, "PNG")
    r = small.test_client().post("/api/search", data=upload(buf.getvalue(), "p.png"))
    assert r.status_code == 400 and "max_pixels" in one_line_error(r)


@pytest.mark.parametrize(
    "url",
    [
        "/thumb/../../etc/passwd",
        "/thumb/..%2F..%2Fetc%2Fpasswd",
        "/image/-1",
        "/image/-1/full",
        "/thumb/999999",
        "/image/999999",
        "/image/999999/full",
        "/thumb/99999999999999999999999999",
        "/image/99999999999999999999999999",
        "/image/%2Fetc%2Fpasswd/full",
        "/static/../../etc/passwd",
    ],
)
def test_no_path_is_served_but_catalogued_ids(client, url):
    r = client.get(url)
    assert r.status_code in (400, 404)
    assert b"root:" not in r.data


@pytest.mark.parametrize(
    "body", [{"id": "../x"}, {"id": "/etc/passwd"}, {"id": "3"}, {"id": True}, {"id": 1.5}, [1], {}]
)
def test_json_id_must_be_an_integer(client, body):
    r = client.post("/api/search", json=body)
    assert r.status_code == 400 and one_line_error(r)


@pytest.mark.parametrize(
    "options, words",
    [
        ({"index": "nope"}, "nope"),
        ({"index": "../etc/passwd"}, "invalid index name"),
        ({"index": ""}, "index"),
        ({"k": 0}, "k must be"),
        ({"k": "x"}, "k must be"),
        ({"k": 1001}, "k must be"),
        ({"k": True}, "k must be"),
        ({"rerank": "magic"}, "re-ranking"),
        ({"rerank": 3}, "rerank"),
        ({"shortlist": 0}, "shortlist"),
        ({"rerank": "dba", "k": 50, "shortlist": 20}, "shortlist"),
        ({"relevant": "3"}, "relevant"),
        ({"relevant": [-1]}, "relevant"),
        ({"relevant": [True]}, "relevant"),
        ({"not_relevant": [1.5]}, "not_relevant"),
        ({"relevant": [999999]}, "not indexed"),
        ({"relevant": [4], "not_relevant": [4]}, "both"),
        ({"relevant": list(range(1001))}, "more than"),
        ({"allow_stale": "yes"}, "allow_stale"),
        ({"kk": 3}, "unknown keys"),
    ],
)
def test_bad_search_options_are_400(client, collection, options, words):
    r = client.post("/api/search", json={"id": 1, **options})
    assert r.status_code == 400, r.get_data(as_text=True)
    assert words in one_line_error(r, collection["tmp"])


@pytest.mark.parametrize(
    "query", ["k=0", "k=x", "rerank=magic", "index=nope", "relevant=x", "relevant=999999",
              "relevant=3&not_relevant=3"],
)  # fmt: skip
def test_bad_page_options_are_400(client, query):
    r = client.get(f"/image/1?{query}")
    assert r.status_code == 400 and 'id="error"' in r.get_data(as_text=True)


def test_bad_carried_query_is_400(client):
    for png in ("not base64!", "A" * 300_000, "QUJD"):  # the last: base64, but no image
        r = client.post("/search", data={"query_png": png, "query_name": "q.jpg"})
        assert r.status_code == 400, png[:20]


def test_unknown_id_is_404(client):
    r = client.post("/api/search", json={"id": 999999})
    assert r.status_code == 404 and "999999" in one_line_error(r)
    for url in ("/image/999999", "/thumb/999999", "/image/999999/full"):
        assert client.get(url).status_code == 404, url


def test_stale_index_is_409(fake_model, tmp_path):
    import pipeline

    fakes.make_images(tmp_path / "a", 12)
    options = {"catalog": str(tmp_path / "cat.db"), "index_dir": str(tmp_path / "index")}
    pipeline.index([tmp_path / "a"], **options)
    pipeline.build_index("flat3", factory="Flat", **options)
    client = open_app(options, thumbs_dir=tmp_path / "thumbs").test_client()
    assert client.post("/api/search", json={"id": 1, "index": "flat3"}).status_code == 200
    fakes.make_images(tmp_path / "b", 4, seed=3)
    pipeline.index([tmp_path / "b"], **options)
    r = client.post("/api/search", json={"id": 1, "index": "flat3"})
    assert r.status_code == 409 and "build-index flat3" in one_line_error(r, tmp_path)
    assert client.get("/image/1?index=flat3").status_code == 409
    r = client.post("/api/search", json={"id": 1, "index": "flat3", "allow_stale": True})
    assert r.status_code == 200 and r.get_json()["results"][0]["id"] == 1
    assert client.post("/api/search", json={"id": 13}).status_code == 200  # exact follows


# ---- images, thumbnails, browsing, info --------------------------------------------------------


def test_full_image_by_id(client, collection):
    r0 = row(collection, 2)
    r = client.get(f"/image/{r0['id']}/full")
    assert r.status_code == 200 and r.data == Path(r0["path"]).read_bytes()


def test_thumbnails_are_cached(app, client, collection):
    from PIL import Image

    r0 = row(collection, 5)
    r = client.get(f"/thumb/{r0['id']}")
    assert r.status_code == 200 and r.mimetype == "image/jpeg"
    im = Image.open(io.BytesIO(r.data))
    assert im.format == "JPEG" and im.mode == "RGB" and max(im.size) <= 256
    cached = app.extensions["cbir"].thumbs / f"{r0['id']}.jpg"
    assert cached.read_bytes() == r.data
    os.utime(cached, (1, 1))
    assert client.get(f"/thumb/{r0['id']}").data == r.data
    assert cached.stat().st_mtime == 1  # served from the cache, not made again


def test_info(client):
    info = client.get("/api/info").get_json()
    assert info["images"]["indexed"] == N_IMAGES and info["dimension"] == 2048
    assert sorted(info["labels"]) == ["blue", "red"]
    assert "flat2" in [i["name"] for i in info["indexes"]]


def test_browse_pages_and_label_filter(client):
    html = client.get("/").get_data(as_text=True)
    assert html.count('src="/thumb/') == 48 and "page 1 of 2" in html and 'rel="next"' in html
    assert 'name="k"' in html and "<option selected>exact</option>" in html  # search options
    last = client.get("/?page=2").get_data(as_text=True)
    assert last.count('src="/thumb/') == N_IMAGES - 48 and 'rel="next"' not in last
    assert client.get("/?page=999").status_code == 200  # clamped to the last page
    assert client.get("/?page=x").status_code == 200
    red = client.get("/?label=red").get_data(as_text=True)
    assert red.count('src="/thumb/') == N_IMAGES // 2 and "page 1 of 1" in red
    assert client.get("/?label=nosuchlabel").get_data(as_text=True).count('src="/thumb/') == 0


# ---- the token -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "method, url",
    [("get", "/api/info"), ("post", "/api/search"), ("get", "/"), ("get", "/image/1"),
     ("get", "/thumb/1"), ("get", "/image/1/full"), ("post", "/search"), ("get", "/nothing")],
)  # fmt: skip
def test_a_token_guards_every_route(guarded, method, url):
    client = guarded.test_client()
    r = getattr(client, method)(url, json={"id": 1} if url == "/api/search" else None)
    assert r.status_code == 401
    if url.startswith("/api/"):
        assert "token" in one_line_error(r) and r.headers["WWW-Authenticate"].startswith("Bearer")
    else:
        assert 'name="token"' in r.get_data(as_text=True)  # the login form
    for bad in (
        "Bearer wrong",
        f"Basic {TOKEN}",
        f"Bearer {TOKEN}x",
        "Bearer",
        f"Bearer {TOKEN[:-1]}é",
    ):
        assert getattr(client, method)(url, headers={"Authorization": bad}).status_code == 401


def test_bearer_token(guarded):
    client = guarded.test_client()
    auth = {"Authorization": f"Bearer {TOKEN}"}
    assert client.get("/api/info", headers=auth).status_code == 200
    r = client.post("/api/search", json={"id": 2, "k": 3}, headers=auth)
    assert r.status_code == 200 and r.get_json()["results"][0]["id"] == 2
    assert client.get("/", headers=auth).status_code == 200


def test_login_form_sets_a_cookie(guarded):
    client = guarded.test_client()
    assert client.get("/login").status_code == 200
    r = client.post("/login", data={"token": "wrong", "next": "/image/4"})
    assert r.status_code == 401 and "wrong token" in r.get_data(as_text=True)
    r = client.post("/login", data={"token": TOKEN, "next": "/image/4?k=3"})
    assert r.status_code == 303 and r.headers["Location"].endswith("/image/4?k=3")
    cookie = r.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and TOKEN not in cookie
    assert client.get("/image/4?k=3").status_code == 200  # the cookie is sent back
    assert client.get("/api/info").status_code == 200
    client.get("/logout")
    assert client.get("/").status_code == 401
    for target in ("//evil.example/x", "https://evil.example/", "javascript:alert(1)"):
        r = client.post("/login", data={"token": TOKEN, "next": target})
        assert r.headers["Location"].endswith("/") and "evil" not in r.headers["Location"]


@pytest.mark.parametrize(
    "host, loopback",
    [("127.0.0.1", True), ("127.8.9.10", True), ("::1", True), ("[::1]", True),
     ("localhost", True), ("LOCALHOST", True), ("0.0.0.0", False), ("::", False), ("", False),
     ("192.168.1.20", False), ("example.com", False)],
)  # fmt: skip
def test_is_loopback(host, loopback):
    from pipeline.web.auth import is_loopback

    assert is_loopback(host) is loopback


def test_required_token():
    from pipeline.errors import CbirError
    from pipeline.web.server import required_token

    assert required_token("127.0.0.1", None, False) is None
    assert required_token("::1", "tok", False) == "tok"  # given on loopback: required there too
    assert required_token("0.0.0.0", "tok", False) == "tok"
    assert required_token("0.0.0.0", None, True) is None  # explicitly unguarded
    for args in (("0.0.0.0", None, False), ("10.0.0.1", "", False), ("::", "a b", False),
                 ("0.0.0.0", "tok", True)):  # fmt: skip
        with pytest.raises(CbirError):
            required_token(*args)


def test_serve_refuses_an_exposed_address_without_a_token(tmp_path):
    """One line, exit 2, before opening anything (no catalog is needed to be refused)."""
    env = {k: v for k, v in os.environ.items() if k != "CBIR_TOKEN"}
    done = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "fakes.py"), "serve", "--host", "0.0.0.0",
         "--catalog", str(tmp_path / "none.db")],
        capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cbir: error: ")
    assert "--token" in lines[0] and "--no-auth" in lines[0] and "serving" not in done.stderr


def test_waitress_serves_the_app(guarded, collection):
    """The real server: auth over HTTP, and a short burst of concurrent clients."""
    from pipeline.web.load import Job, run
    from pipeline.web.server import running

    items = [(r["id"], r["path"]) for r in (row(collection, n) for n in range(0, N_IMAGES, 6))]
    with running(guarded, threads=4) as url:
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(url + "/api/info", timeout=30)
        assert e.value.code == 401 and json.loads(e.value.read())["error"]
        req = urllib.request.Request(
            url + "/api/info", headers={"Authorization": f"Bearer {TOKEN}"}
        )
        with urllib.request.urlopen(req, timeout=30) as r:
            assert r.headers["Server"] == "cbir" and json.loads(r.read())["images"]["indexed"]
        result = run(
            Job(url, "mixed", items, concurrency=4, seconds=None, requests=40, token=TOKEN)
        )
    print(f"\nwaitress, 4 clients: {result}")
    assert result["requests"] == 40 and result["errors"] == 0 and result["wrong"] == 0, result


# ---- slow tier: the real ResNet50 on Corel-1K, and a real browser --------------------------------


@pytest.fixture(scope="module")
def corel_app(corel_collection, tmp_path_factory):
    from pipeline import api
    from pipeline.web import server as serve

    settings = api.settings_for(
        **{k: corel_collection[k] for k in ("catalog", "index_dir", "weights")}
    )
    thumbs = tmp_path_factory.mktemp("thumbs")
    return serve.open_app(settings, thumbs_dir=thumbs, max_upload=2_000_000)


@pytest.mark.slow
def test_upload_finds_its_own_class(corel_app, corel_collection, corel_query_rows):
    """Query images not in the catalog (one per class) find their class; a catalogued one itself."""
    from conftest import COREL

    client = corel_app.test_client()
    firsts, precisions = [], []
    queries = {r["label"]: r for r in corel_query_rows}.values()
    for q in queries:
        data = (COREL / q["path"]).read_bytes()
        r = client.post("/api/search", data=upload(data, Path(q["path"]).name))
        assert r.status_code == 200, r.get_json()
        results = r.get_json()["results"]
        check_answer(r.get_json())
        firsts.append(results[0]["label"] == q["label"])
        precisions.append(sum(x["label"] == q["label"] for x in results) / len(results))
    print(
        f"\nuploads: top-1 right {sum(firsts)}/{len(firsts)}, mean P@10 {sum(precisions) / len(precisions):.2f}"
    )
    assert len(firsts) == 10 and sum(firsts) >= 8 and sum(precisions) / len(precisions) >= 0.6
    own = row(corel_collection, 25)
    answer = client.post("/api/search", data=upload(Path(own["path"]).read_bytes())).get_json()
    assert answer["results"][0]["id"] == own["id"] and answer["results"][0]["score"] >= 0.999


@pytest.fixture
def live_server(corel_collection, tmp_path):
    """`cd COLL && cbir serve`, as the README starts it (the default, relative catalog.db and
    index/), in a copy of the Corel collection: its thumbnails go to COLL/catalog.thumbs/."""
    from conftest import copy_collection

    coll = tmp_path / "coll"
    copy_collection(corel_collection, coll)
    cbir = [str(Path(sys.executable).with_name("cbir"))]
    with fakes.served(coll, tmp_path / "serve.log", cbir=cbir, timeout=300) as url:
        yield url


@pytest.fixture
def browser(tmp_path):
    if not os.path.exists(CHROMIUM) or not os.path.exists(CHROMEDRIVER):
        pytest.skip(
            f"needs {CHROMIUM} and {CHROMEDRIVER} (apt-get install chromium chromium-driver)"
        )
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--window-size=1280,1000",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.implicitly_wait(10)
    yield driver
    driver.quit()


def wait_for_images(browser, css: str, n: int = 14) -> None:
    """Wait until the first n images are loaded (thumbnails are made on first request)."""
    from selenium.webdriver.support.ui import WebDriverWait

    script = (
        f"return Array.from(document.querySelectorAll('{css}')).slice(0, {n})"
        ".every(i => i.complete && i.naturalWidth > 0)"
    )
    WebDriverWait(browser, 30).until(lambda b: b.execute_script(script))


def mark_and_search_again(browser, relevant: list[int], not_relevant: list[int]) -> list[str]:
    """Tick feedback boxes on result cards (by position), search again; the new cards' ids."""
    from selenium.webdriver.common.by import By

    cards = browser.find_elements(By.CSS_SELECTOR, "#results .result")
    for i in relevant:
        cards[i].find_element(By.CLASS_NAME, "mark-rel").click()
    for i in not_relevant:
        cards[i].find_element(By.CLASS_NAME, "mark-irr").click()
    browser.find_element(By.ID, "search-again").click()
    summary = browser.find_element(By.ID, "feedback-summary").text
    assert summary == f"{len(relevant)} relevant, {len(not_relevant)} not relevant", summary
    cards = browser.find_elements(By.CSS_SELECTOR, "#results .result")
    assert len(cards) == 10
    return [c.find_element(By.CLASS_NAME, "mark-rel").get_attribute("value") for c in cards]


@pytest.mark.slow
def test_browser_end_to_end(live_server, browser, corel_collection, tmp_path):
    from selenium.webdriver.common.by import By

    artifacts = Path(os.environ.get("CBIR_TEST_ARTIFACTS", tmp_path / "artifacts"))
    artifacts.mkdir(parents=True, exist_ok=True)
    browser.get(live_server + "/")
    assert len(browser.find_elements(By.CSS_SELECTOR, "#images img")) == 48
    wait_for_images(browser, "#images img", n=48)  # every thumbnail loads (naturalWidth > 0)
    browser.save_screenshot(str(artifacts / "browse.png"))

    browser.find_elements(By.CSS_SELECTOR, "#images a")[3].click()
    cards = browser.find_elements(By.CSS_SELECTOR, "#results .result")
    assert len(cards) == 10
    scores = [float(c.find_element(By.CLASS_NAME, "score").text) for c in cards]
    assert scores[0] >= 0.999 and scores == sorted(scores, reverse=True)
    wait_for_images(browser, "#results img")
    browser.save_screenshot(str(artifacts / "results.png"))
    ids = mark_and_search_again(browser, relevant=[1, 2], not_relevant=[8, 9])
    assert "relevant=" in browser.current_url and ids[0]
    browser.save_screenshot(str(artifacts / "feedback.png"))

    browser.get(live_server + "/")
    own = row(corel_collection, 150)
    browser.find_element(By.ID, "file").send_keys(own["path"])
    browser.find_element(By.CSS_SELECTOR, "#drop button").click()
    cards = browser.find_elements(By.CSS_SELECTOR, "#results .result")
    assert len(cards) == 10
    assert cards[0].find_element(By.CLASS_NAME, "score").text == "1.000"
    assert own["label"] in cards[0].text
    wait_for_images(browser, "#results img, #query-image")
    browser.save_screenshot(str(artifacts / "upload.png"))
    ids = mark_and_search_again(browser, relevant=[0, 1], not_relevant=[9])
    assert ids[0] == str(own["id"])  # the carried query is the same image
    print(f"screenshots in {artifacts}")


# ---- the review page of duplicates (pipeline/web/dedup_routes.py) in the browser ------------------


def edited_copies(rows: list[dict], folder: Path) -> None:
    """Copies of Corel images a person would have: the same bytes, half the size, a JPEG
    of quality 30 and a brighter one, a crop of 8% off two sides."""
    import shutil

    from PIL import Image, ImageEnhance

    from conftest import COREL

    folder.mkdir(parents=True)
    for n, r in enumerate(rows):
        src = COREL / r["path"]
        stem, im = f"{r['label']}_{src.stem}", Image.open(COREL / r["path"]).convert("RGB")
        w, h = im.size
        if n % 4 == 0:
            shutil.copy(src, folder / f"{stem}_copy.jpg")
        elif n % 4 == 1:
            im.resize((w // 2, h // 2), Image.Resampling.LANCZOS).save(folder / f"{stem}_half.jpg")
        elif n % 4 == 2:
            im.save(folder / f"{stem}_q30.jpg", quality=30)
            ImageEnhance.Brightness(im).enhance(1.2).save(folder / f"{stem}_bright.jpg", quality=90)
        else:
            im.crop((w * 8 // 100, h * 8 // 100, w, h)).save(
                folder / f"{stem}_crop.jpg", quality=90
            )


@pytest.fixture
def duplicates_server(corel_collection, corel_db_rows, tmp_path):
    """`cbir serve` over a copy of the Corel collection with edited copies of 8 of its
    images (one per class) indexed into it with the real model."""
    import pipeline
    from conftest import copy_collection

    coll = tmp_path / "coll"
    options = copy_collection(corel_collection, coll)
    edited_copies(corel_db_rows[::20][:8], coll / "edited")
    keys = ("catalog", "index_dir", "weights", "runtime", "input", "pooling")
    pipeline.index([coll / "edited"], **{k: options[k] for k in keys})
    cbir = [str(Path(sys.executable).with_name("cbir"))]
    with fakes.served(coll, tmp_path / "serve.log", cbir=cbir, timeout=300) as url:
        yield url


def regrouped_at(browser, near: str) -> dict:
    """Move the near-identical slider with the keyboard (Home, then steps of 0.005 to the
    right, as a person would), wait for the page to regroup; what it shows."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    slider = browser.find_element(By.ID, "near")
    low, step = float(slider.get_attribute("min")), float(slider.get_attribute("step"))
    slider.send_keys(Keys.HOME + Keys.RIGHT * round((float(near) - low) / step))
    assert browser.find_element(By.ID, "near-value").text == f"{float(near):.3f}"
    done = (
        f"return location.search.includes('near={near}&')"
        " && document.getElementById('dup-status').textContent.startsWith('regrouped')"
    )
    WebDriverWait(browser, 60).until(lambda b: b.execute_script(done))
    return browser.execute_script(
        "return {summary: document.getElementById('dup-summary').textContent,"
        " groups: [...document.querySelectorAll('#groups .group')].map(g =>"
        " [...g.querySelectorAll('figure')].map(f => Number(f.dataset.id)))}"
    )


@pytest.mark.slow
def test_browser_duplicates(duplicates_server, browser, tmp_path):
    """The review page: groups load, the slider regroups, select all / none, the CSV export."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    artifacts = Path(os.environ.get("CBIR_TEST_ARTIFACTS", tmp_path / "artifacts"))
    artifacts.mkdir(parents=True, exist_ok=True)
    downloads = tmp_path / "downloads"
    browser.execute_cdp_cmd(
        "Page.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)}
    )
    browser.get(duplicates_server + "/")
    browser.find_element(By.ID, "nav-duplicates").click()  # linked from the header
    tight = regrouped_at(browser, "0.99")
    loose = regrouped_at(browser, "0.85")
    grouped = lambda shown: {i for g in shown["groups"] for i in g}  # noqa: E731
    assert tight["summary"] != loose["summary"] and len(grouped(loose)) > len(grouped(tight))
    assert len(grouped(tight)) >= 2  # the copy with the same bytes, at least
    shown = regrouped_at(browser, "0.9")
    assert len(shown["groups"]) >= 4, shown  # every edit but the crop, at least
    wait_for_images(browser, "#groups img", n=sum(map(len, shown["groups"])))

    boxes = lambda: browser.find_elements(By.CSS_SELECTOR, "#groups .move-box")  # noqa: E731
    keepers = {int(f.get_attribute("data-id")) for f in browser.find_elements(By.CSS_SELECTOR, "#groups figure.keeper")}  # fmt: skip
    assert len(keepers) == len(shown["groups"])  # one suggested keeper per group
    browser.find_element(By.ID, "select-none").click()
    assert not any(b.is_selected() for b in boxes())
    browser.find_element(By.ID, "select-page").click()
    ticked = {int(b.get_attribute("value")) for b in boxes() if b.is_selected()}
    assert ticked == grouped(shown) - keepers  # all but each keeper
    # Keep one more copy; move one keeper: its group is marked as losing every copy.
    first, last = shown["groups"][0], shown["groups"][-1]
    kept = next(i for i in first if i not in keepers)
    browser.find_element(By.CSS_SELECTOR, f'figure[data-id="{kept}"] .move-box').click()
    moved = next(i for i in last if i in keepers)
    browser.find_element(By.CSS_SELECTOR, f'figure[data-id="{moved}"] .move-box').click()
    section = browser.find_element(By.CSS_SELECTOR, f'figure[data-id="{moved}"]')
    section = section.find_element(By.XPATH, "./ancestor::section")
    assert section.find_element(By.CLASS_NAME, "warn").is_displayed()  # nothing of it stays
    assert "1 copy kept, 1 keeper moved" in browser.find_element(By.ID, "choice-summary").text
    browser.set_window_size(1280, 2000)  # most of the page: the changed groups too
    browser.execute_script("window.scrollTo(0, 0)")
    browser.save_screenshot(str(artifacts / "duplicates.png"))

    browser.find_element(By.ID, "export").click()
    csv_file = downloads / "duplicates-moves.csv"
    WebDriverWait(browser, 30).until(lambda b: csv_file.exists() and csv_file.stat().st_size)
    import csv

    with csv_file.open(newline="") as f:
        exported = list(csv.DictReader(f))
    assert list(exported[0]) == ["group", "kind", "keeper", "id", "score", "width", "height", "size", "date", "path"]  # fmt: skip
    assert {int(r["id"]) for r in exported} == (ticked - {kept}) | {moved}
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not [e for e in errors if "favicon.ico" not in e["message"]], errors  # no script error
    print(f"screenshot in {artifacts / 'duplicates.png'}")
