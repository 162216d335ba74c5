"""The SQLite catalog: images, meta (fingerprint, schema version), runs, indexes.

It is the source of truth together with the vector file: an image is in the
collection only when its row here says so. Row id = FAISS vector id = row in
the vector file. Ids are never reused (`next_id` only grows).
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlite_utils

from pipeline.errors import CbirError

SCHEMA_VERSION = 2


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _migrate_0_to_1(db: sqlite_utils.Database) -> None:
    db["images"].create(
        {
            "id": int,
            "path": str,
            "size": int,
            "mtime": float,
            "sha256": str,
            "width": int,
            "height": int,
            "label": str,
            "status": str,  # "indexed" or "failed"
            "error": str,
            "run_id": int,
            "created_at": str,
            "updated_at": str,
        },
        pk="id",
        not_null={"path", "status"},
    )
    db["images"].create_index(["path"], unique=True)
    db["images"].create_index(["sha256"])
    db["images"].create_index(["label"])
    db["meta"].create({"key": str, "value": str}, pk="key")
    db["runs"].create(
        {
            "id": int,
            "command": str,
            "started_at": str,
            "ended_at": str,
            "status": str,  # running, done, failed; a "running" row after a crash stays so
            "config": str,
            "counts": str,
        },
        pk="id",
    )
    db["indexes"].create(
        {
            "name": str,
            "factory": str,
            "params": str,
            "generation": int,
            "ntotal": int,
            "bytes": int,
            "recall_at_10": float,
            "build_seconds": float,
            "built_at": str,
        },
        pk="name",
    )


def _migrate_1_to_2(db: sqlite_utils.Database) -> None:
    # How an index was chosen (build-index --auto): the reasoning, for `cbir info`.
    db["indexes"].add_column("note", str)


# MIGRATIONS[i] takes a catalog from schema version i to i + 1.
MIGRATIONS = [_migrate_0_to_1, _migrate_1_to_2]
assert len(MIGRATIONS) == SCHEMA_VERSION


def open_catalog(path: str | Path, create: bool = True) -> sqlite_utils.Database:
    """Open (and create or migrate) a catalog in WAL mode."""
    path = Path(path)
    if not path.exists() and not create:
        raise CbirError(f"no catalog at {path}: run 'cbir index FOLDER' first")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        db = sqlite_utils.Database(path)
        db.execute("PRAGMA busy_timeout = 10000")
        db.enable_wal()
        db.execute("PRAGMA synchronous = FULL")
        version = get_meta_int(db, "schema_version", 0) if db["meta"].exists() else 0
    except sqlite_utils.db.sqlite3.DatabaseError as e:
        raise CbirError(f"{path} is not a usable SQLite catalog: {e}", exit_code=1) from None
    if version > SCHEMA_VERSION:
        raise CbirError(
            f"{path} has schema version {version}, newer than this cbir ({SCHEMA_VERSION}): upgrade cbir"
        )
    for step in range(version, SCHEMA_VERSION):
        with db.conn:
            MIGRATIONS[step](db)
            set_meta(db, "schema_version", step + 1)
    return db


def get_meta(db: sqlite_utils.Database, key: str, default: str | None = None) -> str | None:
    rows = list(db.query("select value from meta where key = ?", [key]))
    return rows[0]["value"] if rows else default


def get_meta_int(db: sqlite_utils.Database, key: str, default: int = 0) -> int:
    value = get_meta(db, key)
    return int(value) if value is not None else default


def set_meta(db: sqlite_utils.Database, key: str, value: Any) -> None:
    db["meta"].upsert({"key": key, "value": str(value)}, pk="key")


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


def indexed_ids(db: sqlite_utils.Database):
    import numpy as np

    ids = [r["id"] for r in db.query("select id from images where status = 'indexed' order by id")]
    return np.asarray(ids, dtype=np.int64)


def lookup(db: sqlite_utils.Database, ids) -> dict[int, dict[str, Any]]:
    """Rows of the given ids (path, label, status), fetched in one query per 500."""
    ids = [int(i) for i in ids]
    out: dict[int, dict[str, Any]] = {}
    for start in range(0, len(ids), 500):
        chunk = ids[start : start + 500]
        marks = ",".join("?" * len(chunk))
        for r in db.query(
            f"select id, path, label, status from images where id in ({marks})", chunk
        ):
            out[r["id"]] = r
    return out


def find_by_sha(db: sqlite_utils.Database, sha256: str) -> int | None:
    rows = list(
        db.query("select id from images where sha256 = ? and status = 'indexed' limit 1", [sha256])
    )
    return rows[0]["id"] if rows else None


def commit_batch(
    db: sqlite_utils.Database,
    new_rows: list[dict[str, Any]],
    replaced_ids: list[int],
    next_row: int,
) -> None:
    """In one transaction: drop replaced rows, insert new ones, advance next_id."""
    with db.conn:
        if replaced_ids:
            marks = ",".join("?" * len(replaced_ids))
            db.execute(f"delete from images where id in ({marks})", replaced_ids)
        if new_rows:
            db["images"].insert_all(new_rows)
        set_meta(db, "next_id", next_row)
        if replaced_ids or any(r["status"] == "indexed" for r in new_rows):
            set_meta(db, "generation", generation(db) + 1)


def delete_rows(db: sqlite_utils.Database, ids: list[int]) -> None:
    if not ids:
        return
    with db.conn:
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            db.execute(f"delete from images where id in ({','.join('?' * len(chunk))})", chunk)
        set_meta(db, "generation", generation(db) + 1)


def update_labels(db: sqlite_utils.Database, changes: dict[int, str | None]) -> None:
    with db.conn:
        for image_id, label in changes.items():
            db.execute(
                "update images set label = ?, updated_at = ? where id = ?", [label, now(), image_id]
            )


def start_run(db: sqlite_utils.Database, command: str, config: dict[str, Any]) -> int:
    with db.conn:
        return (
            db["runs"]
            .insert(
                {
                    "command": command,
                    "started_at": now(),
                    "status": "running",
                    "config": json.dumps(config, sort_keys=True, default=str),
                }
            )
            .last_pk
        )


def end_run(db: sqlite_utils.Database, run_id: int, status: str, counts: dict[str, Any]) -> None:
    with db.conn:
        db["runs"].update(
            run_id, {"ended_at": now(), "status": status, "counts": json.dumps(counts)}
        )


def index_records(db: sqlite_utils.Database) -> list[dict[str, Any]]:
    return list(db.query("select * from indexes order by name"))


def index_record(db: sqlite_utils.Database, name: str) -> dict[str, Any] | None:
    rows = list(db.query("select * from indexes where name = ?", [name]))
    return rows[0] if rows else None


def save_index_record(db: sqlite_utils.Database, record: dict[str, Any]) -> None:
    with db.conn:
        db["indexes"].upsert(record, pk="name")


@contextmanager
def write_lock(catalog_path: str | Path) -> Iterator[None]:
    """One writer at a time per catalog; a second job fails at once instead of interleaving."""
    lock_path = Path(str(catalog_path) + ".lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
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
