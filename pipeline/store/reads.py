"""Reading the catalog: meta values, images rows, index records, each checked.

Every function here checks the rows it answers from against their checksums
(`seals`) and refuses a damaged one in one line (`DamagedRow`), except where
it says unchecked (the caller checks every row once per generation). Readers
and writers both read through here; a reader's connection comes from
`catalog.open_reader`, a writer's from `catalog.open_writer`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import numpy as np
import sqlite_utils

from pipeline.errors import CbirError
from pipeline.store.schema import IMAGE_COLUMNS
from pipeline.store.seals import (
    DamagedRow,
    bad_rows,
    intact,
    meta_damage_text,
    record_damage_text,
    rows_damage_text,
    still_bad,
)


def get_meta(db: sqlite_utils.Database, key: str, default: str | None = None) -> str | None:
    """A meta value, checked against its row's checksum (DamagedRow if it fails)."""
    row = db.conn.execute(
        f"select value, {intact(db, 'meta')} from meta where key = ?", [key]
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


def rows_version(db: sqlite_utils.Database) -> int:
    """A counter bumped by every commit that rewrites what rows show (a move, a relabel,
    a date) without changing the indexed vectors, so without a new generation."""
    return get_meta_int(db, "rows_version", 0)


def _checked(db: sqlite_utils.Database, sql: str, params: Iterable[Any] = ()) -> list[dict]:
    """Rows of an images query whose select list ends with `intact` as `intact`;
    DamagedRow (one line) if any of them fails its checksum."""
    rows = list(db.query(sql, list(params)))
    bad = sorted(r["id"] for r in rows if not r.pop("intact"))
    if bad and (bad := still_bad(db, "images", bad)):  # not a schema upgraded meanwhile
        raise DamagedRow(rows_damage_text(bad))
    return rows


def rows_by_path(db: sqlite_utils.Database) -> dict[str, dict[str, Any]]:
    sql = (
        "select id, path, size, mtime, sha256, label, status, "
        f"{intact(db, 'images')} as intact from images"
    )
    return {r["path"]: r for r in _checked(db, sql)}


# A row is in the collection only below next_id (its meta value checked): rows past it
# are left by a torn commit of an older cbir, invisible to readers until a writer drops them.
_COMMITTED = "id < ?"


def rows_by_file_key(db: sqlite_utils.Database) -> dict[str, dict[str, Any]]:
    sql = (
        f"select id, path, file_key, {intact(db, 'images')} as intact from images "
        "where file_key is not null and file_key != ''"
    )
    return {r["file_key"]: r for r in _checked(db, sql)}


def indexed_ids(db: sqlite_utils.Database) -> np.ndarray:
    """Indexed, committed ids; unchecked (the rows' checksums: `seals.bad_rows`, which
    `Collection.indexed_ids` runs once per generation)."""
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


def _by_ids(db: sqlite_utils.Database, ids, columns: str) -> dict[int, dict[str, Any]]:
    """Committed rows of the given ids (`columns` of each), fetched in one query per 500;
    each checked against its checksum (DamagedRow, one line, if one fails)."""
    ids = [int(i) for i in ids]
    out: dict[int, dict[str, Any]] = {}
    committed = next_id(db)
    for start in range(0, len(ids), 500):
        chunk = ids[start : start + 500]
        marks = ",".join("?" * len(chunk))
        sql = (
            f"select id, {columns}, {intact(db, 'images')} as intact from images "
            f"where id in ({marks}) and {_COMMITTED}"
        )
        for r in _checked(db, sql, [*chunk, committed]):
            out[r["id"]] = r
    return out


def lookup(db: sqlite_utils.Database, ids) -> dict[int, dict[str, Any]]:
    """Rows of the given ids (path, label, status), checked (see `_by_ids`)."""
    return _by_ids(db, ids, "path, label, status")


def details(db: sqlite_utils.Database, ids) -> dict[int, dict[str, Any]]:
    """What a person compares duplicates by: path, label, size, mtime, sha256, width and
    height of the given ids, checked (see `_by_ids`)."""
    return _by_ids(db, ids, "path, label, size, mtime, sha256, width, height")


def image_rows(db: sqlite_utils.Database, ids) -> dict[int, dict[str, Any]]:
    """Whole rows (every column of `schema.IMAGE_COLUMNS`) of the given ids, checked (see
    `_by_ids`): what a duplicates move logs, so that its undo puts them back exactly."""
    return _by_ids(db, ids, ", ".join(c for c in IMAGE_COLUMNS if c != "id"))


def by_paths(db: sqlite_utils.Database, paths: Iterable[str]) -> dict[str, dict[str, Any]]:
    """Committed rows (id, path, label, status, error) of the given paths, checked (see
    `_by_ids`): a few files' ids without reading every row (`rows_by_path`)."""
    paths = list(paths)
    out: dict[str, dict[str, Any]] = {}
    committed = next_id(db)
    for start in range(0, len(paths), 500):
        chunk = paths[start : start + 500]
        sql = (
            f"select id, path, label, status, error, {intact(db, 'images')} as intact "
            f"from images where path in ({','.join('?' * len(chunk))}) and {_COMMITTED}"
        )
        for r in _checked(db, sql, [*chunk, committed]):
            out[r["path"]] = r
    return out


def undated(db: sqlite_utils.Database) -> dict[str, dict[str, Any]]:
    """path -> row (id, size, mtime) of every indexed, committed image that has no date yet
    (catalogued before schema 6), checked (see `_checked`)."""
    sql = (
        f"select id, path, size, mtime, {intact(db, 'images')} as intact from images "
        f"where taken_at is null and status = 'indexed' and {_COMMITTED}"
    )
    return {r["path"]: r for r in _checked(db, sql, [next_id(db)])}


def find_by_sha(db: sqlite_utils.Database, sha256: str) -> int | None:
    sql = (
        f"select id, {intact(db, 'images')} as intact from images where sha256 = ? "
        f"and status = 'indexed' and {_COMMITTED} limit 1"
    )
    rows = _checked(db, sql, [sha256, next_id(db)])
    return rows[0]["id"] if rows else None


def index_records(db: sqlite_utils.Database, check: bool = True) -> list[dict[str, Any]]:
    """Every index record; `check` refuses one that fails its checksum (DamagedRow), else
    each carries `intact` (verify reports them)."""
    sql = f"select *, {intact(db, 'indexes')} as intact from indexes order by name"
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
    sql = f"select *, {intact(db, 'indexes')} as intact from indexes where name = ?"
    rows = list(db.query(sql, [name]))
    if not rows:
        if bad := bad_rows(db, "indexes"):
            raise DamagedRow(record_damage_text([str(n) for n in bad]))
        return None
    if not rows[0].pop("intact"):
        raise DamagedRow(record_damage_text([name]))
    rows[0].pop("row_crc", None)
    return rows[0]
