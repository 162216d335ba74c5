"""Moving the copies of duplicate groups out of a collection, and undoing it: the job.

cbir never deletes a user's file: `cbir duplicates --move-to DIR` moves images (by
default every image of each group but its suggested keeper) into DIR, and `cbir
duplicates --undo LOG` puts them back, byte for byte, with their catalog rows.

Where they go. DIR/REL, where REL is the image's path relative to BASE, the longest
common parent folder of every image path in the catalog when the move is planned
(recorded in the log, so a rerun uses the same). DIR must not be inside BASE (a
later `cbir index` of the collection would find the moved files again); when BASE
is the filesystem root (a catalog of unrelated trees), DIR must not be inside a
folder that holds a catalogued image.

Refused in one line before anything moves (exit 2): a destination that exists; an
image changed since it was indexed (its size, or both its mtime and its sha256,
differ from its row; the sha256 settles a time that a filesystem with coarser times
rounded); a plan row whose id is in the catalog under another path; DIR inside the
collection. Left in place with a one-line notice: images whose file is missing,
symbolic links (moving a link frees nothing), plan rows no longer in the catalog
(moved already). The same checks guard an undo and the finishing of a move: a file
changed in DIR, or another file where one goes back, is one line, nothing changed.

The plan CSV (`--plan FILE` writes it, `--apply FILE --move-to DIR` carries it out,
the review page of `cbir serve` exports it): the columns of `cbir duplicates --csv`
(pipeline/api/dedup_export.py: group, kind, keeper, id, score, width, height, size,
date, path), one row per image TO MOVE (a keeper listed is moved too: what a person
chose). Only `id` and `path` are required; the id must still name that path.

The log (JSON, one object; `movefiles`): {"format": "cbir-duplicates-moves",
"version": 1, "state", "created", "updated", "catalog" (its real path), "folder"
(DIR), "base", "moves": [{"group", "kind", "from", "to", "mtime_ns" (of the file
when planned: an undo puts it back where a copy kept a coarser time), "row": the
whole catalog row, every column of schema.IMAGE_COLUMNS, vector_crc, file_key and
sha256 included}], "checksum": SHA-256 of the canonical JSON of the rest}. Default path
DIR/cbir-duplicates-YYYYmmdd-HHMMSS.json, or --log FILE. States: "moving" (written
before the first file moves), "moved", "undoing", "undone".

The write protocol, under the one-writer lock, a faults.step after every durable
step: move = log written ("moving") -> each file moved (rename, or copy + fsync +
rename + unlink across filesystems; folders fsynced) -> the rows deleted in one
transaction (ids never reused; vectors stay in the vector file) -> the exact index
rebuilt (approximate ones are stale, as after any job) -> log "moved". Undo = log
"undoing" -> each file back -> the rows re-inserted with their ids, sealed, in one
transaction -> exact index rebuilt -> log "undone". Every step finds out what is
done from the files and the catalog, so from a crash at any point `--undo LOG`
returns to the state before the move and rerunning the same `--move-to` (it first
finishes every pending log in DIR, and --log FILE) finishes the job.
"""

from __future__ import annotations

import contextlib
import logging
import os
from datetime import datetime
from pathlib import Path
from typing import Any

from pipeline.errors import CbirError
from pipeline.ingest.movefiles import (
    FINISHED,
    LOG_PREFIX,
    PENDING,
    Log,
    Move,
    put_time,
    read_log,
    remove_empty_folders,
    same_bytes,
    save_log,
    tmp_of,
    transfer,
    unchanged,
)
from pipeline.retrieval import autoindex, index_files, indexes
from pipeline.store import reads, seals, writes
from pipeline.store.collection import Collection

log = logging.getLogger("cbir")


def _within(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def base_folder(paths: list[str]) -> str:
    """The longest common parent folder of the catalog's image paths."""
    return os.path.commonpath([os.path.dirname(p) for p in paths]) if paths else os.sep


def _refuse_inside(folder: str, base: str, paths: list[str]) -> None:
    forms = {folder, os.path.realpath(folder)}
    if base != os.path.dirname(base):  # not the filesystem root
        if any(_within(f, base) or _within(f, os.path.realpath(base)) for f in forms):
            raise CbirError(
                f"{folder} is inside the collection's folder {base}: a later 'cbir index' "
                "would find the moved files again; choose a folder outside it"
            )
        return
    holding = {os.path.dirname(p) for p in paths}
    for f in forms:
        for up in [f, *map(str, Path(f).parents)]:
            if up in holding:
                raise CbirError(
                    f"{folder} is inside {up}, which holds catalogued images; choose a "
                    "folder outside the collection"
                )


def _tell(what: str, paths: list[str]) -> None:
    if paths:
        log.warning("left %d %s in place (first: %s)", len(paths), what, paths[0])


def plan(coll: Collection, chosen: list[dict[str, Any]], folder: str) -> Log:
    """The log of moving the `chosen` images ({"id", optional "path", "group", "kind"})
    into `folder`, every check done; nothing written. One line if any is refused."""
    folder = os.path.abspath(folder)
    by_path = reads.rows_by_path(coll.db)
    base = base_folder(list(by_path))
    _refuse_inside(folder, base, list(by_path))
    chosen = list({c["id"]: c for c in chosen}.values())  # each image once
    rows = reads.image_rows(coll.db, [c["id"] for c in chosen])
    gone, missing, links, moves = [], [], [], []
    for c in chosen:
        row = rows.get(c["id"])
        if row is None:
            gone.append(c.get("path") or str(c["id"]))
            continue
        src = row["path"]
        if c.get("path") is not None and c["path"] != src:
            raise CbirError(
                f"the plan names id {c['id']} as {c['path']}, but the catalog holds it as "
                f"{src}: the plan is from another catalog, or stale; nothing moved"
            )
        try:
            st = os.lstat(src)
        except OSError:
            missing.append(src)
            continue
        if os.path.islink(src) or not os.path.isfile(src):
            links.append(src)
            continue
        if not unchanged(src, row):
            raise CbirError(
                f"{src} changed since it was indexed (size or time differ): run 'cbir index' "
                "on its folder, then look at the groups again; nothing moved"
            )
        if not os.access(os.path.dirname(src), os.W_OK):
            raise CbirError(f"cannot move {src}: its folder is not writable; nothing moved")
        dest = os.path.join(folder, os.path.relpath(src, base))
        if os.path.lexists(dest) or os.path.lexists(tmp_of(dest)):
            raise CbirError(f"{dest} exists already; nothing moved (choose another folder)")
        moves.append(Move(src, dest, {**row}, c.get("group"), c.get("kind"), st.st_mtime_ns))
    _tell("images no longer in the catalog (moved already?)", gone)
    _tell("images whose file is missing", missing)
    _tell("images that are symbolic links or not files (moving them frees nothing)", links)
    stamp = writes.now()
    return Log("", os.path.realpath(coll.path), folder, base, stamp, moves, "moving", stamp)


def default_log(folder: str) -> str:
    name = f"{LOG_PREFIX}{datetime.now():%Y%m%d-%H%M%S}"
    path, n = os.path.join(folder, name + ".json"), 1
    while os.path.lexists(path):
        n += 1
        path = os.path.join(folder, f"{name}-{n}.json")
    return path


def move(
    coll: Collection, chosen: list[dict[str, Any]], folder: str, log_path: str | None = None
) -> dict[str, Any]:
    """Move the `chosen` images into `folder` (see the module docstring); a summary."""
    entry = plan(coll, chosen, folder)
    if not entry.moves:
        return {**_summary(entry, True, 0), "log": None}
    entry.path = os.path.abspath(log_path) if log_path else default_log(entry.folder)
    if os.path.lexists(entry.path):
        old = read_log(entry.path)  # an undone move of this catalog may make way for its rerun
        if old.state != "undone" or old.catalog != entry.catalog:
            raise CbirError(f"log {entry.path} exists already; give another --log; nothing moved")
    return _carry_out(coll, entry, forward=True)


def finish_pending(coll: Collection, folder: str, log_path: str | None = None) -> list[str]:
    """Finish every move of this catalog that a crash (or a crashed undo) left pending:
    the logs in `folder` and `log_path`. Returns their paths."""
    folder = os.path.abspath(folder)
    found = []
    if os.path.isdir(folder):
        for name in sorted(os.listdir(folder)):
            if name.startswith(LOG_PREFIX) and name.endswith(".json"):
                found.append(os.path.join(folder, name))
    if log_path and os.path.lexists(log_path) and os.path.abspath(log_path) not in found:
        found.append(os.path.abspath(log_path))
    for head, prefix in {(folder, f".{LOG_PREFIX}"), *_tmp_prefix(log_path)}:
        for name in os.listdir(head) if os.path.isdir(head) else ():
            if name.startswith(prefix) and name.endswith(".tmp"):
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(head, name))  # a log never renamed into place: ours
    done = []
    for path in found:
        entry = read_log(path)
        if entry.catalog == os.path.realpath(coll.path) and entry.state in PENDING:
            _carry_out(coll, entry, forward=True)
            done.append(path)
    return done


def _tmp_prefix(log_path: str | None) -> set[tuple[str, str]]:
    if not log_path:
        return set()
    head, name = os.path.split(os.path.abspath(log_path))
    return {(head, f".{name}.")}


def refuse_other_catalog(entry: Log, catalog_path: str | os.PathLike) -> None:
    """One line unless the log was written for this catalog (the same file)."""
    if entry.catalog != os.path.realpath(catalog_path):
        raise CbirError(
            f"log {entry.path} is of catalog {entry.catalog}, not {catalog_path}: "
            f"pass --catalog {entry.catalog}; nothing changed"
        )


def undo(coll: Collection, entry: Log) -> dict[str, Any]:
    """Put back every image of a move's log and its catalog row (see the module docstring)."""
    refuse_other_catalog(entry, coll.path)
    if entry.state == "undone":  # nothing to do: said, not an error
        return {**_summary(entry, False, 0), "moved": 0, "bytes": 0, "undone": entry.updated}
    return _carry_out(coll, entry, forward=False)


# --- carrying out a log, forwards (move) or backwards (undo) --------------------------------


def _ends(m: Move, forward: bool) -> tuple[str, str]:
    return (m.source, m.dest) if forward else (m.dest, m.source)


def _check_files(entry: Log, forward: bool) -> None:
    """Every file where the log says it may be and as it was, before anything moves."""
    for m in entry.moves:
        frm, to = _ends(m, forward)
        here, there = os.path.lexists(frm), os.path.lexists(to)
        if not here and not there:
            raise CbirError(
                f"{m.source} is neither there nor at {m.dest} (moved or deleted by hand?); "
                "nothing changed",
                exit_code=1,
            )
        if here and not unchanged(frm, m.row):
            raise CbirError(
                f"{frm} changed since the move was planned; nothing changed (log {entry.path})"
            )
        # Both there: a copy across filesystems that was whole when a crash came (the same
        # bytes: only its source is left to unlink), or another file in the way.
        if here and there and not same_bytes(frm, to):
            raise CbirError(f"{to} exists already and is another file; nothing changed")


def _check_rows(coll: Collection, entry: Log, forward: bool) -> list[dict[str, Any]]:
    """The rows to delete (forward) or put back (backward), checked against the log."""
    present = reads.image_rows(coll.db, [m.row["id"] for m in entry.moves])
    if forward:
        for m in entry.moves:
            now = present.get(m.row["id"])
            if now is not None and now != m.row:
                raise CbirError(
                    f"the catalog row of {m.source} changed since the move was planned; "
                    f"undo the move with 'cbir duplicates --undo {entry.path}'"
                )
        return list(present.values())
    taken = reads.rows_by_path(coll.db)
    back = []
    for m in entry.moves:
        if m.row["id"] in present:
            continue
        other = taken.get(m.row["path"])
        if other is not None:
            log.warning(
                "%s is in the catalog again (id %d, indexed since): its old row %d stays out",
                m.source,
                other["id"],
                m.row["id"],
            )
            continue
        back.append(m.row)
    return back


def _carry_out(coll: Collection, entry: Log, forward: bool) -> dict[str, Any]:
    _check_files(entry, forward)
    rows = _check_rows(coll, entry, forward)
    run_id = writes.start_run(
        coll.db,
        "duplicates --move-to" if forward else "duplicates --undo",
        {"log": entry.path, "folder": entry.folder, "moves": len(entry.moves)},
    )
    try:
        pending = "moving" if forward else "undoing"
        if entry.state != pending or not os.path.lexists(entry.path):
            _set_state(entry, pending)
        for m in entry.moves:
            frm, to = _ends(m, forward)
            try:
                transfer(frm, to)
            except OSError as e:
                raise CbirError(
                    f"could not move {frm} to {to} ({e.strerror}); free the way and rerun the "
                    f"same command to finish, or undo with 'cbir duplicates --undo {entry.path}'",
                    exit_code=1,
                ) from None
            if not forward:
                put_time(m.source, m.mtime_ns)
                remove_empty_folders(os.path.dirname(m.dest), entry.folder)
        if forward:
            writes.delete_rows(coll.db, [r["id"] for r in rows])
        else:
            writes.restore_rows(coll.db, rows)
        refresh_exact(coll)
        _set_state(entry, FINISHED[0] if forward else FINISHED[1])
    except BaseException:
        with contextlib.suppress(Exception):
            writes.end_run(coll.db, run_id, "failed", {"moves": len(entry.moves)})
        raise
    writes.end_run(coll.db, run_id, "done", {"moves": len(entry.moves), "rows": len(rows)})
    return _summary(entry, forward, len(rows))


def _set_state(entry: Log, state: str) -> None:
    entry.state, entry.updated = state, writes.now()
    save_log(entry)


def refresh_exact(coll: Collection) -> None:
    """Rebuild the exact index as an indexing job does, unless it is current already."""
    if not coll.dim or not len(coll.indexed_ids()):
        return
    try:
        record = reads.index_record(coll.db, indexes.EXACT)
    except seals.DamagedRow:
        record = None  # replaced whole by the build
    if indexes.is_stale(coll, record):
        autoindex.build_and_save(coll, indexes.EXACT, indexes.EXACT_FACTORY)
    elif record is not None:  # built before a crash came: only the older files may be left
        index_files.remove_leftovers(coll, indexes.EXACT, record)


def _summary(entry: Log, forward: bool, rows: int) -> dict[str, Any]:
    return {
        "action": "move" if forward else "undo",
        "moved": len(entry.moves),
        "bytes": sum(m.row["size"] or 0 for m in entry.moves),
        "groups": len({m.group for m in entry.moves if m.group is not None}),
        "rows": rows,
        "folder": entry.folder,
        "log": entry.path,
    }
