"""`cbir serve`: the web page and JSON API, through Flask's test client and a real browser."""

from __future__ import annotations

import io
import os
import re
import threading
from pathlib import Path

import pytest

pytest.importorskip("flask")

pytestmark = pytest.mark.slow  # every test here loads the real ResNet50

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


@pytest.fixture(scope="module")
def app(corel_collection, tmp_path_factory):
    from pipeline.serve import create_app

    settings = {k: corel_collection[k] for k in ("catalog", "index_dir", "weights")}
    thumbs = tmp_path_factory.mktemp("thumbs")
    return create_app(settings, thumbs_dir=thumbs, max_upload=2_000_000)


@pytest.fixture
def client(app):
    return app.test_client()


def some_row(corel_collection, n=0) -> dict:
    import sqlite3

    with sqlite3.connect(corel_collection["catalog"]) as con:
        id_, path, label = con.execute(
            "select id, path, label from images where status = 'indexed' order by id limit 1 offset ?",
            [n],
        ).fetchone()
    return {"id": id_, "path": path, "label": label}


def check_answer(answer: dict, k: int = 10) -> None:
    assert list(answer) == ["query", "query_id", "results"]
    assert len(answer["results"]) == k
    for rank, r in enumerate(answer["results"], start=1):
        assert list(r) == ["rank", "id", "path", "label", "score"]
        assert r["rank"] == rank and isinstance(r["id"], int) and -1.0001 <= r["score"] <= 1.0001
    scores = [r["score"] for r in answer["results"]]
    assert scores == sorted(scores, reverse=True)


def test_search_by_id(client, corel_collection):
    row = some_row(corel_collection, 7)
    r = client.post("/api/search", json={"id": row["id"]})
    assert r.status_code == 200, r.get_json()
    answer = r.get_json()
    check_answer(answer)
    assert answer["query_id"] == row["id"] and answer["query"] == row["path"]
    assert answer["results"][0]["id"] == row["id"] and answer["results"][0]["score"] >= 0.999


def test_search_matches_the_cli_api(client, corel_collection):
    import pipeline

    row = some_row(corel_collection, 3)
    options = {k: corel_collection[k] for k in ("catalog", "index_dir", "weights")}
    expected = pipeline.search([row["id"]], k=5, **options)[0]
    got = client.post("/api/search", json={"id": row["id"], "k": 5}).get_json()
    assert got == expected


def test_upload_search(client, corel_collection):
    row = some_row(corel_collection, 25)
    data = Path(row["path"]).read_bytes()
    r = client.post("/api/search", data={"image": (io.BytesIO(data), "q.jpg"), "k": "10"})
    assert r.status_code == 200, r.get_json()
    answer = r.get_json()
    check_answer(answer)
    assert answer["query"] == "q.jpg" and answer["query_id"] is None
    assert answer["results"][0]["id"] == row["id"] and answer["results"][0]["score"] >= 0.999


def test_upload_form_renders_results(client, corel_collection):
    data = Path(some_row(corel_collection, 40)["path"]).read_bytes()
    r = client.post("/search", data={"image": (io.BytesIO(data), "q.jpg")})
    assert r.status_code == 200
    html = r.get_data(as_text=True)
    assert html.count('class="card result"') == 10
    assert 'src="data:image/jpeg;base64,' in html
    assert re.search(r'class="score">1\.000<', html)


@pytest.mark.parametrize(
    "data, words",
    [
        (b"this is not an image", "not an image"),
        (b"", "empty"),
        (None, "corrupt or truncated"),  # a JPEG cut in half
    ],
)
def test_bad_upload_is_400(client, corel_collection, data, words):
    if data is None:
        whole = Path(some_row(corel_collection)["path"]).read_bytes()
        data = whole[: len(whole) // 2]
    r = client.post("/api/search", data={"image": (io.BytesIO(data), "bad.jpg")})
    assert r.status_code == 400
    message = r.get_json()["error"]
    assert words in message and "\n" not in message
    page = client.post("/search", data={"image": (io.BytesIO(data), "bad.jpg")})
    assert page.status_code == 400 and words in page.get_data(as_text=True)
    assert client.get("/api/info").status_code == 200  # still serving


def test_missing_file_field_is_400(client):
    r = client.post("/api/search", data={"other": "x"})
    assert r.status_code == 400 and "image" in r.get_json()["error"]


def test_oversize_upload(client):
    r = client.post("/api/search", data={"image": (io.BytesIO(b"\xff" * 3_000_000), "big.jpg")})
    assert r.status_code in (400, 413) and "too large" in r.get_json()["error"]
    page = client.post("/search", data={"image": (io.BytesIO(b"\xff" * 3_000_000), "big.jpg")})
    assert page.status_code in (400, 413) and "too large" in page.get_data(as_text=True)


def test_too_many_pixels_is_400(corel_collection, tmp_path):
    from PIL import Image

    from pipeline.serve import create_app

    settings = {k: corel_collection[k] for k in ("catalog", "index_dir", "weights")}
    small = create_app({**settings, "max_pixels": 10_000}, thumbs_dir=tmp_path).test_client()
    buf = io.BytesIO()
    Image.new("RGB", (200, 200)).save(buf, "PNG")
    r = small.post("/api/search", data={"image": (io.BytesIO(buf.getvalue()), "p.png")})
    assert r.status_code == 400 and "max_pixels" in r.get_json()["error"]


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
    assert r.status_code == 400 and r.get_json()["error"]


def test_unknown_id_is_404(client):
    r = client.post("/api/search", json={"id": 999999})
    assert r.status_code == 404 and "999999" in r.get_json()["error"]
    assert client.get("/image/999999").status_code == 404


def test_unknown_index_and_bad_k_are_400(client, corel_collection):
    row = some_row(corel_collection)
    assert client.post("/api/search", json={"id": row["id"], "index": "nope"}).status_code == 400
    assert client.post("/api/search", json={"id": row["id"], "k": 0}).status_code == 400
    assert client.post("/api/search", json={"id": row["id"], "k": "x"}).status_code == 400


def test_full_image_by_id(client, corel_collection):
    row = some_row(corel_collection, 2)
    r = client.get(f"/image/{row['id']}/full")
    assert r.status_code == 200 and r.data == Path(row["path"]).read_bytes()


def test_thumbnails_are_cached(app, client, corel_collection):
    from PIL import Image

    row = some_row(corel_collection, 5)
    r = client.get(f"/thumb/{row['id']}")
    assert r.status_code == 200 and r.mimetype == "image/jpeg"
    im = Image.open(io.BytesIO(r.data))
    assert im.format == "JPEG" and im.mode == "RGB" and max(im.size) <= 256
    cached = app.extensions["cbir"].thumbs / f"{row['id']}.jpg"
    assert cached.read_bytes() == r.data
    os.utime(cached, (1, 1))
    assert client.get(f"/thumb/{row['id']}").data == r.data
    assert cached.stat().st_mtime == 1  # served from the cache, not made again


def test_info(client, corel_collection):
    info = client.get("/api/info").get_json()
    assert info["images"]["indexed"] == 200 and info["dimension"] == 2048
    assert len(info["labels"]) == 10 and "exact" in [i["name"] for i in info["indexes"]]
    assert info["fingerprint"]["dimension"] == 2048


def test_browser_pages_and_label_filter(client):
    html = client.get("/").get_data(as_text=True)
    assert html.count('src="/thumb/') == 48 and "page 1 of 5" in html and 'rel="next"' in html
    last = client.get("/?page=5").get_data(as_text=True)
    assert last.count('src="/thumb/') == 200 - 4 * 48 and 'rel="next"' not in last
    assert client.get("/?page=999").status_code == 200  # clamped to the last page
    horses = client.get("/?label=horses").get_data(as_text=True)
    assert horses.count('src="/thumb/') == 20 and "page 1 of 1" in horses
    assert client.get("/?label=nosuchlabel").get_data(as_text=True).count('src="/thumb/') == 0
    page = client.get("/image/0").get_data(as_text=True)
    assert page.count('class="card result"') == 10 and "<option selected>exact</option>" in page


# ---- end to end in headless Chromium -------------------------------------------------


@pytest.fixture
def live_server(app):
    from werkzeug.serving import make_server

    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


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


def test_browser_end_to_end(live_server, browser, corel_collection, tmp_path):
    from selenium.webdriver.common.by import By

    artifacts = Path(os.environ.get("CBIR_TEST_ARTIFACTS", tmp_path / "artifacts"))
    artifacts.mkdir(parents=True, exist_ok=True)
    browser.get(live_server + "/")
    assert len(browser.find_elements(By.CSS_SELECTOR, "#images img")) == 48
    wait_for_images(browser, "#images img")
    browser.save_screenshot(str(artifacts / "browse.png"))

    browser.find_elements(By.CSS_SELECTOR, "#images a")[3].click()
    cards = browser.find_elements(By.CSS_SELECTOR, "#results .result")
    assert len(cards) == 10
    scores = [float(c.find_element(By.CLASS_NAME, "score").text) for c in cards]
    assert scores[0] >= 0.999 and scores == sorted(scores, reverse=True)
    wait_for_images(browser, "#results img")
    browser.save_screenshot(str(artifacts / "results.png"))

    browser.get(live_server + "/")
    upload = some_row(corel_collection, 150)
    browser.find_element(By.ID, "file").send_keys(upload["path"])
    browser.find_element(By.CSS_SELECTOR, "#drop button").click()
    cards = browser.find_elements(By.CSS_SELECTOR, "#results .result")
    assert len(cards) == 10
    assert cards[0].find_element(By.CLASS_NAME, "score").text == "1.000"
    assert upload["label"] in cards[0].text
    wait_for_images(browser, "#results img, #query-image")
    browser.save_screenshot(str(artifacts / "upload.png"))
    print(f"screenshots in {artifacts}")
