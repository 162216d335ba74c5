"""`cbir serve`: a demo web page and a JSON API over one collection.

The model and the catalog are opened once, when the app is created; each
request only decodes (an upload), embeds one image and searches. Images are
only ever served by catalog id, never by a path the client names.
"""

from __future__ import annotations

import base64
import importlib
import io
import os
import statistics
import threading
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import numpy as np
from flask import Flask, abort, jsonify, render_template, request, send_file
from PIL import Image, ImageOps
from werkzeug.exceptions import HTTPException

from pipeline import api, catalog, collection, indexes
from pipeline.decode import DecodeError, decode_bytes
from pipeline.embed import describe_mismatch, fingerprint_json
from pipeline.errors import CbirError

# The package exports a function named `search`; take the module itself.
search_mod = importlib.import_module("pipeline.search")

PER_PAGE = 48
THUMB_SIZE = 256
MAX_UPLOAD = 20 * 1024 * 1024
MAX_K = 1000
MAX_ID = 2**62  # larger ids cannot be in SQLite; refuse them before asking


class BadRequest(Exception):
    """A client error: HTTP 400 with a one-line message."""


def thumbnail_bytes(data_or_path: bytes | str, max_pixels: int) -> bytes:
    """A JPEG of at most THUMB_SIZE px a side: EXIF orientation applied, RGB."""
    src = io.BytesIO(data_or_path) if isinstance(data_or_path, bytes) else data_or_path
    with Image.open(src) as im:
        if im.size[0] * im.size[1] > max_pixels:
            raise DecodeError("image is over the max_pixels limit")
        im.draft("RGB", (THUMB_SIZE, THUMB_SIZE))
        im = ImageOps.exif_transpose(im).convert("RGB")
        im.thumbnail((THUMB_SIZE, THUMB_SIZE))
        out = io.BytesIO()
        im.save(out, "JPEG", quality=85)
    return out.getvalue()


class Collection:
    """The catalog, the model and the loaded indexes of one running server."""

    def __init__(self, settings: dict[str, Any], thumbs_dir: str | Path | None = None):
        self.s = api.settings_for(**settings)
        self.path = str(self.s["catalog"])
        self.thumbs = Path(thumbs_dir or Path(self.path).with_suffix(".thumbs"))
        self._local = threading.local()
        self._lock = threading.Lock()
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
        self.index(self.s["index"])

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
                if name != indexes.EXACT and catalog.index_record(db, name) is None:
                    raise BadRequest(f"no index named {name!r}")
                self._indexes = {k: v for k, v in self._indexes.items() if k[1] == key[1]}
                idx, _, in_force = indexes.load(db, self.path, self.s["index_dir"], name)
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
        try:
            pixels = decode_bytes(data, int(self.s["max_pixels"])).pixels
        except DecodeError as e:
            raise BadRequest(f"cannot use the uploaded image: {e}") from None
        with self._lock:  # one forward pass at a time through the shared model
            vec = self.embedder.embed(pixels[None])[0]
        return {"query": name, "query_id": None, "results": self.search(vec, k, index_name)}

    def thumb(self, image_id: int) -> Path:
        """The cached thumbnail of an indexed id, made on first request."""
        row = self.row(image_id)
        out = self.thumbs / f"{image_id}.jpg"
        if not out.exists():
            try:
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


def _k(value: Any) -> int:
    try:
        k = int(value)
    except (TypeError, ValueError):
        raise BadRequest("k must be an integer") from None
    if not 1 <= k <= MAX_K or isinstance(value, bool | float):
        raise BadRequest(f"k must be an integer from 1 to {MAX_K}")
    return k


def _wants_json() -> bool:
    return request.path.startswith("/api/")


def create_app(
    settings: dict[str, Any],
    thumbs_dir: str | Path | None = None,
    max_upload: int = MAX_UPLOAD,
) -> Flask:
    """The Flask app over the collection that `settings` name (catalog, index_dir, weights, ...)."""
    coll = Collection(settings, thumbs_dir)
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = max_upload
    app.json.sort_keys = False  # keys in the order of `cbir search --json`
    app.extensions["cbir"] = coll

    @app.errorhandler(HTTPException)
    def http_error(e: HTTPException):
        message = e.description if e.code in (400, 404) else e.name
        if e.code == 413:
            message = f"upload too large: the limit is {max_upload:,} bytes"
        if _wants_json():
            return jsonify({"error": message}), e.code
        return render_template("error.html", code=e.code, message=message), e.code

    @app.errorhandler(BadRequest)
    @app.errorhandler(CbirError)
    def bad_request(e: Exception):
        if _wants_json():
            return jsonify({"error": str(e)}), 400
        return render_template("error.html", code=400, message=str(e)), 400

    def upload() -> tuple[bytes, str]:
        f = request.files.get("image")
        if f is None or not f.filename:
            raise BadRequest("no image: send a file in the form field 'image'")
        return f.read(), os.path.basename(f.filename)

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
        return send_file(os.path.abspath(path))

    @app.get("/thumb/<int:image_id>")
    def thumb(image_id: int):
        return send_file(coll.thumb(image_id), mimetype="image/jpeg", max_age=86400)

    @app.post("/search")
    def search_form():
        index_name = request.form.get("index") or coll.s["index"]
        data, name = upload()
        answer = coll.search_bytes(data, name, _k(request.form.get("k", 10)), index_name)
        thumb_b64 = base64.b64encode(thumbnail_bytes(data, int(coll.s["max_pixels"]))).decode()
        return results_page(answer, index_name, f"data:image/jpeg;base64,{thumb_b64}")

    @app.post("/api/search")
    def api_search():
        if request.is_json:
            body = request.get_json(silent=True)
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
        return jsonify(api.info(catalog=coll.path, index_dir=coll.s["index_dir"]))

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
