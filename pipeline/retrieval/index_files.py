"""The files of an index: their names, atomic writes and removal, the checks that they are
the files their record describes (sizes, sha256 digests), and reading them.

An index is `NAME+TAG.faiss`; an on-disk one has its inverted lists in
`NAME+TAG.ivfdata` beside it. Every build writes files under a new TAG, so a
live file is never written over, and its record (the caller commits it)
switches indexes. Nothing here opens the catalog: a record is passed in.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import os
import re
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import faiss

from pipeline import faults
from pipeline.errors import CbirError
from pipeline.store import vectors

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def index_path(index_dir: str | Path, name: str, record: dict[str, Any] | None = None) -> Path:
    """The file of index `name`: the one its record names (NAME+TAG.faiss), else NAME.faiss."""
    if not _NAME_RE.match(name):
        raise CbirError(f"invalid index name {name!r}: use letters, digits, '.', '_' and '-'")
    if record and record.get("file"):
        return Path(index_dir) / str(record["file"])
    return Path(index_dir) / f"{name}.faiss"


def data_path(path: Path) -> Path:
    """The inverted-list file of an on-disk index: NAME+TAG.faiss -> NAME+TAG.ivfdata."""
    return path.with_suffix(".ivfdata")


def _own_files(index_dir: Path, name: str) -> list[Path]:
    """Every file a build of `name` may have left: NAME.faiss, NAME+TAG.faiss and .ivfdata,
    the trained and shard temporaries of a sharded build (.NAME+TAG.trained.faiss,
    .NAME+TAG.shardK.faiss), and the temporaries of atomic writes.

    '+' cannot occur in an index name, so no other index's files match.
    """
    if not index_dir.is_dir():
        return []
    # A kind (trained, shardK) only after a tag: 'a.trained.faiss' is index 'a.trained''s file.
    ours = re.compile(
        rf"^\.?{re.escape(name)}(\+[0-9a-f]+(\.(trained|shard\d+))?)?"
        r"\.(faiss|ivfdata)(\.\d+\.tmp)?$"
    )
    return [f for f in index_dir.iterdir() if ours.match(f.name)]


def write_atomic(
    index: Any, path: Path, write: Callable[[Any, str], None] = faiss.write_index, what: str = ""
) -> int:
    """Temporary file, fsync, rename, fsync of the folder: readers never see half an index.

    `write` saves the object (an index by default; `faiss.write_VectorTransform` for a
    whitening transform), `what` names it in errors. On any failure (a full disk, say)
    the temporary file is removed.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CbirError(f"cannot create index folder {path.parent}: {e.strerror}") from None
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(index, str(tmp))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        faults.step(f"fsync {tmp.name}")
        os.replace(tmp, path)
        faults.step(f"rename {path.name}")
    except (OSError, RuntimeError) as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(e, RuntimeError) or e.errno == errno.ENOSPC:
            reason = "the disk is full or the folder is not writable"
        else:
            reason = e.strerror
        raise CbirError(
            f"could not write {what or 'index ' + path.stem} in {path.parent} ({reason}); "
            "free space and rerun",
            exit_code=1,
        ) from None
    vectors.fsync_dir(path.parent)
    return path.stat().st_size


def new_tag() -> str:
    """The TAG of a build's files NAME+TAG.*: new for every build, so no live file is reused."""
    return uuid.uuid4().hex[:12]


def remove_leftovers(coll, name: str, record: dict[str, Any]) -> None:
    """Remove every file of `name` that its committed `record` does not name (older builds,
    temporaries of crashed ones); only a writer, holding the lock, calls this."""
    path = index_path(coll.index_dir, name, record)
    keep = {path, data_path(path)} if is_ondisk(record) else {path}
    remove_files([f for f in _own_files(coll.index_dir, name) if f not in keep])


def remove_files(files: list[Path]) -> None:
    """Unlink files nobody's record names any more (each a write step); gone ones are fine."""
    for f in files:
        with contextlib.suppress(OSError):
            f.unlink()
            faults.step(f"unlink {f.name}")


def is_ondisk(record: dict[str, Any] | None) -> bool:
    """Whether the record describes an on-disk index (with a NAME+TAG.ivfdata file)."""
    return bool(record) and record.get("data_bytes") is not None


def matches_file(record: dict[str, Any] | None, path: Path) -> bool:
    """Whether the index file (and an on-disk index's .ivfdata) is what its record describes.

    Each build writes new files before its record commits, so this only
    fails for a file replaced, truncated or removed behind cbir's back (or one
    written by an older cbir, which renamed over the file the record
    described). A short .ivfdata must be caught here: FAISS maps it whole, and
    reading past its end would kill the process (SIGBUS).
    """
    try:
        if record is None or path.stat().st_size != record["bytes"]:
            return False
        return not is_ondisk(record) or data_path(path).stat().st_size == record["data_bytes"]
    except OSError:
        return False


# --- file digests ----------------------------------------------------------------------------


def file_digest(path: Path) -> str:
    """The sha256 of a file, streamed (about 2 GB/s with SHA-NI: 4 s for 8 GiB)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


# Files found to have their recorded digest in this process, by identity: a memory-mapped
# file is checked in full at its first load in a process and at `verify`, not at every
# load. The key holds the ctime, which no user can set back, so a file written since (or
# replaced, renamed over) is checked again.
_CHECKED: dict[tuple[int, ...], str] = {}
_CHECKED_LOCK = threading.Lock()


def _identity(path: Path) -> tuple[int, ...]:
    st = path.stat()
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class DamagedIndex(CbirError):
    """An index file whose bytes differ from those recorded when it was built (exit 1)."""

    def __init__(self, name: str, file: Path):
        super().__init__(
            f"index {name!r} is damaged: {file.name} differs from the file its build wrote "
            f"(checksum mismatch); run 'cbir build-index {name}' to rebuild it",
            1,
        )


def check_digests(
    record: dict[str, Any], path: Path, mapped: bool = False, full: bool = False
) -> list[str]:
    """Check the index file and an on-disk index's .ivfdata against the sha256 their record
    holds; raise DamagedIndex on a mismatch. Returns what could not be checked (files
    recorded before cbir kept digests), for `verify` to note.

    The .faiss of a one-file index is read whole by every load, so it is hashed at every
    load too. Memory-mapped files (the .ivfdata; the .faiss too when `mapped`) are
    hashed in full once per process and file identity (see _CHECKED): hashing 8 GiB of
    inverted lists before every query would cost seconds each time. `full` (verify,
    an update about to copy the lists) hashes every file whatever was found before.
    """
    files = [(path, record.get("digest"), mapped)]
    if is_ondisk(record):
        files.append((data_path(path), record.get("data_digest"), True))
    unchecked = []
    for file, want, once in files:
        if not want:
            unchecked.append(file.name)
            continue
        try:
            key = _identity(file)
            if once and not full and _CHECKED.get(key) == want:
                continue
            got = file_digest(file)
        except OSError:
            raise DamagedIndex(record["name"], file) from None
        if got != want:
            raise DamagedIndex(record["name"], file)
        with _CHECKED_LOCK:
            _CHECKED[key] = want
    return unchecked


MMAP_BYTES = 1 << 30


def read(path: Path, mmap: bool | None = None, ondisk: bool = False) -> faiss.Index:
    """Read an index file, memory-mapped when large (or asked) and the type allows it.

    An on-disk index (`ondisk`) always maps its .ivfdata read-only, found
    beside the index file (IO_FLAG_ONDISK_SAME_DIR), so the folder can move.
    """
    if ondisk:
        flags = faiss.IO_FLAG_ONDISK_SAME_DIR | faiss.IO_FLAG_READ_ONLY
        with quiet():
            return faiss.read_index(str(path), flags)
    if mmap is None:
        mmap = path.stat().st_size >= MMAP_BYTES
    if mmap:
        try:
            # IO_FLAG_MMAP maps inverted lists (IVF); IO_FLAG_MMAP_IFC flat codes (Flat, PQ).
            flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY
            return faiss.read_index(str(path), flags)
        except RuntimeError:
            pass  # this index type cannot be mapped: read it into memory
    return faiss.read_index(str(path))


_QUIET = threading.Lock()


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence what FAISS' on-disk code prints with C printf on stdout ("resizing ...",
    "IO_FLAG_ONDISK_SAME_DIR: updating ..."), which would land in `cbir search --json`.

    It swaps file descriptor 1 for /dev/null, for the whole process, only
    while an on-disk index is read, merged or shrunk (serialised by a lock).
    """
    with _QUIET:
        with contextlib.suppress(OSError, ValueError, AttributeError):
            sys.stdout.flush()
        try:
            saved: int | None = os.dup(1)
        except OSError:
            saved = None  # no stdout at all: nothing to protect
        if saved is None:
            yield
            return
        libc = ctypes.CDLL(None)
        libc.fflush(None)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.close(devnull)
        try:
            yield
        finally:
            libc.fflush(None)  # C stdio buffers what it printed: out to /dev/null, not later
            os.dup2(saved, 1)
            os.close(saved)
