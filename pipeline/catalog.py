"""The SQLite catalog: images, meta (fingerprint, schema version), runs, indexes.

It is the source of truth together with the vector file: an image is in the
collection only when its row here says so. Row id = FAISS vector id = row in
the vector file. Ids are never reused (`next_id` only grows).

Writes: every logical change is one explicit `BEGIN IMMEDIATE ... COMMIT`
(`transaction`), made of plain SQL statements. The connection runs in
autocommit mode (`isolation_level=None`) and no sqlite-utils write method is
used, because those commit on their own (`with conn:`) in the middle of ours.
Schema creation and migrations happen only in `open_writer`, whose caller
holds `write_lock`; `open_reader` opens the file read-only and never writes.
"""

from __future__ import annotations

import fcntl
import json
import os
import sqlite3
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlite_utils

from pipeline import faults
from pipeline.errors import CbirError

SCHEMA_VERSION = 4
# PRAGMA application_id of a cbir catalog ("cbir"), so a foreign SQLite file is told apart.
APP_ID = 0x63626972


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


def shown(text: str) -> str:
    """A file name as printable text: undecodable bytes become U+FFFD (display only)."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


class CatalogNotReady(CbirError):
    """A reader found a catalog that a writer is creating or has yet to upgrade."""


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


# --- schema --------------------------------------------------------------------------------

# MIGRATIONS[i] takes a catalog from schema version i to i + 1: plain DDL, run
# inside the one transaction that also records the new version.
MIGRATIONS: list[list[str]] = [
    [
        """create table images (
            id integer primary key, path text not null, size integer, mtime float,
            sha256 text, width integer, height integer, label text,
            status text not null,  -- 'indexed' or 'failed'
            error text, run_id integer, created_at text, updated_at text)""",
        "create unique index idx_images_path on images (path)",
        "create index idx_images_sha256 on images (sha256)",
        "create index idx_images_label on images (label)",
        "create table meta (key text primary key, value text)",
        """create table runs (
            id integer primary key, command text, started_at text, ended_at text,
            status text,  -- running, done, failed; a 'running' row after a crash stays so
            config text, counts text)""",
        """create table indexes (
            name text primary key, factory text, params text, generation integer,
            ntotal integer, bytes integer, recall_at_10 float, build_seconds float,
            built_at text)""",
    ],
    # How an index was chosen (build-index --auto): the reasoning, for `cbir info`.
    ["alter table indexes add column note text"],
    # CRC-32 of each indexed vector row, written with the row, checked on every full read.
    # The index file a record describes: each build writes a new file, and committing the
    # record switches to it, so a crash leaves the old index or the new one, never a mix.
    [
        "alter table images add column vector_crc integer",
        "alter table indexes add column file text",
        # 'st_dev:st_ino' of the file when indexed: the same file under a second path
        # (a symlinked folder, a hard link) is one image, not two.
        "alter table images add column file_key text",
        "create index idx_images_file_key on images (file_key)",
        f"pragma application_id = {APP_ID}",
    ],
    # Growing and on-disk indexes: the recall@10 measured when the index was last trained
    # (an update that falls further below it is refused: a retrain is due), and the size
    # of an on-disk index's inverted-list file NAME+TAG.ivfdata (NULL for a one-file index).
    [
        "alter table indexes add column trained_recall float",
        "alter table indexes add column data_bytes integer",
    ],
]
assert len(MIGRATIONS) == SCHEMA_VERSION


def _schema_version(db: sqlite_utils.Database, path: Path) -> int:
    """The catalog's schema version, 0 for an empty file; refuses a foreign SQLite file."""
    conn = db.conn
    tables = {r[0] for r in conn.execute("select name from sqlite_master where type = 'table'")}
    app_id = conn.execute("pragma application_id").fetchone()[0]
    if not tables and app_id in (0, APP_ID):
        return 0
    if app_id not in (0, APP_ID) or "meta" not in tables or "images" not in tables:
        raise CbirError(f"{path} is an SQLite file but not a cbir catalog; it was left untouched")
    row = conn.execute("select value from meta where key = 'schema_version'").fetchone()
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
            raise CbirError(f"no catalog at {path}: run 'cbir index FOLDER' first")
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
        raise CbirError(f"no catalog at {path}: run 'cbir index FOLDER' first")
    _check_file(path)
    try:
        db = _connect(path, readonly=True)
        version = _schema_version(db, path)
    except sqlite3.Error as e:
        raise _sqlite_error(path, e) from None
    if version == 0:
        raise CatalogNotReady(f"catalog {path} is being created; retry, or run 'cbir index FOLDER'")
    if version < SCHEMA_VERSION:
        raise CatalogNotReady(
            f"catalog {path} has schema version {version}, older than this cbir's {SCHEMA_VERSION}: "
            "retry if a job is upgrading it, or run 'cbir verify --repair' to upgrade it"
        )
    if version > SCHEMA_VERSION:
        raise CbirError(
            f"{path} has schema version {version}, newer than this cbir ({SCHEMA_VERSION}): upgrade cbir"
        )
    return db


# --- writing -------------------------------------------------------------------------------


@contextmanager
def transaction(db: sqlite_utils.Database) -> Iterator[None]:
    """One logical change: BEGIN IMMEDIATE ... COMMIT, rolled back whole on any error."""
    conn = db.conn
    if conn.in_transaction:
        raise RuntimeError("catalog transactions do not nest")
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
    faults.step("sql commit")


def write(db: sqlite_utils.Database, sql: str, params: Iterable[Any] = ()) -> sqlite3.Cursor:
    """One SQL write statement; only inside `transaction`."""
    if not db.conn.in_transaction:
        raise RuntimeError("catalog writes go through catalog.transaction")
    cursor = db.conn.execute(sql, tuple(params))
    faults.step("sql " + sql.split(None, 2)[0].lower())
    return cursor


def write_many(db: sqlite_utils.Database, sql: str, rows: list[tuple[Any, ...]]) -> None:
    if not db.conn.in_transaction:
        raise RuntimeError("catalog writes go through catalog.transaction")
    db.conn.executemany(sql, rows)
    faults.step("sql " + sql.split(None, 2)[0].lower() + " many")


def set_meta(db: sqlite_utils.Database, key: str, value: Any) -> None:
    write(
        db,
        "insert into meta (key, value) values (?, ?) "
        "on conflict (key) do update set value = excluded.value",
        [key, str(value)],
    )


def _bump_generation(db: sqlite_utils.Database) -> None:
    set_meta(db, "generation", generation(db) + 1)


IMAGE_COLUMNS = (
    "id",
    "path",
    "size",
    "mtime",
    "sha256",
    "width",
    "height",
    "label",
    "status",
    "error",
    "run_id",
    "created_at",
    "updated_at",
    "vector_crc",
    "file_key",
)


def commit_batch(
    db: sqlite_utils.Database,
    new_rows: list[dict[str, Any]],
    replaced_ids: list[int],
    next_row: int,
) -> None:
    """In one transaction: drop replaced rows, insert new ones, advance next_id."""
    with transaction(db):
        _delete(db, replaced_ids)
        if new_rows:
            write_many(
                db,
                f"insert into images ({', '.join(IMAGE_COLUMNS)}) "
                f"values ({', '.join('?' * len(IMAGE_COLUMNS))})",
                [tuple(r.get(c) for c in IMAGE_COLUMNS) for r in new_rows],
            )
        set_meta(db, "next_id", next_row)
        if replaced_ids or any(r["status"] == "indexed" for r in new_rows):
            _bump_generation(db)


def _delete(db: sqlite_utils.Database, ids: list[int]) -> None:
    for start in range(0, len(ids), 500):
        chunk = [int(i) for i in ids[start : start + 500]]
        write(db, f"delete from images where id in ({','.join('?' * len(chunk))})", chunk)


def delete_rows(db: sqlite_utils.Database, ids: list[int]) -> None:
    """Drop rows (pruned or damaged) in one transaction; their ids are never reused."""
    if not ids:
        return
    with transaction(db):
        _delete(db, ids)
        _bump_generation(db)


def drop_rows_from(db: sqlite_utils.Database, first_id: int) -> int:
    """Drop rows with id >= first_id (left by a torn commit, or whose vectors are gone)."""
    n = db.conn.execute("select count(*) from images where id >= ?", [first_id]).fetchone()[0]
    if n:
        with transaction(db):
            write(db, "delete from images where id >= ?", [first_id])
            _bump_generation(db)
    return n


def set_vector_crcs(db: sqlite_utils.Database, crcs: dict[int, int]) -> None:
    with transaction(db):
        write_many(
            db, "update images set vector_crc = ? where id = ?", [(c, i) for i, c in crcs.items()]
        )


def set_file_keys(db: sqlite_utils.Database, keys: dict[int, str]) -> None:
    with transaction(db):
        write_many(
            db, "update images set file_key = ? where id = ?", [(k, i) for i, k in keys.items()]
        )


def update_labels(db: sqlite_utils.Database, changes: dict[int, str | None]) -> None:
    if not changes:
        return
    stamp = now()
    with transaction(db):
        write_many(
            db,
            "update images set label = ?, updated_at = ? where id = ?",
            [(label, stamp, image_id) for image_id, label in changes.items()],
        )


def adopt_model(
    db: sqlite_utils.Database,
    fingerprint_text: str,
    dim: int,
    source: str,
    producer_text: str,
    calibration_text: str | None = None,
) -> None:
    """Record the model (family and producer) of a new catalog, all of it or nothing."""
    with transaction(db):
        set_meta(db, "fingerprint", fingerprint_text)
        set_meta(db, "dimension", dim)
        set_meta(db, "metric", "inner_product")
        set_meta(db, "weights_source", source)
        set_meta(db, "producer", producer_text)
        if calibration_text is not None:
            set_meta(db, "calibration_paths", calibration_text)


def mark_mixed(db: sqlite_utils.Database, producer_text: str) -> None:
    """Record that vectors of another producer (same family) were added, as the user allowed."""
    with transaction(db):
        set_meta(db, "mixed_producer", producer_text)


def start_run(db: sqlite_utils.Database, command: str, config: dict[str, Any]) -> int:
    with transaction(db):
        cursor = write(
            db,
            "insert into runs (command, started_at, status, config) values (?, ?, 'running', ?)",
            [command, now(), json.dumps(config, sort_keys=True, default=str)],
        )
        return int(cursor.lastrowid)


def close_dead_runs(db: sqlite_utils.Database) -> int:
    """Mark runs left 'running' by a job that died (the caller holds the write lock)."""
    n = db.conn.execute("select count(*) from runs where status = 'running'").fetchone()[0]
    if n:
        with transaction(db):
            write(
                db,
                "update runs set status = 'interrupted', ended_at = ? where status = 'running'",
                [now()],
            )
    return n


def end_run(db: sqlite_utils.Database, run_id: int, status: str, counts: dict[str, Any]) -> None:
    with transaction(db):
        write(
            db,
            "update runs set ended_at = ?, status = ?, counts = ? where id = ?",
            [now(), status, json.dumps(counts), run_id],
        )


INDEX_COLUMNS = (
    "name",
    "factory",
    "params",
    "generation",
    "ntotal",
    "bytes",
    "recall_at_10",
    "build_seconds",
    "built_at",
    "note",
    "file",
    "trained_recall",
    "data_bytes",
)


def save_index_record(db: sqlite_utils.Database, record: dict[str, Any]) -> None:
    with transaction(db):
        write(
            db,
            f"insert or replace into indexes ({', '.join(INDEX_COLUMNS)}) "
            f"values ({', '.join('?' * len(INDEX_COLUMNS))})",
            [record.get(c) for c in INDEX_COLUMNS],
        )


# --- reading -------------------------------------------------------------------------------


def get_meta(db: sqlite_utils.Database, key: str, default: str | None = None) -> str | None:
    row = db.conn.execute("select value from meta where key = ?", [key]).fetchone()
    return row[0] if row else default


def get_meta_int(db: sqlite_utils.Database, key: str, default: int = 0) -> int:
    value = get_meta(db, key)
    try:
        return int(value) if value is not None else default
    except ValueError:
        raise CbirError(f"the catalog's {key} is damaged ({value!r})", exit_code=1) from None


def fingerprint(db: sqlite_utils.Database) -> dict[str, Any] | None:
    value = get_meta(db, "fingerprint")
    return json.loads(value) if value else None


def dimension(db: sqlite_utils.Database) -> int:
    return get_meta_int(db, "dimension", 0)


def next_id(db: sqlite_utils.Database) -> int:
    return get_meta_int(db, "next_id", 0)


def generation(db: sqlite_utils.Database) -> int:
    """A counter bumped by every commit that changes the set of indexed vectors."""
    return get_meta_int(db, "generation", 0)


def rows_by_path(db: sqlite_utils.Database) -> dict[str, dict[str, Any]]:
    sql = "select id, path, size, mtime, sha256, label, status from images"
    return {r["path"]: r for r in db.query(sql)}


# A row is in the collection only below next_id: rows past it are left by a torn
# commit of an older cbir, invisible to readers until a writer drops them.
_COMMITTED = "id < coalesce((select cast(value as integer) from meta where key = 'next_id'), 0)"


def rows_by_file_key(db: sqlite_utils.Database) -> dict[str, dict[str, Any]]:
    sql = "select id, path, file_key from images where file_key is not null and file_key != ''"
    return {r["file_key"]: r for r in db.query(sql)}


def indexed_ids(db: sqlite_utils.Database):
    import numpy as np

    sql = f"select id from images where status = 'indexed' and {_COMMITTED} order by id"
    return np.asarray([r[0] for r in db.conn.execute(sql)], dtype=np.int64)


def vector_crcs(db: sqlite_utils.Database) -> dict[int, int | None]:
    """id -> recorded CRC-32 of its vector row, for every indexed image."""
    sql = f"select id, vector_crc from images where status = 'indexed' and {_COMMITTED}"
    return {r[0]: r[1] for r in db.conn.execute(sql)}


def lookup(db: sqlite_utils.Database, ids) -> dict[int, dict[str, Any]]:
    """Rows of the given ids (path, label, status), fetched in one query per 500."""
    ids = [int(i) for i in ids]
    out: dict[int, dict[str, Any]] = {}
    for start in range(0, len(ids), 500):
        chunk = ids[start : start + 500]
        marks = ",".join("?" * len(chunk))
        for r in db.query(
            f"select id, path, label, status from images where id in ({marks}) and {_COMMITTED}",
            chunk,
        ):
            out[r["id"]] = r
    return out


def find_by_sha(db: sqlite_utils.Database, sha256: str) -> int | None:
    row = db.conn.execute(
        f"select id from images where sha256 = ? and status = 'indexed' and {_COMMITTED} limit 1",
        [sha256],
    ).fetchone()
    return row[0] if row else None


def index_records(db: sqlite_utils.Database) -> list[dict[str, Any]]:
    return list(db.query("select * from indexes order by name"))


def index_record(db: sqlite_utils.Database, name: str) -> dict[str, Any] | None:
    rows = list(db.query("select * from indexes where name = ?", [name]))
    return rows[0] if rows else None


# --- one writer ----------------------------------------------------------------------------


def lock_path(catalog_path: str | Path) -> Path:
    """The lock belongs to the file, not the name: symlinks and '..' resolve to one lock."""
    return Path(os.path.realpath(catalog_path) + ".lock")


@contextmanager
def write_lock(catalog_path: str | Path) -> Iterator[None]:
    """One writer at a time per catalog file; a second job fails at once instead of interleaving."""
    path = lock_path(catalog_path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise CbirError(
            f"cannot write in {path.parent} ({e.strerror}): writing the catalog needs a writable folder"
        ) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise CbirError(
                f"another cbir job is writing to {catalog_path}; wait for it to finish"
            ) from None
        yield
    finally:
        os.close(fd)
