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

Values: every row of images, meta and indexes carries a checksum (`row_crc`),
sealed by the write function in the transaction that writes it and checked by
every reading function here; a row that fails is `DamagedRow`, one line.
"""

from __future__ import annotations

import fcntl
import json
import os
import sqlite3
import zlib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlite_utils

from pipeline import faults
from pipeline.errors import CbirError, path_problem

SCHEMA_VERSION = 5
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


# --- row checksums -------------------------------------------------------------------------

# SQLite checks its pages' structure, not the values in them: a flipped bit in a path,
# a label, `next_id` or an index record's parameters reads back as a valid, different
# value. So every row of the tables readers answer from carries `row_crc`, a CRC-32 of
# its table name and all its other columns (the key included, so a row cannot be
# swapped), and every reader checks the rows it uses. Every write function below seals
# the rows it writes in the same transaction (an insert of images rows carries its
# checksum; other writes re-seal by key with `cbir_row_crc`, registered on every
# connection), and first refuses to change a row that fails its checksum, so a writer
# never re-seals damage. `runs` is history that nothing answers from: not sealed.
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
    "digest",
    "data_digest",
)
META_COLUMNS = ("key", "value")
# The sealed tables: their columns in checksum order, and which of them are text (passed
# to `row_crc` as their bytes, so a name stored as a BLOB (not UTF-8) reads the same).
SEALED: dict[str, tuple[str, ...]] = {
    "images": IMAGE_COLUMNS,
    "meta": META_COLUMNS,
    "indexes": INDEX_COLUMNS,
}
_TEXT = {
    "path", "sha256", "label", "status", "error", "created_at", "updated_at", "file_key",
    "key", "value", "name", "factory", "params", "built_at", "note", "file", "digest",
    "data_digest",
}  # fmt: skip
_KEY = {"images": "id", "meta": "key", "indexes": "name"}


def row_crc(*values: Any) -> int:
    """CRC-32 of a row's values (table name first): of the repr of their tuple, which is
    unambiguous for the kinds SQLite hands over (int, float, bytes, None; text columns
    are passed as their bytes), and 3x faster than packing them (1.5 us a row)."""
    return zlib.crc32(repr(values).encode("utf-8", "surrogateescape"))


def _crc_sql(table: str) -> str:
    """The SQL expression of a row's checksum, over its columns as stored."""
    args = [f"cast({c} as blob)" if c in _TEXT else c for c in SEALED[table]]
    return f"cbir_row_crc('{table}', {', '.join(args)})"


def _seal_ddl(table: str) -> list[str]:
    """The row_crc column of one table, and the checksums of its rows from before (the
    migration to schema 5, in its one transaction)."""
    return [
        f"alter table {table} add column row_crc integer",
        f"update {table} set row_crc = {_crc_sql(table)}",
    ]


class DamagedRow(CbirError):
    """A catalog row a reader needs fails its checksum (exit 1)."""

    def __init__(self, message: str):
        super().__init__(message, exit_code=1)


def _register(conn: sqlite3.Connection) -> None:
    conn.create_function("cbir_row_crc", -1, row_crc, deterministic=True)


def _sealed(db: sqlite_utils.Database) -> bool:
    """Whether the catalog's rows carry checksums (schema 5); schema 4 is read without.

    Cached per SQLite schema cookie, so a reader sees a writer's upgrade at once.
    """
    cookie = db.conn.execute("pragma schema_version").fetchone()[0]
    cached = getattr(db, "_cbir_sealed", None)
    if cached is None or cached[0] != cookie:
        cols = {r[1] for r in db.conn.execute("pragma table_info(images)")}
        cached = (cookie, "row_crc" in cols)
        db._cbir_sealed = cached  # type: ignore[attr-defined]
    return cached[1]


def _intact(db: sqlite_utils.Database, table: str) -> str:
    """A SQL expression, true when a row of `table` matches its checksum (always on schema 4)."""
    return f"(row_crc is {_crc_sql(table)})" if _sealed(db) else "1"


def bad_rows(db: sqlite_utils.Database, table: str) -> list[Any]:
    """The keys of every row of `table` that fails its checksum (reads the whole table)."""
    if not _sealed(db):
        return []
    key = _KEY[table]
    sql = f"select {key} from {table} where not {_intact(db, table)} order by {key}"
    return [r[0] for r in db.conn.execute(sql)]


def unsealed(db: sqlite_utils.Database) -> bool:
    """Whether the catalog predates row checksums (schema 4: read unchecked)."""
    return not _sealed(db)


def rows_damage_text(bad: list[int]) -> str:
    """One line on images rows that fail their checksum: which, and how to repair them."""
    if len(bad) == 1:
        which = f"the catalog row of id {bad[0]} fails its checksum"
    else:
        which = f"{len(bad)} catalog rows (ids {bad[:5]}) fail their checksum"
    return (
        f"{which} (the catalog file is damaged), so no path or label of it is shown; "
        "'cbir verify --repair' drops damaged rows so that the next 'cbir index' indexes "
        "their files again"
    )


def meta_damage_text(keys: list[str]) -> str:
    return (
        f"the catalog's {', '.join(map(repr, keys))} fails its checksum (the catalog file is "
        "damaged); cbir cannot rebuild it: restore the catalog from a backup, or index the "
        "folders again into a new --catalog"
    )


def record_damage_text(names: list[str]) -> str:
    name = names[0] if len(names) == 1 else "NAME"
    fix = "cbir build-index exact" if name == "exact" else f"cbir build-index {name} --factory ..."
    return (
        f"the catalog's record of index {', '.join(map(repr, names))} fails its checksum (the "
        f"catalog file is damaged), so nothing in it can be trusted; build it anew with '{fix}'"
    )


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
    # The sha256 of each index file (NAME+TAG.faiss, and an on-disk index's .ivfdata),
    # taken before the record commits: a file damaged without a size change is refused.
    # A checksum of every row of images, meta and indexes (`row_crc`; the rows from
    # before get theirs here, in the same transaction).
    [
        "alter table indexes add column digest text",
        "alter table indexes add column data_digest text",
        *(sql for table in SEALED for sql in _seal_ddl(table)),
    ],
]
assert len(MIGRATIONS) == SCHEMA_VERSION
# The oldest schema a reader accepts as it is: the migrations since only add index-record
# digests and row checksums a reader can do without (an index recorded without digests,
# and rows without checksums, are read unchecked, and `verify` notes it), so a reader
# need not wait for a writer to upgrade the catalog.
READABLE_FROM = 4


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
        f"select value, {_intact(db, 'meta')} from meta where key = 'schema_version'"
    ).fetchone()
    if row is not None and not row[1]:
        raise DamagedRow(meta_damage_text(["schema_version"]))
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
    _register(conn)  # readers check rows with it; writers seal rows with it
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


def _chunks(keys: Iterable[Any]) -> Iterator[list[Any]]:
    keys = list(keys)
    for start in range(0, len(keys), 500):
        yield keys[start : start + 500]


def _refuse_damaged(db: sqlite_utils.Database, table: str, keys: Iterable[Any]) -> None:
    """Before a write changes these rows: DamagedRow if one fails its checksum (the
    transaction rolls back, nothing changed), so a writer never re-seals damage."""
    if not _sealed(db):
        return
    key = _KEY[table]
    for chunk in _chunks(keys):
        marks = ",".join("?" * len(chunk))
        sql = f"select {key} from {table} where {key} in ({marks}) and not {_intact(db, table)}"
        if bad := [r[0] for r in db.conn.execute(sql, chunk)]:
            texts = {"images": rows_damage_text, "meta": meta_damage_text}
            raise DamagedRow(texts.get(table, record_damage_text)(bad))


def _seal(db: sqlite_utils.Database, table: str, keys: Iterable[Any]) -> None:
    """Record the checksums of these rows as written, in the writer's transaction."""
    if not _sealed(db):
        return
    key = _KEY[table]
    for chunk in _chunks(keys):
        marks = ",".join("?" * len(chunk))
        write(db, f"update {table} set row_crc = {_crc_sql(table)} where {key} in ({marks})", chunk)


def set_meta(db: sqlite_utils.Database, key: str, value: Any) -> None:
    _refuse_damaged(db, "meta", [key])
    write(
        db,
        "insert into meta (key, value) values (?, ?) "
        "on conflict (key) do update set value = excluded.value",
        [key, str(value)],
    )
    _seal(db, "meta", [key])


def _bump_generation(db: sqlite_utils.Database) -> None:
    set_meta(db, "generation", generation(db) + 1)


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
            _seal(db, "images", [r["id"] for r in new_rows])
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


def drop_damaged_rows(db: sqlite_utils.Database, ids: list[int]) -> None:
    """Drop images rows that fail their checksum, in one transaction. Their SQLite index
    entries still hold the values from before the damage, so deleting the rows would
    find them missing ("malformed"): the images indexes are rebuilt from the rows first."""
    if not ids:
        return
    with transaction(db):
        write(db, "reindex images")
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
        _refuse_damaged(db, "images", crcs)
        write_many(
            db, "update images set vector_crc = ? where id = ?", [(c, i) for i, c in crcs.items()]
        )
        _seal(db, "images", crcs)


def set_file_keys(db: sqlite_utils.Database, keys: dict[int, str]) -> None:
    with transaction(db):
        _refuse_damaged(db, "images", keys)
        write_many(
            db, "update images set file_key = ? where id = ?", [(k, i) for i, k in keys.items()]
        )
        _seal(db, "images", keys)


def update_labels(db: sqlite_utils.Database, changes: dict[int, str | None]) -> None:
    if not changes:
        return
    stamp = now()
    with transaction(db):
        _refuse_damaged(db, "images", changes)
        write_many(
            db,
            "update images set label = ?, updated_at = ? where id = ?",
            [(label, stamp, image_id) for image_id, label in changes.items()],
        )
        _seal(db, "images", changes)


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


def save_index_record(db: sqlite_utils.Database, record: dict[str, Any]) -> None:
    with transaction(db):
        write(
            db,
            f"insert or replace into indexes ({', '.join(INDEX_COLUMNS)}) "
            f"values ({', '.join('?' * len(INDEX_COLUMNS))})",
            [record.get(c) for c in INDEX_COLUMNS],
        )
        _seal(db, "indexes", [record["name"]])  # a damaged record is replaced whole


# --- reading -------------------------------------------------------------------------------


def get_meta(db: sqlite_utils.Database, key: str, default: str | None = None) -> str | None:
    """A meta value, checked against its row's checksum (DamagedRow if it fails)."""
    row = db.conn.execute(
        f"select value, {_intact(db, 'meta')} from meta where key = ?", [key]
    ).fetchone()
    if row is None:
        # A key damaged into another reads as a missing one: look for damage before
        # answering with the default.
        if bad := bad_rows(db, "meta"):
            raise DamagedRow(meta_damage_text([str(k) for k in bad]))
        return default
    if not row[1]:
        raise DamagedRow(meta_damage_text([key]))
    return row[0]


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


def _checked(db: sqlite_utils.Database, sql: str, params: Iterable[Any] = ()) -> list[dict]:
    """Rows of an images query whose select list ends with `_intact` as `intact`;
    DamagedRow (one line) if any of them fails its checksum."""
    rows = list(db.query(sql, list(params)))
    bad = sorted(r["id"] for r in rows if not r.pop("intact"))
    if bad:
        raise DamagedRow(rows_damage_text(bad))
    return rows


def rows_by_path(db: sqlite_utils.Database) -> dict[str, dict[str, Any]]:
    sql = (
        "select id, path, size, mtime, sha256, label, status, "
        f"{_intact(db, 'images')} as intact from images"
    )
    return {r["path"]: r for r in _checked(db, sql)}


# A row is in the collection only below next_id (its meta value checked): rows past it
# are left by a torn commit of an older cbir, invisible to readers until a writer drops them.
_COMMITTED = "id < ?"


def rows_by_file_key(db: sqlite_utils.Database) -> dict[str, dict[str, Any]]:
    sql = (
        f"select id, path, file_key, {_intact(db, 'images')} as intact from images "
        "where file_key is not null and file_key != ''"
    )
    return {r["file_key"]: r for r in _checked(db, sql)}


def indexed_ids(db: sqlite_utils.Database):
    """Indexed, committed ids; unchecked (the rows' checksums: `bad_rows`, which
    `Collection.indexed_ids` runs once per generation)."""
    import numpy as np

    sql = f"select id from images where status = 'indexed' and {_COMMITTED} order by id"
    return np.asarray([r[0] for r in db.conn.execute(sql, [next_id(db)])], dtype=np.int64)


def vector_crcs(db: sqlite_utils.Database, ids=None) -> dict[int, int | None]:
    """id -> recorded CRC-32 of its vector row, for every indexed image (or those of `ids`)."""
    sql = f"select id, vector_crc from images where status = 'indexed' and {_COMMITTED}"
    committed = next_id(db)
    if ids is None:
        return {r[0]: r[1] for r in db.conn.execute(sql, [committed])}
    ids = [int(i) for i in ids]
    out: dict[int, int | None] = {}
    for start in range(0, len(ids), 500):
        chunk = ids[start : start + 500]
        marks = ",".join("?" * len(chunk))
        found = db.conn.execute(f"{sql} and id in ({marks})", [committed, *chunk])
        out.update({r[0]: r[1] for r in found})
    return out


def lookup(db: sqlite_utils.Database, ids) -> dict[int, dict[str, Any]]:
    """Rows of the given ids (path, label, status), fetched in one query per 500; each
    checked against its checksum (DamagedRow, one line, if one fails)."""
    ids = [int(i) for i in ids]
    out: dict[int, dict[str, Any]] = {}
    committed = next_id(db)
    for start in range(0, len(ids), 500):
        chunk = ids[start : start + 500]
        marks = ",".join("?" * len(chunk))
        sql = (
            f"select id, path, label, status, {_intact(db, 'images')} as intact from images "
            f"where id in ({marks}) and {_COMMITTED}"
        )
        for r in _checked(db, sql, [*chunk, committed]):
            out[r["id"]] = r
    return out


def find_by_sha(db: sqlite_utils.Database, sha256: str) -> int | None:
    sql = (
        f"select id, {_intact(db, 'images')} as intact from images where sha256 = ? "
        f"and status = 'indexed' and {_COMMITTED} limit 1"
    )
    rows = _checked(db, sql, [sha256, next_id(db)])
    return rows[0]["id"] if rows else None


def index_records(db: sqlite_utils.Database, check: bool = True) -> list[dict[str, Any]]:
    """Every index record; `check` refuses one that fails its checksum (DamagedRow), else
    each carries `intact` (verify reports them)."""
    sql = f"select *, {_intact(db, 'indexes')} as intact from indexes order by name"
    rows = list(db.query(sql))
    bad = [r["name"] for r in rows if not r["intact"]]
    if check and bad:
        raise DamagedRow(record_damage_text(bad))
    for r in rows:
        r.pop("row_crc", None)
        if check:
            r.pop("intact")
    return rows


def index_record(db: sqlite_utils.Database, name: str) -> dict[str, Any] | None:
    """The record of index `name`, checked (DamagedRow if it, or any record when it is
    not found, fails its checksum: a damaged name reads as a missing index)."""
    sql = f"select *, {_intact(db, 'indexes')} as intact from indexes where name = ?"
    rows = list(db.query(sql, [name]))
    if not rows:
        if bad := bad_rows(db, "indexes"):
            raise DamagedRow(record_damage_text([str(n) for n in bad]))
        return None
    if not rows[0].pop("intact"):
        raise DamagedRow(record_damage_text([name]))
    rows[0].pop("row_crc", None)
    return rows[0]


# --- one writer ----------------------------------------------------------------------------


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
