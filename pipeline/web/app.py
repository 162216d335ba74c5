"""The Flask app: pages, thumbnails and the JSON API over one open collection.

Routes only read the request, call the service (which calls `api.search_in`,
as `cbir search` does) and render; errors become one line with the status of
their kind (pipeline/web/failures.py). Images are only ever served by catalog
id, never by a path the client names.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from flask import Flask, Response, jsonify, render_template, request, send_file
from markupsafe import Markup
from werkzeug.exceptions import HTTPException
from werkzeug.routing import IntegerConverter

from pipeline import api, files
from pipeline.api.session import Session
from pipeline.config import Settings
from pipeline.errors import NotFoundError
from pipeline.web import (
    auth,
    carry,
    dedup_routes,
    edit_routes,
    explain_routes,
    filter_form,
    params,
)
from pipeline.web.carry import CarriedQuery
from pipeline.web.failures import BadRequest, status_and_message
from pipeline.web.params import MAX_K, SearchParams
from pipeline.web.service import Service
from pipeline.web.slots import BUSY_WAIT_S, PIXEL_BUDGET, DecodeSlots, cores

PER_PAGE = 48
MAX_UPLOAD = 20 * 1024 * 1024
# "+verify": local-feature verification of the top verify_n, after the others.
RERANK_CHOICES = (
    *("", "dba", "aqe", "dba+aqe"),
    *("verify", "dba+verify", "aqe+verify", "dba+aqe+verify"),
)
TEMPLATES = Path(__file__).resolve().parents[1] / "templates"


class IdConverter(IntegerConverter):
    """A catalog id in a URL: ASCII digits only. Werkzeug's `int` matches `\\d`, which
    takes any script's digits ("/image/٣" was image 3)."""

    regex = r"[0-9]+"


def _printable(value: Any) -> Any:
    if isinstance(value, Markup):  # `|tojson`: already safe, and stays so (not escaped again)
        return Markup(files.shown(value))
    return files.shown(value) if isinstance(value, str) else value


def create_app(
    session: Session,
    settings: Settings,
    thumbs_dir: str | Path | None = None,
    max_upload: int = MAX_UPLOAD,
    token: str | None = None,
    pixel_budget: int = PIXEL_BUDGET,
    decode_slots: int | None = None,
    busy_wait_s: float = BUSY_WAIT_S,
    moves_to: str | Path | None = None,
    uploads_to: str | Path | None = None,
    delete_files: bool = False,
) -> Flask:
    """The web app over a session: an open collection and its loaded model (api.session).

    `settings` are the defaults of every search (k, index, rerank, ...); a
    request may choose others. With a `token`, every request must carry it.
    At most `decode_slots` (default: the cores) uploads or thumbnails are
    decoded and embedded at once, holding at most `pixel_budget` decoded
    pixels; a request waits up to `busy_wait_s` for its turn, then gets a 503.
    The model is warmed up and the default index loaded before this returns.
    Files are moved (the review page of duplicates) only with `moves_to`, a folder,
    and then only for requests that carry the token (so it needs one).
    Images are added and removed (`POST /api/images`, `DELETE /api/images/ID`) only
    with `uploads_to`, the folder uploads are stored in, and a token; their files are
    deleted only with `delete_files`, and only inside it (pipeline/web/edit_routes.py).
    """
    if moves_to is not None and not token:
        raise ValueError("moving files from the web needs a token")
    if uploads_to is not None and not token:
        raise ValueError("adding and removing images from the web needs a token")
    if delete_files and uploads_to is None:
        raise ValueError("deleting files from the web needs an uploads folder")
    slots = DecodeSlots(decode_slots or cores(), pixel_budget, busy_wait_s)
    service = Service(session, settings, slots, thumbs_dir)
    service.warm_up()
    app = Flask(__name__, template_folder=str(TEMPLATES))
    app.url_map.converters["id"] = IdConverter
    # A file name that is not UTF-8 (lone surrogates) cannot be encoded in a page;
    # pages show it with U+FFFD, JSON carries it losslessly as \udcXX escapes.
    app.jinja_options = {**app.jinja_options, "finalize": _printable}
    app.config["MAX_CONTENT_LENGTH"] = max_upload
    app.json.sort_keys = False  # keys in the order of `cbir search --json`
    app.extensions["cbir"] = service
    _errors(app, service, max_upload)
    auth.install(app, auth.TokenAuth(token) if token else None)
    _pages(app, service, max_upload)
    _api(app, service)
    dedup_routes.install(app, service, Path(moves_to).absolute() if moves_to else None)
    explain_routes.install(app, service)
    edit_routes.install(
        app, service, Path(uploads_to).absolute() if uploads_to else None, delete_files
    )
    return app


def _errors(app: Flask, service: Service, max_upload: int) -> None:
    def error_response(code: int, message: str) -> Response:
        """One line, in JSON under /api/ and as a page elsewhere; never a server folder."""
        message = service.redact(message)
        if code == 401 and not request.path.startswith("/api/"):
            return auth.login_page(message)
        if request.path.startswith("/api/"):
            response = jsonify({"error": message})
        else:
            html = render_template("error.html", code=code, message=message)
            response = Response(html, mimetype="text/html")
        response.status_code = code
        if code == 503:
            response.headers["Retry-After"] = "1"
        if code == 401:
            response.headers["WWW-Authenticate"] = 'Bearer realm="cbir"'
        return response

    @app.errorhandler(HTTPException)
    def http_error(e: HTTPException):
        message = e.description if e.code in (400, 404) else e.name
        if e.code == 413:
            message = f"upload too large: the limit is {max_upload:,} bytes"
        return error_response(e.code or 500, str(message))

    @app.errorhandler(Exception)
    def any_error(e: Exception):
        return error_response(*status_and_message(e))


def _upload() -> tuple[bytes, str] | None:
    """The file in the form field 'image', or None if none was sent."""
    f = request.files.get("image")
    if f is None or not f.filename:
        return None
    try:
        return f.read(), os.path.basename(f.filename)
    finally:
        f.close()  # the spooled copy goes now, not at the end of the request


NO_IMAGE = "no image: send a file in the form field 'image'"


def _results_page(
    service: Service,
    answer: dict[str, Any],
    chosen: SearchParams,
    query_src: str,
    image_id: int | None = None,
    carried: CarriedQuery | None = None,
) -> str:
    s = chosen.settings(service.settings)
    shown = {r["id"] for r in answer["results"]}
    return render_template(
        "results.html",
        answer=answer,
        query_src=query_src,
        image_id=image_id,
        carried=carried,
        k=s.k,
        max_k=MAX_K,
        index=s.index,
        indexes=service.index_names(),
        rerank=s.rerank,
        rerank_choices=RERANK_CHOICES,
        relevant=set(chosen.relevant),
        not_relevant=set(chosen.not_relevant),
        # Marks on results no longer shown still count: the form sends them again.
        kept_relevant=[i for i in chosen.relevant if i not in shown],
        kept_not_relevant=[i for i in chosen.not_relevant if i not in shown],
        **filter_form.fields(service, chosen),
    )


def _pages(app: Flask, service: Service, max_upload: int) -> None:
    s = service.settings

    @app.get("/")
    def browse():
        label = request.args.get("label", "")
        rows = service.browse_rows()
        labels = sorted({r["label"] for r in rows if r["label"] is not None})
        if label:
            rows = [r for r in rows if r["label"] == label]
        pages = max(1, -(-len(rows) // PER_PAGE))
        page = min(max(request.args.get("page", 1, type=int), 1), pages)
        return render_template(
            "browse.html", rows=rows[(page - 1) * PER_PAGE : page * PER_PAGE], labels=labels,
            label=label, page=page, pages=pages, total=len(rows), max_upload=max_upload,
            k=s.k, max_k=MAX_K, index=s.index, indexes=service.index_names(), rerank=s.rerank,
            rerank_choices=RERANK_CHOICES, **filter_form.fields(service),
        )  # fmt: skip

    @app.get("/image/<id:image_id>")
    def image_page(image_id: int):
        chosen = params.from_form(request.args)
        answer = service.search(image_id, chosen)
        return _results_page(service, answer, chosen, f"/thumb/{image_id}", image_id=image_id)

    @app.get("/image/<id:image_id>/full")
    def full_image(image_id: int):
        path = service.row(image_id)["path"]
        try:
            # Opened without blocking and checked on the descriptor: a file swapped for a
            # FIFO or a device after indexing cannot hang a worker.
            f = files.open_regular(path, "image", None)
        except (OSError, files.UnusableFile):
            raise NotFoundError(
                f"the file of image {image_id} is gone or not a regular file"
            ) from None
        # A name that is not UTF-8 cannot go into headers (or werkzeug's etag of the
        # path): send the open file, named as it is shown.
        name = files.shown(os.path.basename(path))
        return send_file(f, download_name=name, etag=False)

    @app.get("/thumb/<id:image_id>")
    def thumb(image_id: int):
        return send_file(service.thumb(image_id), mimetype="image/jpeg", max_age=86400)

    @app.post("/search")
    def search_form():
        # A new upload, or the query a results page carries for another round.
        sent = _upload()
        chosen = params.from_form(request.form)
        source = None  # the upload itself, kept only for --rerank verify's local features
        if sent is not None:
            carried = service.carry(sent[1], sent[0])
            source = sent[0] if service.verifies(chosen) else None
            del sent  # the upload is not needed while the search runs and the page renders
        else:
            carried = carry.from_form(request.form)
            if carried is None:
                raise BadRequest(NO_IMAGE)
        answer = service.search_carried(carried, chosen, source)
        src = f"data:image/jpeg;base64,{carried.thumb_b64}"
        return _results_page(service, answer, chosen, src, carried=carried)


def _api(app: Flask, service: Service) -> None:
    @app.post("/api/search")
    def api_search():
        if request.is_json:
            try:
                body = request.get_json(silent=True)
            except RecursionError:  # the stdlib parser recurses per level of nesting
                raise BadRequest("the JSON body is nested too deeply") from None
            image_id, chosen = params.from_json(body)
            return jsonify(service.search(image_id, chosen))
        sent = _upload()
        if sent is None:
            raise BadRequest(NO_IMAGE)
        chosen = params.from_form(request.form)
        return jsonify(service.search(api.Upload(sent[1], sent[0]), chosen))

    @app.get("/api/info")
    def api_info():
        return jsonify(service.info())
