"""`cbir serve`: a demo web page and a JSON API over one collection.

The model and the catalog are opened once, when the app is created; each
request only decodes (an upload), embeds one image and searches. Images are
only ever served by catalog id, never by a path the client names.

Hardening: a job writing the catalog makes requests answer 503 ("busy; retry"),
never 500; an integrity failure is a 500 with its one-line message; no error
message names a server folder; decoding is bounded in count and in pixels, so
a burst of huge uploads cannot take the machine's memory.
"""

from __future__ import annotations

import base64
import ctypes
import importlib
import io
import logging
import os
import re
import sqlite3
import statistics
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from flask import Flask, Response, abort, jsonify, render_template, request, send_file
from PIL import Image, ImageOps
from werkzeug.exceptions import HTTPException

from pipeline import api, catalog, collection, errors, indexes, vectors
from pipeline.catalog import CatalogNotReady
from pipeline.decode import DecodeError, decode_bytes
from pipeline.embed import describe_mismatch, fingerprint_json
from pipeline.errors import CbirError

# The package exports a function named `search`; take the module itself.
search_mod = importlib.import_module("pipeline.search")

log = logging.getLogger("cbir")

PER_PAGE = 48
THUMB_SIZE = 256
MAX_UPLOAD = 20 * 1024 * 1024
MAX_K = 1000
MAX_ID = 2**62  # larger ids cannot be in SQLite; refuse them before asking
# Decoded pixels in flight at once: two images at the default max_pixels, about
# 0.7 GB as Pillow's 4-byte pixels. A larger image still runs, alone.
PIXEL_BUDGET = 2 * 89_478_485
TRIM_PIXELS = 1_000_000  # after a decode this large, freed memory goes back to the OS
BUSY_WAIT_S = 5.0  # how long a request waits for a decode slot before a 503
CATALOG_BUSY = "the catalog is busy (a job is writing or upgrading it); retry in a moment"


class BadRequest(Exception):
    """A client error: HTTP 400 with a one-line message."""


class Busy(Exception):
    """The server cannot serve this now: HTTP 503 with a one-line message; retry later."""


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))  # the cores this process may use (containers)
    except AttributeError:
        return os.cpu_count() or 1


def _malloc_trim() -> Any:
    """glibc's malloc_trim, or None: returns freed heap pages of every arena to the OS."""
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None


_TRIM = _malloc_trim()


class DecodeSlots:
    """At most `slots` decodes (and embeds) at once and `pixels` decoded pixels in flight.

    A request waits up to `wait_s` for its turn, then gets a 503; an image
    larger than the whole budget waits until it can run alone.
    """

    def __init__(self, slots: int, pixels: int, wait_s: float = BUSY_WAIT_S):
        self.slots, self.pixels, self.wait_s = max(1, slots), max(1, pixels), wait_s
        self._cond = threading.Condition()
        self._running = 0
        self._used = 0

    @contextmanager
    def hold(self, pixels: int) -> Iterator[None]:
        cost = min(max(0, pixels), self.pixels)  # an image over the whole budget runs alone

        def free() -> bool:
            return self._running < self.slots and self._used + cost <= self.pixels

        with self._cond:
            if not self._cond.wait_for(free, timeout=self.wait_s):
                raise Busy("the server is busy decoding other images; retry in a moment")
            self._running += 1
            self._used += cost
        try:
            yield
        finally:
            with self._cond:
                self._running -= 1
                self._used -= cost
                self._cond.notify_all()
            # Freed image buffers stay in this thread's malloc arena, where no other
            # thread reuses them: give them back now (about a millisecond).
            if cost >= TRIM_PIXELS and _TRIM is not None:
                _TRIM(0)


def decode_cost(src: bytes | str) -> int:
    """Pixels Pillow will hold to decode `src` (bytes or a path), read from its header.

    JPEG decodes at 1/2, 1/4 or 1/8 scale (draft), as decode_bytes and
    thumbnail_bytes ask, so a huge JPEG costs little. 0 for what cannot be
    opened: decoding fails before any pixel is made.
    """
    try:
        with Image.open(io.BytesIO(src) if isinstance(src, bytes) else src) as im:
            w, h = im.size
            if im.format == "JPEG" and min(w, h) > 0:
                scale = THUMB_SIZE / min(w, h)
                im.draft("RGB", (int(w * scale) + 1, int(h * scale) + 1))
                w, h = im.size
            return w * h
    except Exception:  # any header Pillow cannot read: decode_bytes says why
        return 0


# Any absolute path: the folders before its last component.
_ABS_DIRS = re.compile(r"(?<![\w.~:/-])/(?:[^\s/'\"]+/)+(?=[^\s/'\"])")


class Redactor:
    """Takes the server's folders out of messages: a file keeps its name, a folder its last part."""

    def __init__(self, folders: Iterable[str | Path]):
        forms = set()
        for f in folders:
            for p in (str(f), os.path.abspath(f), os.path.realpath(f)):
                if os.path.isabs(p) and p.rstrip(os.sep):
                    forms.add(p.rstrip(os.sep))
        # Longest first, so a folder inside another is not cut in half.
        self._forms = [
            (re.compile(re.escape(f) + r"(/|(?=[\s'\":;,)]|$))"), os.path.basename(f))
            for f in sorted(forms, key=len, reverse=True)
        ]

    def __call__(self, message: str) -> str:
        for form, name in self._forms:
            message = form.sub(lambda m, name=name: "" if m.group(1) else name, message)
        message = _ABS_DIRS.sub("", message)  # any other absolute path: its file name only
        return " ".join(message.split()) or "error"


def thumbnail_bytes(data_or_path: bytes | str, max_pixels: int) -> bytes:
    """A JPEG of at most THUMB_SIZE px a side: EXIF orientation applied, RGB."""
    src = io.BytesIO(data_or_path) if isinstance(data_or_path, bytes) else data_or_path
    with Image.open(src) as im:
        if im.size[0] * im.size[1] > max_pixels:
            raise DecodeError("image is over the max_pixels limit")
        im.draft("RGB", (THUMB_SIZE, THUMB_SIZE))
        # In place, and no conversion of what is RGB already: a large image is held
        # once, not three times (each copy of a 9000x9000 image is 324 MB).
        ImageOps.exif_transpose(im, in_place=True)
        if im.mode != "RGB":
            im = im.convert("RGB")
        im.thumbnail((THUMB_SIZE, THUMB_SIZE))
        out = io.BytesIO()
        im.save(out, "JPEG", quality=85)
    return out.getvalue()


class Collection:
    """The catalog, the model and the loaded indexes of one running server."""

    def __init__(
        self,
        settings: dict[str, Any],
        thumbs_dir: str | Path | None = None,
        slots: DecodeSlots | None = None,
    ):
        self.s = api.settings_for(**settings)
        self.path = str(self.s["catalog"])
        self.thumbs = Path(thumbs_dir or Path(self.path).with_suffix(".thumbs"))
        self.slots = slots or DecodeSlots(_cores(), PIXEL_BUDGET)
        folders = [Path(self.path).parent, vectors.vectors_path(self.path).parent]
        self.redact = Redactor([*folders, self.s["index_dir"], self.thumbs])
        self._local = threading.local()
        self._lock = threading.Lock()  # the index cache
        self._model_lock = threading.Lock()  # one forward pass at a time through the shared model
        self._indexes: dict[tuple[str, int], tuple[Any, dict[str, float]]] = {}
        self._rows: tuple[int, list[dict[str, Any]]] = (-1, [])
        db = self.db()
        if not catalog.dimension(db):
            raise CbirError(f"catalog {self.path} has no indexed images yet")
        # One image per query: a batch of 1, not a batch padded to 32.
        self.embedder = api.cached_embedder(api.weights_for(self.s), 1, api.pooling_for(self.s))
        stored = catalog.fingerprint(db)
        if stored and fingerprint_json(stored) != fingerprint_json(self.embedder.fingerprint):
            raise CbirError(
                "the query model differs from the one that built the catalog "
                f"({describe_mismatch(stored, self.embedder.fingerprint)}); pass the catalog's --weights"
            )
        self.embedder.embed(np.zeros((1, 224, 224, 3), np.uint8))  # trace the graph now
        try:
            self.index(self.s["index"])
        except Busy as e:  # a stale default index: `cbir serve` says so and stops
            raise CbirError(str(e)) from None

    def db(self):
        """One SQLite connection per thread (sqlite3 objects stay in their thread)."""
        if getattr(self._local, "db", None) is None:
            self._local.db = collection.open_reader(self.path)
        return self._local.db

    def index(self, name: str):
        """(index, search parameters) for a name, loaded once per catalog generation."""
        db = self.db()
        key = (name, catalog.generation(db))
        with self._lock:
            if key not in self._indexes:
                record = catalog.index_record(db, name)
                if name != indexes.EXACT and record is None:
                    raise BadRequest(f"no index named {name!r}")
                if name != indexes.EXACT and record["generation"] != key[1]:
                    # Not the client's fault: a job changed the catalog, and only 'exact'
                    # is refreshed by 'cbir index'; the index serves again once rebuilt.
                    raise Busy(
                        f"index {name!r} is out of date (the catalog changed after it was "
                        f"built); retry after 'cbir build-index {name}'"
                    )
                self._indexes = {k: v for k, v in self._indexes.items() if k[1] == key[1]}
                # Checked against this generation above: a commit since then is the next one's.
                idx, _, in_force = indexes.load(
                    db, self.path, self.s["index_dir"], name, allow_stale=True
                )
                self._indexes[key] = (idx, in_force)
            return self._indexes[key]

    def rows(self) -> list[dict[str, Any]]:
        """Indexed images (id, path, label) in id order, re-read when the catalog changes."""
        db = self.db()
        gen = catalog.generation(db)
        if self._rows[0] != gen:
            found = catalog.lookup(db, catalog.indexed_ids(db))
            self._rows = (gen, [found[i] for i in sorted(found)])
        return self._rows[1]

    def row(self, image_id: int) -> dict[str, Any]:
        """The catalog row of an indexed id, or 404."""
        if not 0 <= image_id < MAX_ID:
            abort(404, f"no indexed image with id {image_id}")
        row = catalog.lookup(self.db(), [image_id]).get(image_id)
        if row is None or row["status"] != "indexed":
            abort(404, f"no indexed image with id {image_id}")
        return row

    def search(self, vec: np.ndarray, k: int, index_name: str) -> list[dict[str, Any]]:
        idx, in_force = self.index(index_name)
        how = search_mod.rerank_from(self.s)
        refine = int(in_force.get("refine", 1))
        return search_mod.search_vectors(self.db(), self.path, idx, vec[None], k, how, refine)[0]

    def search_id(self, image_id: int, k: int, index_name: str) -> dict[str, Any]:
        row = self.row(image_id)
        vec = search_mod.catalog_lookup(self.db(), self.path)([image_id])[0]
        return {
            "query": row["path"],
            "query_id": image_id,
            "results": self.search(vec, k, index_name),
        }

    def search_bytes(self, data: bytes, name: str, k: int, index_name: str) -> dict[str, Any]:
        with self.slots.hold(decode_cost(data)):
            try:
                pixels = decode_bytes(data, int(self.s["max_pixels"])).pixels
            except DecodeError as e:
                raise BadRequest(f"cannot use the uploaded image: {e}") from None
            with self._model_lock:
                vec = self.embedder.embed(pixels[None])[0]
        return {"query": name, "query_id": None, "results": self.search(vec, k, index_name)}

    def upload_thumbnail(self, data: bytes) -> bytes:
        """The JPEG thumbnail of an upload (already decoded once, so known to be good)."""
        with self.slots.hold(decode_cost(data)):
            return thumbnail_bytes(data, int(self.s["max_pixels"]))

    def thumb(self, image_id: int) -> Path:
        """The cached thumbnail of an indexed id, made on first request."""
        row = self.row(image_id)
        out = self.thumbs / f"{image_id}.jpg"
        if not out.exists():
            try:
                with self.slots.hold(decode_cost(row["path"])):
                    data = thumbnail_bytes(row["path"], int(self.s["max_pixels"]))
            except (OSError, DecodeError, ValueError, SyntaxError):
                abort(404, f"image {image_id} cannot be read any more")
            self.thumbs.mkdir(parents=True, exist_ok=True)
            tmp = out.with_name(f".{out.name}.{uuid.uuid4().hex}")
            tmp.write_bytes(data)
            os.replace(tmp, out)
        return out

    def index_names(self) -> list[str]:
        return [indexes.EXACT] + [
            r["name"] for r in catalog.index_records(self.db()) if r["name"] != indexes.EXACT
        ]

    def info(self) -> dict[str, Any]:
        """`cbir info`; a file a job replaces between two looks of it is a busy catalog."""
        for _ in range(3):
            try:
                return api.info(catalog=self.path, index_dir=self.s["index_dir"])
            except FileNotFoundError:
                time.sleep(0.05)
        raise Busy(CATALOG_BUSY)


def _k(value: Any) -> int:
    try:
        k = int(value)
    except (TypeError, ValueError, OverflowError):  # OverflowError: 1e400 is JSON infinity
        raise BadRequest("k must be an integer") from None
    if not 1 <= k <= MAX_K or isinstance(value, bool | float):
        raise BadRequest(f"k must be an integer from 1 to {MAX_K}")
    return k


def _json_body() -> Any:
    """The request's JSON, or None when it is not valid JSON."""
    try:
        return request.get_json(silent=True)
    except RecursionError:  # the stdlib parser recurses per level of nesting
        raise BadRequest("the JSON body is nested too deeply") from None


def _wants_json() -> bool:
    return request.path.startswith("/api/")


def _status_and_message(e: Exception) -> tuple[int, str]:
    """HTTP status and one-line message for an error raised while serving."""
    if isinstance(e, BadRequest):
        return 400, str(e)
    if isinstance(e, Busy):
        return 503, str(e)
    if isinstance(e, CatalogNotReady):
        return 503, CATALOG_BUSY
    if isinstance(e, CbirError) and e.exit_code != 1:
        return 400, str(e)
    if isinstance(e, sqlite3.OperationalError) and re.search(r"locked|busy", str(e)):
        return 503, CATALOG_BUSY
    # A failed integrity check, a full disk, a damaged catalog: the server's side, not the client's.
    known = str(e) if isinstance(e, CbirError) else errors.describe(e)
    if known:
        log.error("cbir serve: %s", known)
        return 500, known
    log.exception("cbir serve: unexpected error")  # a bug: the traceback goes to the log
    return 500, f"internal error ({type(e).__name__}); the server log has the details"


def _printable(value: Any) -> Any:
    return catalog.shown(value) if isinstance(value, str) else value


def create_app(
    settings: dict[str, Any],
    thumbs_dir: str | Path | None = None,
    max_upload: int = MAX_UPLOAD,
    pixel_budget: int = PIXEL_BUDGET,
    decode_slots: int | None = None,
    busy_wait_s: float = BUSY_WAIT_S,
) -> Flask:
    """The Flask app over the collection that `settings` name (catalog, index_dir, weights, ...).

    At most `decode_slots` (default: the cores) uploads or thumbnails are decoded
    and embedded at once, holding at most `pixel_budget` decoded pixels; a
    request waits up to `busy_wait_s` for its turn, then gets a 503.
    """
    slots = DecodeSlots(decode_slots or _cores(), pixel_budget, busy_wait_s)
    coll = Collection(settings, thumbs_dir, slots)
    app = Flask(__name__)
    # A file name that is not UTF-8 (lone surrogates) cannot be encoded in a page;
    # pages show it with U+FFFD, JSON carries it losslessly as \udcXX escapes.
    app.jinja_options = {**app.jinja_options, "finalize": _printable}
    app.config["MAX_CONTENT_LENGTH"] = max_upload
    app.json.sort_keys = False  # keys in the order of `cbir search --json`
    app.extensions["cbir"] = coll

    def error_response(code: int, message: str) -> Response:
        """One line, in JSON under /api/ and as a page elsewhere; never a server folder."""
        message = coll.redact(message)
        if _wants_json():
            response = jsonify({"error": message})
        else:
            response = Response(
                render_template("error.html", code=code, message=message), mimetype="text/html"
            )
        response.status_code = code
        if code == 503:
            response.headers["Retry-After"] = "1"
        return response

    @app.errorhandler(HTTPException)
    def http_error(e: HTTPException):
        message = e.description if e.code in (400, 404) else e.name
        if e.code == 413:
            message = f"upload too large: the limit is {max_upload:,} bytes"
        return error_response(e.code or 500, str(message))

    @app.errorhandler(Exception)
    def any_error(e: Exception):
        return error_response(*_status_and_message(e))

    def upload() -> tuple[bytes, str]:
        f = request.files.get("image")
        if f is None or not f.filename:
            raise BadRequest("no image: send a file in the form field 'image'")
        try:
            return f.read(), os.path.basename(f.filename)
        finally:
            f.close()  # the spooled copy goes now, not at the end of the request

    def results_page(answer: dict[str, Any], index_name: str, query_src: str, **extra):
        return render_template(
            "results.html",
            answer=answer,
            index=index_name,
            indexes=coll.index_names(),
            query_src=query_src,
            **extra,
        )

    @app.get("/")
    def browse():
        label = request.args.get("label", "")
        rows = coll.rows()
        labels = sorted({r["label"] for r in rows if r["label"] is not None})
        if label:
            rows = [r for r in rows if r["label"] == label]
        pages = max(1, -(-len(rows) // PER_PAGE))
        page = min(max(request.args.get("page", 1, type=int), 1), pages)
        shown = rows[(page - 1) * PER_PAGE : page * PER_PAGE]
        return render_template(
            "browse.html", rows=shown, labels=labels, label=label, page=page, pages=pages,
            total=len(rows), max_upload=max_upload,
        )  # fmt: skip

    @app.get("/image/<int:image_id>")
    def image_page(image_id: int):
        index_name = request.args.get("index") or coll.s["index"]
        answer = coll.search_id(image_id, _k(request.args.get("k", 10)), index_name)
        return results_page(answer, index_name, f"/thumb/{image_id}", image_id=image_id)

    @app.get("/image/<int:image_id>/full")
    def full_image(image_id: int):
        path = coll.row(image_id)["path"]
        if not os.path.isfile(path):
            abort(404, f"the file of image {image_id} is gone")
        # A name that is not UTF-8 cannot go into headers (or werkzeug's etag of the
        # path): send the open file, named as it is shown.
        name = catalog.shown(os.path.basename(path))
        return send_file(open(path, "rb"), download_name=name, etag=False)  # noqa: SIM115

    @app.get("/thumb/<int:image_id>")
    def thumb(image_id: int):
        return send_file(coll.thumb(image_id), mimetype="image/jpeg", max_age=86400)

    @app.post("/search")
    def search_form():
        index_name = request.form.get("index") or coll.s["index"]
        data, name = upload()
        answer = coll.search_bytes(data, name, _k(request.form.get("k", 10)), index_name)
        thumb_b64 = base64.b64encode(coll.upload_thumbnail(data)).decode()
        del data  # the upload is not needed while the page renders
        return results_page(answer, index_name, f"data:image/jpeg;base64,{thumb_b64}")

    @app.post("/api/search")
    def api_search():
        if request.is_json:
            body = _json_body()
            if not isinstance(body, dict):
                raise BadRequest('the JSON body must be an object like {"id": 12}')
            image_id = body.get("id")
            if not isinstance(image_id, int) or isinstance(image_id, bool):
                raise BadRequest("id must be an integer catalog id")
            k, index_name = _k(body.get("k", 10)), str(body.get("index") or coll.s["index"])
            return jsonify(coll.search_id(image_id, k, index_name))
        data, name = upload()
        k, index_name = _k(request.form.get("k", 10)), request.form.get("index") or coll.s["index"]
        return jsonify(coll.search_bytes(data, name, k, index_name))

    @app.get("/api/info")
    def api_info():
        return jsonify(coll.info())

    return app


def bench_upload(settings: dict[str, Any], images: list[str], n: int = 30) -> dict[str, Any]:
    """Median milliseconds from POSTing an image to /api/search to its JSON, over real HTTP."""
    import logging

    from werkzeug.serving import make_server

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request
    server = make_server("127.0.0.1", 0, create_app(settings), threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_port}/api/search"
    times = []
    try:
        for i in range(n + 1):
            path = images[i % len(images)]
            boundary = uuid.uuid4().hex
            body = (
                (
                    f'--{boundary}\r\nContent-Disposition: form-data; name="image"; '
                    f'filename="{os.path.basename(path)}"\r\nContent-Type: image/jpeg\r\n\r\n'
                ).encode()
                + Path(path).read_bytes()
                + f"\r\n--{boundary}--\r\n".encode()
            )
            req = urllib.request.Request(url, data=body, method="POST")
            req.add_header("Content-Type", f"multipart/form-data; boundary={boundary}")
            start = time.perf_counter()
            with urllib.request.urlopen(req) as r:
                r.read()
            if i:  # the first request warms connections and caches
                times.append((time.perf_counter() - start) * 1000)
    finally:
        server.shutdown()
    return {
        "uploads": len(times),
        "median_ms": round(statistics.median(times), 1),
        "p90_ms": round(sorted(times)[int(0.9 * (len(times) - 1))], 1),
        "min_ms": round(min(times), 1),
    }
