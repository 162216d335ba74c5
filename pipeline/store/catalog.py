"""The SQLite catalog file: opening it (reader or writer) and the one-writer lock.

The catalog holds images, meta (fingerprint, schema version), runs and indexes. It
is the source of truth together with the vector file: an image is in the
collection only when its row here says so. Row id = FAISS vector id = row in
the vector file. Ids are never reused (`next_id` only grows).

The catalog's code is split by job: `schema` (tables, columns, migrations),
`seals` (row checksums), `reads` (checked reads), `writes` (one transaction per
logical change) and this module, which opens the file. Schema creation and
migrations happen only in `open_writer`, whose caller holds `write_lock`;
`open_reader` opens the file read-only and never writes.

Values: every row of images, meta and indexes carries a checksum (`row_crc`),
sealed by the write function in the transaction that writes it and checked by
every reading function; a row that fails is `DamagedRow`, one line.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import sqlite_utils

from pipeline import faults
from pipeline.errors import CatalogNotReady, CbirError, WriterBusy, path_problem
from pipeline.store import seals
from pipeline.store.schema import APP_ID, MIGRATIONS, READABLE_FROM, SCHEMA_VERSION
from pipeline.store.writes import set_meta, transaction, write


# File names are bytes on POSIX; Python hands undecodable ones over as str with lone
# surrogates (os.fsdecode), which SQLite's UTF-8 text cannot hold. Such a str is
# stored as the original bytes (a BLOB) and every TEXT value read back goes through
# os.fsdecode, so names survive the round trip exactly; valid UTF-8 is unchanged.
# The adapter is process-wide (sqlite3 has no per-connection adapters); it only
# changes strings that would otherwise fail to bind.
def _adapt_text(value: str) -> str | bytes:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return os.fsencode(value)
    return value


sqlite3.register_adapter(str, _adapt_text)
sqlite3.register_converter("TEXT", os.fsdecode)


def _schema_version(db: sqlite_utils.Database, path: Path) -> int:
    """The catalog's schema version, 0 for an empty file; refuses a foreign SQLite file."""
    conn = db.conn
    tables = {r[0] for r in conn.execute("select name from sqlite_master where type = 'table'")}
    app_id = conn.execute("pragma application_id").fetchone()[0]
    if not tables and app_id in (0, APP_ID):
        return 0
    if app_id not in (0, APP_ID) or "meta" not in tables or "images" not in tables:
        raise CbirError(f"{path} is an SQLite file but not a cbir catalog; it was left untouched")
    row = conn.execute(
        f"select value, {seals.intact(db, 'meta')} from meta where key = 'schema_version'"
    ).fetchone()
    if row is not None and not row[1]:
        raise seals.DamagedRow(seals.meta_damage_text(["schema_version"]))
    try:
        return int(row[0])
    except (TypeError, ValueError):
        raise CbirError(
            f"{path} is an SQLite file but not a cbir catalog; it was left untouched"
        ) from None


def _check_file(path: Path) -> None:
    """Refuse a folder or an unreadable file in one line, without opening it.

    The catalog file must never be opened outside SQLite: closing any handle to
    it drops every POSIX lock this process holds on it, SQLite's included, after
    which another process may delete the WAL under our connections. A file that
    is not SQLite is told by SQLite itself ("file is not a database"), before
    anything is written to it.
    """
    if path.is_dir():
        raise CbirError(f"{path} is a folder, not a catalog file")
    if not os.access(path, os.R_OK):
        raise CbirError(f"cannot read catalog {path}: permission denied")


def _absent(path: Path) -> CbirError:
    """Why no catalog is at `path`: a symlink loop or a file on the way, or none made yet."""
    if problem := path_problem(path, folder=False):
        return CbirError(f"catalog {problem}")
    return CbirError(f"no catalog at {path}: run 'cbir index FOLDER' first")


def _connect(path: Path, readonly: bool) -> sqlite_utils.Database:
    kwargs: dict[str, Any] = {
        "isolation_level": None,
        "check_same_thread": False,
        "timeout": 10,
        "detect_types": sqlite3.PARSE_DECLTYPES,
    }
    if not readonly:
        conn = sqlite3.connect(str(path), **kwargs)
    else:
        uri = f"{path.resolve().as_uri()}?mode=ro"
        conn = sqlite3.connect(uri, uri=True, **kwargs)
        try:
            conn.execute("select 1 from sqlite_master limit 1").fetchall()
        except sqlite3.OperationalError:
            # A WAL catalog in a folder where its -shm cannot be created (a read-only
            # mount): with no -wal file there is nothing uncheckpointed to miss, so
            # it is opened as immutable, which needs no -shm.
            wal = Path(str(path) + "-wal")
            if os.access(path.parent, os.W_OK) or (wal.exists() and wal.stat().st_size):
                raise
            conn.close()
            conn = sqlite3.connect(uri + "&immutable=1", uri=True, **kwargs)
    conn.execute("PRAGMA busy_timeout = 10000")
    seals.register(conn)  # readers check rows with it; writers seal rows with it
    return sqlite_utils.Database(conn, execute_plugins=False)


def _sqlite_error(path: Path, e: sqlite3.Error) -> CbirError:
    text = str(e)
    if "readonly" in text or "read-only" in text:
        return CbirError(f"catalog {path} is read-only here ({text}); writing needs write access")
    return CbirError(
        f"{path} is not a usable SQLite catalog ({text}); 'cbir verify' tells more", exit_code=1
    )


def open_writer(path: str | Path, create: bool = True) -> sqlite_utils.Database:
    """Open a catalog to write it, creating or migrating its schema; hold `write_lock` first."""
    path = Path(path)
    if not path.exists():
        if not create:
            raise _absent(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise CbirError(
                f"cannot create the catalog's folder {path.parent}: {e.strerror}"
            ) from None
    else:
        _check_file(path)
    try:
        db = _connect(path, readonly=False)
        version = _schema_version(db, path)  # before any write: a foreign file stays untouched
        if version > SCHEMA_VERSION:
            raise CbirError(
                f"{path} has schema version {version}, newer than this cbir ({SCHEMA_VERSION}): upgrade cbir"
            )
        if db.conn.execute("pragma journal_mode").fetchone()[0] != "wal":
            db.conn.execute("PRAGMA journal_mode = WAL")
            faults.step("sql journal_mode=wal")
        db.conn.execute("PRAGMA synchronous = FULL")
        if version < SCHEMA_VERSION:
            _migrate(db, path)
    except sqlite3.Error as e:
        raise _sqlite_error(path, e) from None
    return db


def _migrate(db: sqlite_utils.Database, path: Path) -> None:
    """All pending migrations in one transaction, the version re-read inside it."""
    with transaction(db):
        version = _schema_version(db, path)
        for step in range(version, SCHEMA_VERSION):
            for sql in MIGRATIONS[step]:
                write(db, sql)
        set_meta(db, "schema_version", SCHEMA_VERSION)


def open_reader(path: str | Path) -> sqlite_utils.Database:
    """Open a catalog read-only: no lock, no schema change, works in a read-only folder."""
    path = Path(path)
    if not path.exists():
        raise _absent(path)
    _check_file(path)
    try:
        db = _connect(path, readonly=True)
        version = _schema_version(db, path)
    except sqlite3.Error as e:
        raise _sqlite_error(path, e) from None
    if version == 0:
        raise CatalogNotReady(f"catalog {path} is being created; retry, or run 'cbir index FOLDER'")
    if version < READABLE_FROM:
        raise CatalogNotReady(
            f"catalog {path} has schema version {version}, older than this cbir's {SCHEMA_VERSION}: "
            "retry if a job is upgrading it, or run 'cbir verify --repair' to upgrade it"
        )
    if version > SCHEMA_VERSION:
        raise CbirError(
            f"{path} has schema version {version}, newer than this cbir ({SCHEMA_VERSION}): upgrade cbir"
        )
    return db


# --- one writer ----------------------------------------------------------------------------


# The lock files this process holds open. A process forked while a job holds the lock
# shares the open file, and so the lock, until it exits: OpenVINO's telemetry forks one
# from a thread on `import openvino` to send a report (and waits seconds on a network
# that may not answer), and the next job in this process or another would be refused.
# So a forked child closes its copies at once; the parent's copy still holds the lock.
_held: set[int] = set()


def _forget_locks_in_child() -> None:
    for fd in list(_held):
        with suppress(OSError):
            os.close(fd)
    _held.clear()


os.register_at_fork(after_in_child=_forget_locks_in_child)


def lock_path(catalog_path: str | Path) -> Path:
    """The lock belongs to the file, not the name: symlinks and '..' resolve to one lock."""
    return Path(os.path.realpath(catalog_path) + ".lock")


@contextmanager
def write_lock(catalog_path: str | Path) -> Iterator[None]:
    """One writer at a time per catalog file; a second job fails at once instead of interleaving."""
    if problem := path_problem(catalog_path, folder=False):  # before the lock file is made
        raise CbirError(f"catalog {problem}")
    path = lock_path(catalog_path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise CbirError(
            f"cannot write in {path.parent} ({e.strerror}): writing the catalog needs a writable folder"
        ) from None
    _held.add(fd)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise WriterBusy(
                f"another cbir job is writing to {catalog_path}; wait for it to finish"
            ) from None
        yield
    finally:
        _held.discard(fd)
        os.close(fd)
