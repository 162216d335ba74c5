"""The review page of duplicates: /duplicates, its JSON, its CSV export and its moves.

- GET /duplicates: the page (pipeline/templates/duplicates*.html); it fetches
- GET /api/duplicates?include=&near=&similar=&index=&page=&per_page=: one page of
  groups of the report of `cbir duplicates --json`, with the totals of all of them;
- POST /duplicates/export: the moves a person chose (the default plan: all but each
  group's keeper; `move` and `keep` ids change it) as CSV, in the columns of
  `cbir duplicates --csv` (one writer: pipeline/api/dedup_export.py);
- POST /api/duplicates/move: the same choice carried out, only on a server started
  with `--allow-moves DIR` (which needs a token, so only a request carrying it, by
  header or by the login cookie, gets here); 403 on any other server.

Reports come from the session, which keeps the pairs across requests
(pipeline/api/dedup_cache.py): moving the threshold slider regroups in milliseconds.
Apart from app.py so that the search pages and these stay readable.
"""

from __future__ import annotations

import io
import os
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

from flask import Flask, Response, jsonify, render_template, request

from pipeline import api
from pipeline.web import dedup_params
from pipeline.web.dedup_params import MAX_PER_PAGE, DuplicateParams
from pipeline.web.failures import BadRequest, Forbidden
from pipeline.web.service import Service

EXPORT_NAME = "duplicates-moves.csv"
PER_PAGE_CHOICES = (10, 20, 50, 100)
NO_MOVES = (
    "this server does not move files: start `cbir serve` with --allow-moves DIR (and a token)"
)


def _report(service: Service, p: DuplicateParams) -> dict[str, Any]:
    return service.session.duplicates(**p.query())


def page_of(report: dict[str, Any], p: DuplicateParams) -> dict[str, Any]:
    """One page of the report's groups, with the totals of all groups.

    `to_move` counts the default plan (every image but the keepers); the page shows it
    and adds the person's own changes.
    """
    groups = report["groups"]
    pages = max(1, -(-len(groups) // p.per_page))
    page = min(p.page, pages)
    kinds = Counter(g["kind"] for g in groups)
    extra = [im for g in groups for im in g["images"] if not im["keeper"]]
    head = {k: v for k, v in report.items() if k != "groups"}
    return {
        **head,
        "total_groups": len(groups),
        "kinds": dict(sorted(kinds.items())),
        "to_move": {"images": len(extra), "bytes": sum(im["size"] or 0 for im in extra)},
        "page": page,
        "pages": pages,
        "per_page": p.per_page,
        "groups": groups[(page - 1) * p.per_page : page * p.per_page],
    }


def install(app: Flask, service: Service, moves_to: Path | None = None) -> None:
    """The routes above; files move only when `moves_to` is set (`--allow-moves DIR`)."""

    @app.get("/duplicates")
    def duplicates_page():
        p = dedup_params.from_args(request.args)  # a bad link is a 400 page, not a broken one
        return render_template(
            "duplicates.html",
            p=p,
            kind_names=api.KIND_NAMES,
            per_page_choices=sorted({*PER_PAGE_CHOICES, p.per_page}),
            max_per_page=MAX_PER_PAGE,
            can_move=moves_to is not None,
        )

    @app.get("/api/duplicates")
    def api_duplicates():
        p = dedup_params.from_args(request.args)
        return jsonify(page_of(_report(service, p), p))

    @app.post("/duplicates/export")
    def export_moves():
        p = dedup_params.from_args(request.form)
        move, keep = dedup_params.choices(request.form)
        report = _report(service, p)
        out = io.StringIO()
        api.write_duplicates_csv(report, out, only=api.chosen_moves(report, move, keep))
        return Response(
            out.getvalue(),
            mimetype="text/csv",
            headers={"Content-Disposition": f'attachment; filename="{EXPORT_NAME}"'},
        )

    @app.post("/api/duplicates/move")
    def move_chosen():
        if moves_to is None:
            raise Forbidden(NO_MOVES)
        p = dedup_params.from_args(request.form)
        move, keep = dedup_params.choices(request.form)
        report = _report(service, p)
        chosen = api.chosen_moves(report, move, keep)
        if not chosen:
            raise BadRequest("no image is chosen to move")
        try:
            done = _move(service, report, chosen, moves_to)
        finally:
            service.session.forget_duplicates()  # paths changed, even if only some moved
        return jsonify(done)


def _move(
    service: Service, report: dict[str, Any], chosen: set[int], moves_to: Path
) -> dict[str, Any]:
    """Move the chosen images into `moves_to` as `cbir duplicates --apply PLAN --move-to DIR`
    does: the page's choice is written as the plan CSV it exports, which the API's move
    checks row by row (each id must still name its path) and carries out under the
    one-writer lock, with its log for `cbir duplicates --undo LOG`.

    The answer names the log by its file name only: no server folder goes to a client
    (the person who started the server knows DIR)."""
    out = io.StringIO()
    api.write_duplicates_csv(report, out, only=chosen)
    fd, plan = tempfile.mkstemp(prefix="cbir-page-plan-", suffix=".csv")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(out.getvalue().encode("utf-8", "surrogateescape"))
        done = api.move_duplicates(
            str(moves_to), apply=plan,
            catalog=str(service.settings.catalog), index_dir=str(service.settings.index_dir),
        )  # fmt: skip
    finally:
        os.unlink(plan)
    return {
        "moved": done["moved"],
        "bytes": done["bytes"],
        "groups": done.get("groups", 0),
        "log": os.path.basename(done["log"]) if done["log"] else None,
        "finished": len(done["finished"]),
    }
