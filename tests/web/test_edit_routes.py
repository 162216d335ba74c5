"""Adding and removing images over HTTP: `POST /api/images` and `DELETE /api/images/ID`
on a server started with an uploads folder (`cbir serve --uploads DIR`) and a token.

Fast tier: the fake model (tests/fakes.py) over generated images; each test serves a
fresh small collection, since these routes change it. The crash points of the jobs
behind the routes are in tests/api/test_editing_crash.py.
"""

from __future__ import annotations

import io
import json
import os
import sqlite3
import struct
import threading
import time
import urllib.error
import urllib.request
import uuid
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_serve import TOKEN, one_line_error, open_app

import fakes

pytest.importorskip("flask")

AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> dict:
    """12 generated images indexed with the fake model, once per module."""
    import pipeline

    tmp = tmp_path_factory.mktemp("edits")
    fakes.make_images(tmp / "images", 12)
    options = {"catalog": str(tmp / "catalog.db"), "index_dir": str(tmp / "index")}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pipeline.api.models, "cached_embedder", fakes.cached)
        pipeline.index([tmp / "images"], **options)
    return options


@pytest.fixture
def coll(base, tmp_path) -> dict:
    """A private copy of the base collection, for a test that changes it (its images stay
    shared: only files under the copy's uploads folder are ever deleted)."""
    from conftest import copy_collection

    options = copy_collection(base, tmp_path / "coll")
    return {**options, "tmp": tmp_path, "uploads": tmp_path / "uploads"}


def serve(coll: dict, **kwargs):
    options = {k: coll[k] for k in ("catalog", "index_dir")}
    kwargs.setdefault("token", TOKEN)
    kwargs.setdefault("uploads_to", coll["uploads"])
    return open_app(options, thumbs_dir=coll["tmp"] / "thumbs", **kwargs)


def jpeg(seed: int, size: int = 40) -> bytes:
    """A small JPEG of its own: different seeds give different images (and vectors)."""
    rng = np.random.default_rng(1000 + seed)
    pixels = np.clip(rng.integers(0, 256, 3) + rng.integers(0, 64, (size, size, 3)), 0, 255)
    out = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(out, "JPEG", quality=90)
    return out.getvalue()


def post(client, *files: tuple[bytes, str], field: str = "file", headers=AUTH):
    data = {field: [(io.BytesIO(b), name) for b, name in files]}
    return client.post("/api/images", data=data, headers=headers)


def catalog_rows(coll: dict) -> list[tuple]:
    with sqlite3.connect(coll["catalog"]) as con:
        return con.execute("select id, path, status, sha256 from images order by id").fetchall()


def runs(coll: dict) -> list[tuple[str, str]]:
    with sqlite3.connect(coll["catalog"]) as con:
        return con.execute("select command, status from runs order by id").fetchall()


def stored(coll: dict) -> list[Path]:
    up = coll["uploads"]
    return sorted(p for p in up.rglob("*") if p.is_file()) if up.exists() else []


def verify_ok(coll: dict) -> None:
    from pipeline import api

    report = api.verify(catalog=coll["catalog"], index_dir=coll["index_dir"])
    assert report["ok"], report


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (a decompression bomb's), and no pixels."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b""))
        + chunk(b"IEND", b"")
    )


# ---- adding -------------------------------------------------------------------------------------


def test_add_an_image_then_find_it(coll):
    app = serve(coll)
    client = app.test_client()
    before = client.get("/api/info", headers=AUTH).get_json()["images"]["indexed"]
    data = jpeg(1)
    r = post(client, (data, "holiday.jpg"))
    assert r.status_code == 201, r.get_data(as_text=True)
    (image,) = r.get_json()["images"]
    assert image["name"] == "holiday.jpg" and image["status"] == "indexed" and image["created"]
    path = Path(image["path"])
    import hashlib

    sha = hashlib.sha256(data).hexdigest()
    assert path == coll["uploads"] / sha[:2] / f"{sha}.jpg" and path.read_bytes() == data
    # The running server sees the new generation: the new id is searchable at once.
    answer = client.post("/api/search", json={"id": image["id"], "k": 3}, headers=AUTH)
    assert answer.status_code == 200 and answer.get_json()["results"][0]["id"] == image["id"]
    r = client.post("/api/search", data={"image": (io.BytesIO(data), "q.jpg")}, headers=AUTH)
    assert r.get_json()["results"][0]["id"] == image["id"]
    assert client.get("/api/info", headers=AUTH).get_json()["images"]["indexed"] == before + 1
    assert runs(coll)[-1] == ("index", "done")  # the one indexing job, with its run row
    verify_ok(coll)


def test_approximate_indexes_stay_current(coll):
    """A built index is grown after each add and remove (as --update-indexes grows it), so
    a server whose searches name it keeps answering instead of a 409 (stale)."""
    import pipeline

    options = {k: coll[k] for k in ("catalog", "index_dir")}
    pipeline.build_index("ivf", factory="IVF2,Flat", params=["nprobe=2"], **options)
    client = serve(coll).test_client()
    image = post(client, (jpeg(20), "a.jpg")).get_json()["images"][0]
    r = client.post("/api/search", json={"id": image["id"], "k": 1, "index": "ivf"}, headers=AUTH)
    assert r.status_code == 200 and r.get_json()["results"][0]["id"] == image["id"]
    assert client.delete(f"/api/images/{image['id']}", headers=AUTH).status_code == 200
    r = client.post("/api/search", json={"id": 0, "k": 20, "index": "ivf"}, headers=AUTH)
    assert r.status_code == 200 and image["id"] not in [x["id"] for x in r.get_json()["results"]]
    verify_ok(coll)


def test_the_same_bytes_twice_are_the_same_image(coll):
    client = serve(coll).test_client()
    first = post(client, (jpeg(2), "a.jpg")).get_json()["images"][0]
    n_runs, rows = len(runs(coll)), catalog_rows(coll)
    r = post(client, (jpeg(2), "another-name.jpg"))
    assert r.status_code == 200, r.get_data(as_text=True)
    again = r.get_json()["images"][0]
    assert (again["id"], again["path"], again["created"]) == (first["id"], first["path"], False)
    assert len(stored(coll)) == 1 and catalog_rows(coll) == rows
    assert len(runs(coll)) == n_runs  # nothing to do: no job ran


def test_several_files_in_one_request_are_one_job(coll):
    client = serve(coll).test_client()
    n_runs = len(runs(coll))
    r = post(client, (jpeg(3), "x.jpg"), (jpeg(4), "y.jpg"), field="files")
    assert r.status_code == 201, r.get_data(as_text=True)
    images = r.get_json()["images"]
    assert [i["name"] for i in images] == ["x.jpg", "y.jpg"] and all(i["created"] for i in images)
    assert len({i["id"] for i in images}) == 2 and len(stored(coll)) == 2
    assert len(runs(coll)) == n_runs + 1
    verify_ok(coll)


def test_a_file_keeps_its_format_whatever_its_name(coll):
    """Stored with the extension of the format in its bytes (a phone's HEIC, AVIF, PNG),
    and indexed: a job of `cbir index` would find it again."""
    import pillow_heif

    pillow_heif.register_heif_opener()
    client = serve(coll).test_client()
    for fmt, suffix in (("PNG", ".png"), ("HEIF", ".heic"), ("AVIF", ".avif")):
        out = io.BytesIO()
        Image.open(io.BytesIO(jpeg(5))).save(out, fmt)
        r = post(client, (out.getvalue(), "photo.jpg"))  # the name says jpg
        assert r.status_code == 201, (fmt, r.get_data(as_text=True))
        (image,) = r.get_json()["images"]
        assert image["path"].endswith(suffix) and image["status"] == "indexed", image
    verify_ok(coll)


# ---- refused uploads: one line, nothing stored, the catalog as it was ----------------------------


HOSTILE = [
    (b"this is not an image", "x.jpg", "not an image"),
    (jpeg(6)[:300], "cut.jpg", "truncated"),
    (png_header(60_000, 60_000), "bomb.png", "decompression bomb"),
    (png_header(20_000, 10), "strip.png", "thinner"),
    (b"", "empty.jpg", "empty"),
    (b"not an image either", "../../../escape.jpg", "not an image"),
]


def test_hostile_uploads(coll):
    client = serve(coll).test_client()
    rows = catalog_rows(coll)
    for data, name, words in HOSTILE:
        r = post(client, (data, name))
        assert r.status_code == 400, (name, r.get_data(as_text=True))
        message = one_line_error(r, coll["tmp"])
        assert words in message, message
        assert stored(coll) == [] and catalog_rows(coll) == rows
    assert not list(coll["tmp"].parent.rglob("escape.jpg"))
    # A fine image under a name that climbs out: stored by its bytes, the name ignored.
    r = post(client, (jpeg(7), "../../../escape.jpg"))
    assert r.status_code == 201
    (image,) = r.get_json()["images"]
    assert Path(image["path"]).parent.parent == coll["uploads"]
    assert not list(coll["tmp"].parent.rglob("escape.jpg"))


def test_one_bad_file_refuses_the_whole_request(coll):
    client = serve(coll).test_client()
    rows = catalog_rows(coll)
    r = post(client, (jpeg(8), "good.jpg"), (b"GIF89a nonsense", "bad.gif"))
    assert r.status_code == 400 and "'bad.gif'" in one_line_error(r)
    assert stored(coll) == [] and catalog_rows(coll) == rows


def test_oversize_and_missing_and_too_many(coll):
    client = serve(coll, max_upload=50_000).test_client()
    r = post(client, (jpeg(9, size=600) + b"\0" * 60_000, "big.jpg"))
    assert r.status_code == 413 and "limit" in one_line_error(r)
    r = client.post("/api/images", data={}, headers=AUTH)
    assert r.status_code == 400 and "'file'" in one_line_error(r)
    r = post(client, *[(b"x", f"{i}.jpg") for i in range(33)])
    assert r.status_code == 400 and "at most 32" in one_line_error(r)
    assert stored(coll) == []


def test_a_format_cbir_does_not_index(coll):
    client = serve(coll).test_client()
    out = io.BytesIO()
    Image.open(io.BytesIO(jpeg(10))).resize((64, 64)).save(out, "ICO")
    r = post(client, (out.getvalue(), "icon.ico"))
    assert r.status_code == 400 and "ICO images are not indexed" in one_line_error(r)
    assert stored(coll) == []


# ---- removing -----------------------------------------------------------------------------------


def test_delete_keeps_the_file_by_default(coll):
    client = serve(coll).test_client()
    image = post(client, (jpeg(11), "a.jpg")).get_json()["images"][0]
    r = client.delete(f"/api/images/{image['id']}", headers=AUTH)
    assert r.status_code == 200, r.get_data(as_text=True)
    assert r.get_json() == {
        "id": image["id"], "path": image["path"], "label": None, "status": "removed",
        "file_deleted": False,
    }  # fmt: skip
    assert Path(image["path"]).exists()
    assert client.post("/api/search", json={"id": image["id"]}, headers=AUTH).status_code == 404
    assert image["id"] not in [i for i, *_ in catalog_rows(coll)]
    assert runs(coll)[-1] == ("remove", "done")
    assert client.delete(f"/api/images/{image['id']}", headers=AUTH).status_code == 404
    # A catalogued image that was never uploaded: removed from the catalog, file kept.
    other = catalog_rows(coll)[0]
    assert client.delete(f"/api/images/{other[0]}", headers=AUTH).status_code == 200
    assert Path(other[1]).exists()
    # Added again: the same bytes, kept on disk, indexed anew under a new id (never reused).
    again = post(client, (jpeg(11), "a.jpg"))
    assert again.status_code == 201 and again.get_json()["images"][0]["id"] > image["id"]
    verify_ok(coll)


def test_delete_files_deletes_only_inside_the_uploads_folder(coll):
    client = serve(coll, delete_files=True).test_client()
    image = post(client, (jpeg(12), "a.jpg")).get_json()["images"][0]
    r = client.delete(f"/api/images/{image['id']}", headers=AUTH)
    assert r.status_code == 200 and r.get_json()["file_deleted"] is True
    assert not Path(image["path"]).exists() and stored(coll) == []
    assert not Path(image["path"]).parent.exists()  # its empty subfolder went too
    other = catalog_rows(coll)[0]  # outside the uploads folder: never deleted
    r = client.delete(f"/api/images/{other[0]}", headers=AUTH)
    assert r.status_code == 200 and r.get_json()["file_deleted"] is False
    assert Path(other[1]).exists()
    verify_ok(coll)


def test_delete_files_never_reaches_out_through_links(coll):
    """Images catalogued through a link placed in the uploads folder: a linked file is
    unlinked (the link only), a file under a linked folder is outside: both targets stay."""
    import pipeline

    outside = coll["tmp"] / "outside"
    outside.mkdir()
    (outside / "a.jpg").write_bytes(jpeg(30))
    (outside / "b.jpg").write_bytes(jpeg(31))
    (coll["uploads"] / "zz").mkdir(parents=True)
    (coll["uploads"] / "zz" / "link.jpg").symlink_to(outside / "a.jpg")
    (coll["uploads"] / "dir").symlink_to(outside)
    options = {k: coll[k] for k in ("catalog", "index_dir")}
    linked = [str(coll["uploads"] / "zz" / "link.jpg"), str(coll["uploads"] / "dir" / "b.jpg")]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pipeline.api.models, "cached_embedder", fakes.cached)
        pipeline.index(linked, labels="none", **options)
    client = serve(coll, delete_files=True).test_client()
    ids = {path: i for i, path, *_ in catalog_rows(coll)}
    r = client.delete(f"/api/images/{ids[linked[0]]}", headers=AUTH)
    assert r.status_code == 200 and r.get_json()["file_deleted"] is True
    assert not os.path.lexists(linked[0]) and (outside / "a.jpg").read_bytes() == jpeg(30)
    r = client.delete(f"/api/images/{ids[linked[1]]}", headers=AUTH)
    assert r.status_code == 200 and r.get_json()["file_deleted"] is False
    assert (outside / "b.jpg").read_bytes() == jpeg(31)


def test_hostile_and_unknown_ids(coll):
    client = serve(coll).test_client()
    rows = catalog_rows(coll)
    # "%2f" is a "/": another route (none), so a 404 too.
    for raw, status in [("abc", 400), ("-1", 400), ("1.0", 400), ("99999999999999999999", 400),
                        ("\u0663", 400), ("0x10", 400), ("..", 400), (" 1", 400),
                        ("%2e%2e%2fx", 404), ("123456", 404)]:  # fmt: skip
        r = client.delete(f"/api/images/{raw}", headers=AUTH)
        assert r.status_code == status, (raw, r.get_data(as_text=True))
        one_line_error(r, coll["tmp"])
    assert catalog_rows(coll) == rows


# ---- the token, and servers that do not edit ------------------------------------------------------


def test_a_token_is_always_required(coll):
    from pipeline.errors import CbirError
    from pipeline.web.server import required_token, running

    app = serve(coll)
    client = app.test_client()
    rows = catalog_rows(coll)
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"}):
        assert post(client, (jpeg(13), "a.jpg"), headers=headers).status_code == 401
        assert client.delete("/api/images/1", headers=headers).status_code == 401
    # Over loopback, from a real server: still the token.
    with running(app, threads=2) as url:
        request = urllib.request.Request(url + "/api/images/1", method="DELETE")
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(request, timeout=30)
        assert e.value.code == 401
    assert catalog_rows(coll) == rows and stored(coll) == []
    # No server adds or removes images without a token, on loopback too.
    with pytest.raises(CbirError, match="--uploads needs a token"):
        required_token("127.0.0.1", None, False, uploads=True)
    assert required_token("127.0.0.1", "tok", False, uploads=True) == "tok"
    with pytest.raises(ValueError):
        serve(coll, token=None)


def test_serve_refuses_edits_without_a_token_in_one_line(tmp_path, monkeypatch):
    monkeypatch.delenv("CBIR_TOKEN", raising=False)
    where = ["--catalog", tmp_path / "none.db"]
    fakes.assert_refused(fakes.cli("serve", "--delete-files", *where), "needs --uploads DIR")
    r = fakes.cli("serve", "--uploads", tmp_path / "up", *where)
    fakes.assert_refused(r, "--uploads needs a token")
    assert not (tmp_path / "up").exists() and not (tmp_path / "none.db").exists()


def test_a_server_without_uploads_refuses_with_403(coll):
    client = serve(coll, uploads_to=None).test_client()
    rows = catalog_rows(coll)
    assert post(client, (jpeg(14), "a.jpg")).status_code == 403
    r = client.delete(f"/api/images/{rows[0][0]}", headers=AUTH)
    assert r.status_code == 403 and "--uploads" in one_line_error(r)
    assert catalog_rows(coll) == rows


# ---- one writer ---------------------------------------------------------------------------------


def test_another_writer_is_a_503_with_retry_after(coll):
    from pipeline.store import catalog

    client = serve(coll).test_client()
    rows = catalog_rows(coll)
    with catalog.write_lock(coll["catalog"]):  # as a `cbir index` in another process holds it
        r = post(client, (jpeg(15), "a.jpg"))
        assert r.status_code == 503 and r.headers["Retry-After"] == "1"
        assert "retry" in one_line_error(r, coll["tmp"])
        assert client.delete(f"/api/images/{rows[0][0]}", headers=AUTH).status_code == 503
    assert catalog_rows(coll) == rows
    assert post(client, (jpeg(15), "a.jpg")).status_code == 201  # once it is done


def test_the_write_queue_is_bounded():
    from pipeline.web.edit_routes import WriteQueue
    from pipeline.web.slots import Busy

    queue = WriteQueue(depth=2, wait_s=0.05)
    held, release = threading.Event(), threading.Event()

    def hold():
        with queue.turn():
            held.set()
            release.wait(10)

    t = threading.Thread(target=hold)
    t.start()
    held.wait(10)
    with pytest.raises(Busy), queue.turn():  # waited wait_s for the job, then gave up
        pass
    got: list[bool] = []

    def wait_turn():
        with queue.turn():
            got.append(True)

    queue.wait_s = 10.0
    waiter = threading.Thread(target=wait_turn)
    waiter.start()
    time.sleep(0.2)
    with pytest.raises(Busy), queue.turn():  # depth 2: one holds, one waits, a third: at once
        pass
    assert not got
    release.set()
    t.join()
    waiter.join()
    assert got == [True]  # the waiter had its turn when the holder was done


def test_searches_during_removals_answer_from_one_moment(coll):
    """Searches whose top 5 hold the images being removed: each answer comes from the
    catalog before a removal or after it, so it has 5 results (an index loaded before
    the commit with rows read after it gave 4: 31 of 1,667 answers before snapshots)."""
    app = serve(coll)
    client = app.test_client()
    order = client.post("/api/search", json={"id": 0, "k": 12}, headers=AUTH).get_json()
    neighbours = [r["id"] for r in order["results"][1:8]]
    done, counts = threading.Event(), {}

    def search() -> None:
        c = app.test_client()
        while not done.is_set():
            r = c.post("/api/search", json={"id": 0, "k": 5}, headers=AUTH)
            n = len(r.get_json()["results"]) if r.status_code == 200 else f"{r.status_code}"
            counts[n] = counts.get(n, 0) + 1

    threads = [threading.Thread(target=search) for _ in range(3)]
    for t in threads:
        t.start()
    for i in neighbours:
        assert client.delete(f"/api/images/{i}", headers=AUTH).status_code == 200
    done.set()
    for t in threads:
        t.join()
    assert set(counts) == {5}, counts


# ---- concurrent adds while others search, on waitress ----------------------------------------------


def _call(url: str, method: str, path: str, body: bytes | None, headers: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url + path, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def multipart(files: list[tuple[str, bytes]]) -> tuple[bytes, dict]:
    boundary = uuid.uuid4().hex
    parts = [
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        + data
        + b"\r\n"
        for name, data in files
    ]
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    return body, {**AUTH, "Content-Type": f"multipart/form-data; boundary={boundary}"}


def test_concurrent_adds_and_searches_on_waitress(coll):
    from pipeline.web.server import running

    app = serve(coll)
    old_ids = [i for i, *_ in catalog_rows(coll)]
    adders, per_adder = 3, 3
    added: list[dict] = []
    add_statuses: list[int] = []
    search_statuses: list[int] = []
    problems: list[str] = []
    done = threading.Event()
    started = time.monotonic()

    with running(app, threads=8) as url:

        def add(n: int) -> None:
            for j in range(per_adder):
                body, headers = multipart([(f"{n}-{j}.jpg", jpeg(100 + n * per_adder + j))])
                status, answer = _call(url, "POST", "/api/images", body, headers)
                add_statuses.append(status)
                if status == 201:
                    added.extend(answer["images"])
                else:
                    problems.append(f"add {status}: {answer}")

        def search(n: int) -> None:
            rng = np.random.default_rng(n)
            headers = {**AUTH, "Content-Type": "application/json"}
            while not done.is_set():
                body = json.dumps({"id": int(rng.choice(old_ids)), "k": 5}).encode()
                status, answer = _call(url, "POST", "/api/search", body, headers)
                search_statuses.append(status)
                if status != 200 or len(answer["results"]) != 5:
                    problems.append(f"search {status}: {answer}")

        searchers = [threading.Thread(target=search, args=(n,)) for n in range(3)]
        writers = [threading.Thread(target=add, args=(n,)) for n in range(adders)]
        for t in searchers + writers:
            t.start()
        for t in writers:
            t.join()
        done.set()
        for t in searchers:
            t.join()
        # Every add is there and found by the running server.
        for image in added:
            body = json.dumps({"id": image["id"], "k": 1}).encode()
            status, answer = _call(
                url, "POST", "/api/search", body, {**AUTH, "Content-Type": "application/json"}
            )
            assert status == 200 and answer["results"][0]["id"] == image["id"], answer
    print(
        f"\n{len(added)} adds and {len(search_statuses)} searches in "
        f"{time.monotonic() - started:.1f} s"
    )
    assert not problems, problems[:5]
    assert add_statuses == [201] * adders * per_adder
    assert len({i["id"] for i in added}) == adders * per_adder
    assert len(search_statuses) >= adders * per_adder
    rows = {i: status for i, _, status, _ in catalog_rows(coll)}
    assert all(rows[i["id"]] == "indexed" for i in added)
    verify_ok(coll)
