"""Errors: the one exception type users see, and the guard that keeps tracebacks from them."""

from __future__ import annotations

import datetime
import errno
import os
import sqlite3
import stat
import sys
import tempfile
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# Set by `cbir --debug` (or CBIR_DEBUG=1): print full tracebacks instead of a log file.
DEBUG = False


class CbirError(Exception):
    """A problem the user can fix; `exit_code` 2 means bad input, 1 a failed check."""

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code


class NotFoundError(CbirError):
    """A catalog id, index or file that does not exist (HTTP 404)."""


class StaleIndexError(CbirError):
    """An approximate index older than the catalog: rebuild it (HTTP 409)."""


class CatalogNotReady(CbirError):
    """A reader found a catalog that a writer is creating or has yet to upgrade (HTTP 503)."""


class WriterBusy(CbirError):
    """Another job holds the catalog's write lock (HTTP 503: retry when it is done)."""


def _log_file(catalog: str | None) -> Path:
    """Where a traceback goes: beside the catalog, or the temp folder if that is not writable."""
    catalog = catalog or os.environ.get("CBIR_CATALOG") or "catalog.db"
    beside = Path(os.path.abspath(catalog) + ".errors.log")
    if os.access(beside.parent, os.W_OK):
        return beside
    return Path(tempfile.gettempdir()) / "cbir-errors.log"


def _say(message: str) -> None:
    print(f"cbir: error: {message}", file=sys.stderr)


def path_problem(path: str | os.PathLike, folder: bool) -> str | None:
    """Why `path` cannot be used, or made, as a folder (`folder`) or a file; None if it can.

    What exists must be of the right kind; what does not must have a folder as its
    nearest existing ancestor. Said in words ("a symlink loop", "X is a file, not a
    folder") instead of errno names, so each option can refuse in one line before work.
    """
    path = os.fspath(path)
    what = "folder" if folder else "file"
    try:
        st = os.stat(path)
    except OSError as e:
        if e.errno == errno.ELOOP:
            return f"{path} is a symlink loop"
        if e.errno == errno.ENAMETOOLONG:
            return f"{path}: the name is too long"
        if e.errno not in (errno.ENOENT, errno.ENOTDIR):
            return f"{path}: {e.strerror}"
    else:
        if folder != stat.S_ISDIR(st.st_mode):
            return f"{path} is not a {what}" if folder else f"{path} is a folder, not a {what}"
        return None
    target = os.path.abspath(path)
    if os.path.islink(path):
        if folder:  # makedirs cannot make a folder where a (dangling) link is
            return f"{path} is a symbolic link to a missing folder"
        target = os.path.realpath(path)  # a file is written through the link, at its target
    # Not there yet: the first ancestor that exists must be a folder to create it in.
    for parent in Path(target).parents:
        try:
            st = os.stat(parent)
        except OSError as e:
            if e.errno == errno.ELOOP:
                return f"{path}: {parent} is a symlink loop"
            if e.errno in (errno.ENOENT, errno.ENOTDIR):
                continue
            return f"{path}: {parent}: {e.strerror}"
        if not stat.S_ISDIR(st.st_mode):
            return f"{path}: {parent} is a file, not a folder"
        return None
    return None


def describe(e: BaseException) -> str | None:
    """A one-line message for a known environmental failure, or None."""
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        where = f" while writing {e.filename}" if e.filename else ""
        return f"disk full{where}; free space and rerun (nothing committed was lost)"
    if isinstance(e, OSError) and e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return f"{e.strerror}: {e.filename or 'a file'}; check the folder's permissions"
    if isinstance(e, sqlite3.DatabaseError):
        text = str(e)
        if "full" in text:
            return "disk full while writing the catalog; free space and rerun"
        if "readonly" in text:
            return "the catalog is read-only here; writing needs a writable catalog and folder"
        return f"the catalog is damaged or unreadable ({text}); run 'cbir verify' for details"
    if isinstance(e, MemoryError):
        return "out of memory; try a smaller batch or fewer workers"
    return None


# A path that cannot be a file or folder here: the user's input, whichever option named it.
_PATH_ERRNOS = (errno.ENOTDIR, errno.EISDIR, errno.ELOOP, errno.ENAMETOOLONG)


def bad_path(e: BaseException) -> str | None:
    """A one-line message for an OSError that says a given path is unusable, or None."""
    if isinstance(e, OSError) and e.errno in _PATH_ERRNOS and e.filename is not None:
        path = os.fsdecode(e.filename)
        reason = "is a symlink loop" if e.errno == errno.ELOOP else f"cannot be used ({e.strerror})"
        return f"{path} {reason}; check the paths given"
    return None


@contextmanager
def one_line(catalog: str | None = None) -> Iterator[None]:
    """Turn any exception into one line on stderr and an exit code; never a traceback.

    CbirError and known environmental failures say what to do (exit 2 or 1).
    Anything else is a bug: its traceback goes to a log file (or stderr with
    --debug) and the line names that file (exit 1).
    """
    try:
        yield
    except CbirError as e:
        _say(str(e))
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        print("cbir: interrupted; rerun the same command to finish", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:
        # The reader went away (`cbir search ... | head`): quietly, like other tools.
        # stdout now points at /dev/null so flushing it at exit raises nothing.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(141)
    except Exception as e:
        if DEBUG:
            traceback.print_exc()
        if path := bad_path(e):  # caught here too for paths no option checked first
            _say(path)
            sys.exit(2)
        known = describe(e)
        if known:
            _say(known)
            sys.exit(1)
        where = "printed above"
        if not DEBUG:
            path = _log_file(catalog)
            try:
                with open(path, "a") as f:
                    f.write(f"--- {datetime.datetime.now().isoformat()} {' '.join(sys.argv)}\n")
                    traceback.print_exc(file=f)
                where = f"written to {path}"
            except OSError:
                where = "not saved (run with --debug to see it)"
        line = str(e).strip().splitlines()
        _say(
            f"unexpected {type(e).__name__}: {line[-1] if line else ''} (a bug; traceback {where})"
        )
        sys.exit(1)
