"""Renames and moves: scanned files that are catalogued images whose files left their paths.

The plan (`plan.py`) hands over the files it would embed: those with no row at their
path, and those whose row's file changed. Such a file is the image of a catalogued row
R, moved, when R's file is no longer at R's recorded path (the path is gone, or holds a
file of another size or modification time) and either

- it is the same file: the same `file_key` (st_dev:st_ino), size, mtime and sha256 of
  its bytes as R (a rename or a move within one filesystem; the bytes are read because
  a freed inode is reused and archive tools keep mtimes), or
- it holds the same content: the size of R, then the sha256 of its bytes equal to R's
  `sha256` (what `decode.decode_file` records: the whole file), for a copy across
  filesystems or a tool that rewrites files. Only a file whose size is that of such a
  row is hashed, so a scan of many new files hashes none of them.

A copy beside an original that is still in place is no move (R's file has not left),
and neither is a moved file whose content changed on the way (a new image). Each row
is claimed once, same-file matches first, then content, each in scan order, so two
files claiming one vanished row give one move and one new image. Only indexed rows
move: a failed file is tried again where it now is.

Nothing here writes: `jobs` commits the moves (`writes.move_rows`) before any batch.
"""

from __future__ import annotations

import errno
import hashlib
import os
from collections.abc import Callable
from typing import Any

from pipeline import files
from pipeline.inputs.scan import ScannedFile

Row = dict[str, Any]
# stat errors that say a path holds no file any more (anything else, such as a folder
# that cannot be read, leaves the row where it is).
_GONE = (errno.ENOENT, errno.ENOTDIR, errno.ELOOP)


def _left(row: Row, scanned: dict[str, ScannedFile]) -> bool:
    """Whether row's file is no longer at its path: what this scan saw there, else a stat."""
    seen = scanned.get(row["path"])
    if seen is None:
        try:
            st = os.stat(row["path"])
        except OSError as e:
            return e.errno in _GONE
        size, mtime = st.st_size, st.st_mtime
    else:
        size, mtime = seen.size, seen.mtime
    return (size, mtime) != (row["size"], row["mtime"])


def content_sha256(path: str) -> str | None:
    """The sha256 of a file's bytes (as `decode_file` takes it), or None if it cannot be
    read (a regular file only: a FIFO put there meanwhile is not waited on)."""
    try:
        with files.open_regular(path, "image", None) as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    except (files.UnusableFile, OSError):
        return None


def find_moves(
    candidates: list[tuple[ScannedFile, str | None]],
    rows: dict[str, Row],
    by_key: Callable[[], dict[str, Row]],
    scanned: dict[str, ScannedFile],
) -> dict[str, int]:
    """new path -> id of the catalogued row that moved there, for the files of `candidates`
    ((file, its file_key), in scan order) that are moved images.

    `rows`: every row by path (id, size, mtime, sha256, status); `by_key()`: rows by
    file_key (read only if some candidate has a key); `scanned`: this scan by path.
    """
    moved: dict[str, int] = {}
    taken: set[int] = set()
    own = {path: row["id"] for path, row in rows.items()}

    def movable(row: Row | None, f: ScannedFile) -> bool:
        return (
            row is not None
            and row["status"] == "indexed"
            and row["id"] not in taken
            and row["id"] != own.get(f.path)  # its own row, changed in place: no move
            and row["size"] == f.size
            and _left(row, scanned)
        )

    keyed = by_key() if any(key for _, key in candidates) else {}
    for f, key in candidates:
        twin = keyed.get(key) if key else None
        row = rows.get(twin["path"]) if twin else None
        # The bytes too: an inode freed by a delete is reused, and unzip, tar, rsync -a
        # keep mtimes, so another picture of the same size could take the old identity.
        if (
            movable(row, f)
            and row["mtime"] == f.mtime
            and row["sha256"]
            and content_sha256(f.path) == row["sha256"]
        ):
            moved[f.path] = row["id"]
            taken.add(row["id"])
    rest = [f for f, _ in candidates if f.path not in moved]
    sizes = {f.size for f in rest}
    vanished: dict[int, list[Row]] = {}  # size -> rows whose file left
    for row in rows.values():  # one cheap test per row; a stat only for a wanted size
        wanted = row["size"] in sizes and row["sha256"] and row["status"] == "indexed"
        if wanted and row["id"] not in taken and _left(row, scanned):
            vanished.setdefault(row["size"], []).append(row)
    for same_size in vanished.values():
        same_size.sort(key=lambda r: r["id"])  # the oldest image first, whatever the SQL order
    for f in rest:
        if f.size not in vanished:
            continue
        digest = content_sha256(f.path)
        for row in vanished[f.size]:
            if row["sha256"] == digest and movable(row, f):
                moved[f.path] = row["id"]
                taken.add(row["id"])
                break
    return moved
