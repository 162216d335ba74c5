"""Adding and removing single images: what `POST /api/images` and `DELETE /api/images/ID` run.

`add_uploads` stores image bytes under a folder of the caller's (names made from
their sha256 and format: `ingest/uploads.py`; nothing of a client's name reaches
the disk) and indexes those files with `indexing.index`, the one indexing job
(its write lock, its run row, its crash-safe batches, the exact index rebuilt),
passing a model already loaded (a server's) instead of loading another. Every
upload is checked before any is stored. The same bytes again are the same file:
already indexed, nothing is written.

`remove_images` is a job of its own under the write lock: a `runs` row, the
catalog rows deleted in one transaction (their vectors stay in the vector file,
unreferenced, as after `index --prune`; ids are never reused), the exact index
rebuilt and the approximate ones grown to the catalog (as `index --update-indexes`
does), then, only when asked, the files deleted that lie inside a given folder.
A crash at any step leaves the catalog as before the job or as after it (the file
of a removed row may stay: it is then in no catalog, and the same bytes added
again are indexed anew).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from pipeline.api.building import update_indexes
from pipeline.api.indexing import index
from pipeline.api.models import descriptor_for, open_collection, settings_for
from pipeline.api.session import MAX_ID
from pipeline.config import Settings
from pipeline.embed.interface import Embedder
from pipeline.errors import CbirError, NotFoundError
from pipeline.ingest import moves, uploads
from pipeline.ingest.uploads import CheckedUpload, UploadRefused
from pipeline.store import reads, writes
from pipeline.store.collection import writing

MAX_NAME = 80  # characters of a client's file name told back in a message


def _named(name: str) -> str:
    """A client's file name as one short line (only ever shown, never a path)."""
    text = "".join(c if c.isprintable() else "?" for c in str(name or ""))
    return repr(text[:MAX_NAME] + ("..." if len(text) > MAX_NAME else ""))


def check_upload(
    name: str, data: bytes, max_pixels: int, decode: dict[str, Any] | None = None
) -> CheckedUpload:
    """Decode image bytes as an indexing job will (`decode`: the catalog's descriptor's
    arguments, size and crop); a CbirError in one line if they cannot be added."""
    try:
        return uploads.check(name, data, max_pixels, **(decode or {}))
    except UploadRefused as e:
        raise CbirError(f"cannot add {_named(name)}: {e}") from None


def _decode_args(s: Settings) -> dict[str, Any]:
    """How the catalog's descriptor decodes images (a new catalog: the settings')."""
    if not os.path.exists(s.catalog):
        return descriptor_for(s, None).decode
    coll = open_collection(s)
    try:
        return descriptor_for(s, coll).decode
    finally:
        coll.close()


def _rows(s: Settings, paths: list[str]) -> dict[str, dict[str, Any]]:
    if not os.path.exists(s.catalog):
        return {}
    coll = open_collection(s)
    try:
        return reads.by_paths(coll.db, paths)
    finally:
        coll.close()


def add_uploads(
    sent: Sequence[CheckedUpload | tuple[str, bytes]],
    folder: str | Path,
    embedder: Embedder | None = None,
    update: bool = True,
    config: str | None = None,
    **options: Any,
) -> list[dict[str, Any]]:
    """Store image bytes under `folder` and index them, in one job; one answer per upload:
    {"name", "id", "path", "status" ("indexed" or "failed"), "error", "created"} (created:
    False when the same bytes were indexed already: the same id, nothing written).

    `sent`: (name, bytes) pairs, or uploads `check_upload` checked already (a server
    decodes them within its memory budget). `embedder`: a loaded model to use (checked
    against the catalog), else the catalog's is loaded. `update` grows stale approximate
    indexes after the job. Uploads are labelled with no label.
    """
    if not sent:
        raise CbirError("no image to add")
    job = {
        **options,
        "labels": "none",  # the folder is the server's, not a class of images
        "prune": False,
        "retry_failed": True,
        "update_indexes": update,
    }
    if embedder is not None:
        job["batch_size"] = embedder.batch_size
    s = settings_for(config, **job)
    decode = None if all(isinstance(u, CheckedUpload) for u in sent) else _decode_args(s)
    checked = [
        u if isinstance(u, CheckedUpload) else check_upload(u[0], u[1], s.max_pixels, decode)
        for u in sent
    ]  # every upload checked before any is stored
    stored = [uploads.store(folder, u)[0] for u in checked]
    paths = list(dict.fromkeys(stored))
    before = _rows(s, paths)
    if any(before.get(p, {}).get("status") != "indexed" for p in paths):
        index(paths, config=config, embedder=embedder, **job)
    after = _rows(s, paths)
    answers = []
    for u, path in zip(checked, stored, strict=True):
        row = after[path]
        answers.append(
            {
                "name": u.name,
                "id": row["id"],
                "path": path,
                "status": row["status"],
                "error": row["error"],
                "created": before.get(path, {}).get("id") != row["id"],
            }
        )
    return answers


def _ids(ids: Iterable[Any]) -> list[int]:
    out = []
    for i in ids:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i <= MAX_ID:
            raise CbirError(f"an image id is a whole number from 0 to {MAX_ID}, not {i!r:.40}")
        out.append(int(i))
    if not out:
        raise CbirError("no image id to remove")
    return list(dict.fromkeys(out))


def remove_images(
    ids: Iterable[int],
    delete_files_in: str | Path | None = None,
    update: bool = True,
    config: str | None = None,
    **options: Any,
) -> list[dict[str, Any]]:
    """Remove images from the catalog by id, as one job (see the module docstring); one
    answer per id: {"id", "path", "label", "status" ("removed"), "file_deleted"}.

    An id not in the catalog is a NotFoundError and nothing changes. Files are never
    deleted unless `delete_files_in` names a folder, and then only those inside it.
    `update` grows stale approximate indexes after the job (removing the ids).
    """
    wanted = _ids(ids)
    s = settings_for(config, **options)
    with writing(s.catalog, s.index_dir, create=False) as coll:
        rows = reads.lookup(coll.db, wanted)
        if missing := [i for i in wanted if i not in rows]:
            raise NotFoundError(f"no image with id {missing[0]} in the catalog")
        config_row = {"ids": wanted, "delete_files": delete_files_in is not None}
        run_id = writes.start_run(coll.db, "remove", config_row)
        deleted: set[int] = set()
        try:
            writes.delete_rows(coll.db, wanted)
            moves.refresh_exact(coll)
            if update:
                update_indexes(coll)
            if delete_files_in is not None:
                deleted = {i for i in wanted if uploads.delete(rows[i]["path"], delete_files_in)}
        except BaseException:
            with contextlib.suppress(Exception):  # the first error is the one to tell
                writes.end_run(coll.db, run_id, "failed", {"removed": 0})
            raise
        counts = {"removed": len(wanted), "files_deleted": len(deleted)}
        writes.end_run(coll.db, run_id, "done", counts)
    return [
        {
            "id": i,
            "path": rows[i]["path"],
            "label": rows[i]["label"],
            "status": "removed",
            "file_deleted": i in deleted,
        }
        for i in wanted
    ]
