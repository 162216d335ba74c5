"""Why a result matched its query (issue 21): `/api/explain`, `/explain.png`, `/explain`.

- `GET /api/explain?query=ID&id=ID`: `api.explain_in`'s JSON (the verified matches, the
  region, the homography, the heat map). `POST /api/explain` with `id` and the query as
  an upload (multipart field `image`) or as a results page carries it (`query_png`,
  pipeline/web/carry.py): the results page of an upload keeps no query on the server,
  so its "why?" buttons post the query the page already carries.
- `/explain.png?...&kind=matches|heat|overlay` (GET or POST as above): the side-by-side
  matches, the result under its heat map, or the heat map alone on a transparent PNG
  (what the results page lays over every thumbnail; it skips the local features).
- `/explain?...` (GET or POST): the page with both pictures and the counts.

Parameters are checked here (one-line 400); an unknown id is a 404. Each explanation
decodes the query and the result under the server's decode slots, as a search does.
"""

from __future__ import annotations

import base64
import re
from typing import Any

from flask import Flask, Response, jsonify, render_template, request

from pipeline import api
from pipeline.api.session import MAX_ID
from pipeline.web import carry
from pipeline.web.failures import BadRequest
from pipeline.web.service import Service
from pipeline.web.slots import decode_cost

KINDS = ("matches", "heat", "overlay")
PAGE_HEIGHT = 420  # pixels high of each picture on the page
_ID = re.compile(r"[0-9]{1,19}")
USAGE = "give id=ID of a result and query=ID (or POST the query image)"


def _id(value: Any, name: str) -> int:
    text = value.strip() if isinstance(value, str) else None
    if not text or not _ID.fullmatch(text) or int(text) > MAX_ID:
        raise BadRequest(f"{name} must be a catalog id (digits), got {str(value)[:40]!r}")
    return int(text)


def _query(fields: Any) -> api.Upload | int:
    """The query of a request: an id (`query`), an upload (`image`) or a carried query."""
    if request.method == "POST":
        f = request.files.get("image")
        if f is not None and f.filename:
            try:
                return api.Upload(f.filename.rsplit("/", 1)[-1][:255], f.read())
            finally:
                f.close()
        carried = carry.from_form(fields)
        if carried is not None:
            return carried.upload()
    if fields.get("query") is None:
        raise BadRequest(USAGE)
    return _id(fields.get("query"), "query")


def _explained(service: Service, matches: bool = True) -> api.Explanation:
    fields = request.form if request.method == "POST" else request.args
    if fields.get("id") is None:
        raise BadRequest(USAGE)
    image_id = _id(fields.get("id"), "id")
    query = _query(fields)
    cost = decode_cost(service.row(image_id)["path"])  # 404 for an id not indexed
    if isinstance(query, int):
        cost += decode_cost(service.row(query)["path"])
    else:
        cost += decode_cost(query.data)
    service.session.check_vectors()
    with service.slots.hold(cost):
        return service.session.explain(query, image_id, service.settings, matches=matches)


def _kind(fields: Any) -> str:
    kind = fields.get("kind", "matches")
    if kind not in KINDS:
        raise BadRequest(f"kind must be {', '.join(KINDS)}, got {str(kind)[:40]!r}")
    return kind


def _data_uri(png: bytes | None) -> str | None:
    return None if png is None else "data:image/png;base64," + base64.b64encode(png).decode()


def install(app: Flask, service: Service) -> None:
    methods = ["GET", "POST"]

    @app.route("/api/explain", methods=methods)
    def api_explain():
        return jsonify(_explained(service).data)

    @app.route("/explain.png", methods=methods)
    def explain_png():
        kind = _kind(request.form if request.method == "POST" else request.args)
        e = _explained(service, matches=kind == "matches")
        if kind == "matches":
            png = api.render_matches(e)
        else:
            png = api.render_heatmap(e, overlay_only=kind == "overlay")
        if png is None:
            raise BadRequest(f"no heat map: {e.data.get('heat_note') or e.data.get('note')}")
        return Response(png, mimetype="image/png", headers={"Cache-Control": "max-age=3600"})

    @app.route("/explain", methods=methods)
    def explain_page():
        e = _explained(service)
        return render_template(
            "explain.html",
            data=e.data,
            matches_src=_data_uri(api.render_matches(e, PAGE_HEIGHT)),
            result_src=_data_uri(api.render_result(e, PAGE_HEIGHT)),
            heat_src=_data_uri(api.render_heatmap(e, PAGE_HEIGHT)),
        )
