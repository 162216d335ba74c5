"""Adding and removing images over HTTP: `POST /api/images`, `DELETE /api/images/ID`.

Only on a server started with `--uploads DIR`, which needs a token: every request
to such a server carries it (`Authorization: Bearer`, or the login cookie), on a
loopback address too (pipeline/web/auth.py); any other server answers 403.

- POST /api/images: one or more files in the multipart fields `file`, `files` or
  `image`. Each is decoded first, within the server's decode slots, as an indexing
  job will decode it: if one is no image, truncated, too large in pixels or of a
  format cbir does not index, the request is a 400 naming it and nothing is written.
  Then they are stored under DIR by the sha256 of their bytes (never a name the
  client sent) and indexed as one job (`api.add_uploads`), with the server's loaded
  model. 201 with {"images": [{name, id, path, status, error, created}]} when any
  image is new, 200 when all were indexed already (the same bytes: the same id).
- DELETE /api/images/ID: the image's catalog row removed as one job
  (`api.remove_images`); its file is deleted only with `--delete-files`, and only
  when it lies inside DIR. 200 with {id, path, label, status, file_deleted}; 404 for
  an id not in the catalog, 400 for what is not an id.

Writes are serialised in this process (`WriteQueue`): one job at a time; up to
`depth` requests hold or wait for it, each up to `wait_s` seconds; past either, a
503 with Retry-After. A job of another process (`cbir index`) holding the catalog's
write lock is a 503 too. Searches keep answering meanwhile, from the catalog as it
was before the job's commit or after it (readers see a new generation whole).
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from flask import Flask, jsonify, request

from pipeline import api
from pipeline.api.session import MAX_ID
from pipeline.web.failures import BadRequest, Forbidden
from pipeline.web.service import Service
from pipeline.web.slots import Busy, decode_cost

FIELDS = ("file", "files", "image")
MAX_FILES = 32  # per request: one job each, so a request cannot hold the writer for long
WRITE_DEPTH = 4  # requests holding or waiting for the writer; the other threads search
WRITE_WAIT_S = 30.0
NO_EDITS = (
    "this server does not add or remove images: start `cbir serve` with --uploads DIR (and a token)"
)
WRITER_BUSY = "the server is busy adding or removing other images; retry in a moment"
_ID = re.compile(r"[0-9]{1,19}")


class WriteQueue:
    """One write job at a time in this process; at most `depth` requests hold or wait for
    it, each for up to `wait_s` seconds, so waiting writers never take every thread."""

    def __init__(self, depth: int = WRITE_DEPTH, wait_s: float = WRITE_WAIT_S):
        self.depth, self.wait_s = max(1, depth), wait_s
        self._job = threading.Lock()
        self._count = threading.Lock()
        self._queued = 0

    @contextmanager
    def turn(self) -> Iterator[None]:
        with self._count:
            if self._queued >= self.depth:
                raise Busy(WRITER_BUSY)
            self._queued += 1
        try:
            if not self._job.acquire(timeout=self.wait_s):
                raise Busy(WRITER_BUSY)
            try:
                yield
            finally:
                self._job.release()
        finally:
            with self._count:
                self._queued -= 1


def _sent() -> list[tuple[str, bytes]]:
    """(name, bytes) of every file sent in FIELDS; 400 if none, or too many."""
    found = [f for field in FIELDS for f in request.files.getlist(field)]
    if not found:
        raise BadRequest(f"no image: send files in the form field {FIELDS[0]!r}")
    if len(found) > MAX_FILES:
        raise BadRequest(f"{len(found)} files in one request; at most {MAX_FILES}")
    out = []
    for f in found:
        try:
            out.append((f.filename or "", f.read()))
        finally:
            f.close()
    return out


def image_id(text: str) -> int:
    """An id from a URL: ASCII digits, at most MAX_ID; anything else is a 400."""
    if not _ID.fullmatch(text) or int(text) > MAX_ID:
        raise BadRequest(f"an image id is a whole number from 0 to {MAX_ID}")
    return int(text)


def install(
    app: Flask,
    service: Service,
    uploads: Path | None,
    delete_files: bool = False,
    queue: WriteQueue | None = None,
) -> None:
    """The routes above; images are added and removed only with `uploads` (a folder)."""
    writer = queue or WriteQueue()
    where = {"catalog": str(service.settings.catalog), "index_dir": str(service.settings.index_dir)}

    @app.post("/api/images")
    def add_images():
        if uploads is None:
            raise Forbidden(NO_EDITS)
        session, max_pixels = service.session, service.settings.max_pixels
        checked = []
        for name, data in _sent():  # all checked before the writer is asked for
            with service.slots.hold(decode_cost(data, session.input_size)):
                checked.append(api.check_upload(name, data, max_pixels, session.decode_args))
        with writer.turn():
            done: list[dict[str, Any]] = api.add_uploads(
                checked, uploads, embedder=session.embedder, max_pixels=max_pixels, **where
            )
        response = jsonify({"images": done})
        response.status_code = 201 if any(d["created"] for d in done) else 200
        return response

    @app.delete("/api/images/<raw>")
    def remove_image(raw: str):
        if uploads is None:
            raise Forbidden(NO_EDITS)
        wanted = image_id(raw)
        with writer.turn():
            done = api.remove_images(
                [wanted], delete_files_in=uploads if delete_files else None, **where
            )
        return jsonify(done[0])
