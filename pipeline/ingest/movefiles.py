"""The files of a duplicates move: its log, its plan CSV, and moving one file durably.

- the log: JSON with a format version and a SHA-256 of its own content, written
  atomically (temporary file, fsync, rename, fsync of the folder); a log that fails
  any check is refused in one line, so a damaged log never restores anything;
- the plan: a CSV of the images to move (read here; `pipeline/api/dedup_export.py`
  writes it);
- `transfer`: one file from one place to the other, a rename on one filesystem, or
  copy + fsync + rename + unlink across two; called again after a crash at any of
  its steps, it finishes the move.

The formats and the rules are described in `moves`, the job. Apart from it because
everything here touches files only, never the catalog.
"""

from __future__ import annotations

import csv
import errno
import filecmp
import hashlib
import io
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline import faults, files
from pipeline.errors import CbirError
from pipeline.store.schema import IMAGE_COLUMNS, IMAGE_COLUMNS_5
from pipeline.store.vectors import fsync_dir

LOG_FORMAT = "cbir-duplicates-moves"
LOG_VERSION = 1
LOG_MAX = 1 << 30  # ~1 KB a move: a million moves
LOG_PREFIX = "cbir-duplicates-"
PENDING = ("moving", "undoing")  # a job that did not finish: its rerun (or --undo) does
FINISHED = ("moved", "undone")
TMP = ".cbir-move.tmp"  # a copy under way across filesystems: `.NAME.cbir-move.tmp`


@dataclass
class Move:
    """One image: where it was (`source`), where it goes (`dest`), its whole catalog row."""

    source: str
    dest: str
    row: dict[str, Any]
    group: int | None = None
    kind: str | None = None
    mtime_ns: int | None = None  # of the file when planned: put back after the undo


@dataclass
class Log:
    """What a move did and how to undo it; `state` is one of PENDING or FINISHED."""

    path: str
    catalog: str  # the catalog's real path: an undo against another catalog is refused
    folder: str  # DIR
    base: str  # the folder whose relative paths are kept under DIR
    created: str
    moves: list[Move] = field(default_factory=list)
    state: str = "moving"
    updated: str = ""


def _body(log: Log) -> dict[str, Any]:
    return {
        "format": LOG_FORMAT,
        "version": LOG_VERSION,
        "state": log.state,
        "created": log.created,
        "updated": log.updated,
        "catalog": log.catalog,
        "folder": log.folder,
        "base": log.base,
        "moves": [
            {
                "group": m.group,
                "kind": m.kind,
                "from": m.source,
                "to": m.dest,
                "mtime_ns": m.mtime_ns,
                "row": m.row,
            }
            for m in log.moves
        ],
    }


def _digest(body: dict[str, Any]) -> str:
    """SHA-256 of the canonical JSON (sorted keys, ASCII: names that are not UTF-8 are
    lone surrogates, written as \\udcXX escapes and read back the same)."""
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def save_log(log: Log) -> None:
    body = _body(log)
    body["checksum"] = _digest(body)
    text = json.dumps(body, sort_keys=True, indent=1, ensure_ascii=True) + "\n"
    write_atomic(Path(log.path), text.encode("ascii"), "duplicates log")


def read_log(path: str | os.PathLike) -> Log:
    """The log at `path`, checked whole (checksum, format, version, every field) before
    anything is used; one line (exit 1 if damaged, 2 if absent or foreign) otherwise."""
    path = os.fspath(path)
    try:
        data = files.read_regular(path, "duplicates log", LOG_MAX)
    except FileNotFoundError:
        raise CbirError(f"no duplicates log at {path}") from None
    except OSError as e:
        raise CbirError(f"cannot read duplicates log {path}: {e.strerror}") from None

    def damaged(why: str) -> CbirError:
        return CbirError(
            f"duplicates log {path} is damaged or not a cbir duplicates log ({why}); nothing "
            "was changed (restore the log from a backup)",
            exit_code=1,
        )

    try:
        body = json.loads(data.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise damaged("not whole JSON") from None
    if not isinstance(body, dict) or "checksum" not in body:
        raise damaged("no checksum")
    checksum = body.pop("checksum")
    if checksum != _digest(body):
        raise damaged("its checksum does not match its content")
    if body.get("format") != LOG_FORMAT:
        raise damaged(f"format {body.get('format')!r}")
    if body.get("version") != LOG_VERSION:
        raise CbirError(
            f"duplicates log {path} has format version {body.get('version')!r}; this cbir "
            f"reads version {LOG_VERSION}: use the cbir that wrote it"
        )
    try:
        log = Log(
            path=path,
            catalog=_text(body["catalog"]),
            folder=_text(body["folder"]),
            base=_text(body["base"]),
            created=_text(body["created"]),
            state=_text(body["state"]),
            updated=_text(body["updated"]),
            moves=[_move(m) for m in body["moves"]],
        )
    except (KeyError, TypeError, ValueError) as e:
        raise damaged(f"unexpected content: {e}") from None
    if log.state not in PENDING + FINISHED:
        raise damaged(f"unknown state {log.state!r}")
    return log


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{value!r} is not text")
    return value


def _move(m: dict[str, Any]) -> Move:
    row = m["row"]
    # A log written before schema 6 holds rows without the dates (restored as NULL: the
    # next `cbir index` reads them).
    if not isinstance(row, dict) or not set(IMAGE_COLUMNS_5) <= set(row) <= set(IMAGE_COLUMNS):
        raise ValueError("a move's catalog row lacks columns")
    if type(row["id"]) is not int:
        raise ValueError("a move's catalog row lacks columns")
    if _text(row["path"]) != _text(m["from"]) or not os.path.isabs(m["to"]):
        raise ValueError("a move's paths do not match its row")
    if m["mtime_ns"] is not None and type(m["mtime_ns"]) is not int:
        raise ValueError("a move's mtime_ns is not a number")
    return Move(m["from"], m["to"], row, m.get("group"), m.get("kind"), m["mtime_ns"])


def read_plan(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The rows of a plan CSV: each {"id", "path", "group", "kind"}; one line if unusable."""
    path = os.fspath(path)
    try:
        data = files.read_regular(path, "plan", files.CSV_MAX)
    except FileNotFoundError:
        raise CbirError(f"no plan at {path}") from None
    except OSError as e:
        raise CbirError(f"cannot read plan {path}: {e.strerror}") from None
    text = data.decode("utf-8", "surrogateescape").removeprefix("\ufeff")
    reader = csv.DictReader(io.StringIO(text, newline=""))
    if not {"id", "path"} <= set(reader.fieldnames or ()):
        raise CbirError(f"plan {path} needs the columns id and path (as 'cbir duplicates --plan')")
    out = []
    for n, row in enumerate(reader, 2):
        try:
            image_id = int(row["id"])
        except (TypeError, ValueError):
            raise CbirError(f"plan {path}, line {n}: id {row['id']!r} is not a number") from None
        if not row["path"]:
            raise CbirError(f"plan {path}, line {n}: no path")
        group = row.get("group")
        out.append(
            {
                "id": image_id,
                "path": row["path"],
                "group": int(group) if group and group.isdigit() else None,
                "kind": row.get("kind") or None,
            }
        )
    return out


# --- durable file steps ---------------------------------------------------------------------


def write_atomic(path: Path, data: bytes, what: str) -> None:
    """Temporary file, fsync, rename, fsync of the folder: the file is whole or absent."""
    make_folders(path.parent)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        faults.step(f"fsync {tmp.name}")
        os.replace(tmp, path)
        faults.step(f"rename {path.name}")
    except OSError as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise CbirError(f"could not write {what} {path}: {e.strerror}", exit_code=1) from None
    fsync_dir(path.parent)


def make_folders(folder: str | Path) -> None:
    """Create `folder` and its missing parents, each made durable (its parent fsynced)."""
    folder = Path(os.path.abspath(folder))
    missing = []
    while not folder.is_dir():
        missing.append(folder)
        folder = folder.parent
    for f in reversed(missing):
        try:
            f.mkdir()
        except OSError as e:
            raise CbirError(f"cannot create folder {f}: {e.strerror}", exit_code=1) from None
        faults.step(f"mkdir {f.name}")
        fsync_dir(f.parent)


def remove_empty_folders(folder: str, top: str) -> None:
    """Remove `folder` and its parents up to `top` (not included) while they are empty."""
    top = os.path.abspath(top)
    folder = os.path.abspath(folder)
    while folder != top and folder.startswith(top + os.sep):
        try:
            os.rmdir(folder)  # only an empty folder: never a file of anyone's
        except OSError:
            return
        faults.step(f"rmdir {os.path.basename(folder)}")
        fsync_dir(Path(folder).parent)
        folder = os.path.dirname(folder)


def tmp_of(path: str) -> str:
    head, name = os.path.split(path)
    return os.path.join(head, f".{name}{TMP}")


def unchanged(path: str, row: dict[str, Any]) -> bool:
    """Whether the file is the one a catalog row describes: the same size and mtime, or,
    where the time differs (a filesystem that keeps coarser times, such as FAT's 2 s),
    the same sha256."""
    st = os.stat(path)
    if st.st_size != row["size"]:
        return False
    if st.st_mtime == row["mtime"]:
        return True
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest() == row["sha256"]


def put_time(path: str, mtime_ns: int | None) -> None:
    """Give a file back its mtime (to the nanosecond) where a copy kept a coarser one."""
    st = os.stat(path)
    if mtime_ns is None or st.st_mtime_ns == mtime_ns:
        return
    os.utime(path, ns=(st.st_atime_ns, mtime_ns))
    faults.step(f"utime {os.path.basename(path)}")


def same_bytes(a: str, b: str) -> bool:
    try:
        return filecmp.cmp(a, b, shallow=False)
    except OSError:
        return False


def rename_file(frm: str, to: str) -> None:
    """os.rename, named so a test can make it fail as across filesystems (EXDEV)."""
    os.rename(frm, to)


def unlink(path: str) -> None:
    """Remove a file durably: its folder is fsynced after the step."""
    os.unlink(path)
    faults.step(f"unlink {os.path.basename(path)}")
    fsync_dir(Path(path).parent)


def transfer(frm: str, to: str) -> None:
    """Move one file from `frm` to `to` durably, its bytes and times unchanged.

    One filesystem: rename, then fsync of both folders. Across two: copy to a temporary
    file beside `to`, fsync, rename it to `to`, fsync, unlink `frm`, fsync. Idempotent:
    after a crash at any step, a new call finishes the move (a temporary copy is ours
    and is made again; `to` and `frm` both present means the copy is whole, and the
    caller checked their bytes are the same). The caller checked that `to` is free or
    the same file.
    """
    tmp = tmp_of(to)
    if os.path.lexists(tmp):
        unlink(tmp)  # a copy cut short by a crash: ours, made again below
    if not os.path.lexists(frm):
        return  # moved already
    if os.path.lexists(to):
        unlink(frm)  # copied already (the same bytes): only the source was left
        return
    make_folders(os.path.dirname(to))
    try:
        rename_file(frm, to)
    except OSError as e:
        if e.errno != errno.EXDEV:
            raise
        _copy(frm, tmp)
        os.rename(tmp, to)
        faults.step(f"rename {os.path.basename(to)}")
        fsync_dir(Path(to).parent)
        unlink(frm)
        return
    faults.step(f"rename {os.path.basename(to)}")
    fsync_dir(Path(to).parent)
    fsync_dir(Path(frm).parent)


def _copy(frm: str, tmp: str) -> None:
    """The bytes, mode and times of `frm` in a new file `tmp`, fsynced."""
    with open(frm, "rb") as src, open(tmp, "xb") as out:
        shutil.copyfileobj(src, out, 1 << 20)
    shutil.copystat(frm, tmp)  # the times the catalog compares (size and mtime) kept
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    faults.step(f"fsync {os.path.basename(tmp)}")
