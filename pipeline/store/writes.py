"""Writing the catalog: one transaction per logical change, every row sealed as written.

Every logical change is one explicit `BEGIN IMMEDIATE ... COMMIT` (`transaction`),
made of plain SQL statements (`write`, `write_many`). The connection runs in
autocommit mode (`isolation_level=None`, see `catalog`) and no sqlite-utils write
method is used, because those commit on their own (`with conn:`) in the middle of
ours. Only a writer calls these: its connection comes from `catalog.open_writer`,
under `catalog.write_lock`.

Every write function here seals the rows it writes in the same transaction (an insert
of images rows carries its checksum; other writes re-seal by key with `cbir_row_crc`),
and first refuses to change a row that fails its checksum, so a writer never re-seals
damage (`seals`).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

import sqlite_utils

from pipeline import faults
from pipeline.errors import CbirError
from pipeline.store import reads
from pipeline.store.schema import IMAGE_COLUMNS, INDEX_COLUMNS, KEY, crc_sql
from pipeline.store.seals import (
    DamagedRow,
    intact,
    meta_damage_text,
    record_damage_text,
    rows_damage_text,
    sealed,
)


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


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
        raise RuntimeError("catalog writes go through writes.transaction")
    cursor = db.conn.execute(sql, tuple(params))
    faults.step("sql " + sql.split(None, 2)[0].lower())
    return cursor


def write_many(db: sqlite_utils.Database, sql: str, rows: list[tuple[Any, ...]]) -> None:
    if not db.conn.in_transaction:
        raise RuntimeError("catalog writes go through writes.transaction")
    db.conn.executemany(sql, rows)
    faults.step("sql " + sql.split(None, 2)[0].lower() + " many")


def _chunks(keys: Iterable[Any]) -> Iterator[list[Any]]:
    keys = list(keys)
    for start in range(0, len(keys), 500):
        yield keys[start : start + 500]


def _refuse_damaged(db: sqlite_utils.Database, table: str, keys: Iterable[Any]) -> None:
    """Before a write changes these rows: DamagedRow if one fails its checksum (the
    transaction rolls back, nothing changed), so a writer never re-seals damage."""
    if not sealed(db):
        return
    key = KEY[table]
    for chunk in _chunks(keys):
        marks = ",".join("?" * len(chunk))
        sql = f"select {key} from {table} where {key} in ({marks}) and not {intact(db, table)}"
        if bad := [r[0] for r in db.conn.execute(sql, chunk)]:
            texts = {"images": rows_damage_text, "meta": meta_damage_text}
            raise DamagedRow(texts.get(table, record_damage_text)(bad))


def _seal(db: sqlite_utils.Database, table: str, keys: Iterable[Any]) -> None:
    """Record the checksums of these rows as written, in the writer's transaction."""
    if not sealed(db):
        return
    key = KEY[table]
    for chunk in _chunks(keys):
        marks = ",".join("?" * len(chunk))
        write(db, f"update {table} set row_crc = {crc_sql(table)} where {key} in ({marks})", chunk)


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
    set_meta(db, "generation", reads.generation(db) + 1)


def _bump_rows_version(db: sqlite_utils.Database) -> None:
    """Rows rewritten with the same vectors: what readers keep of rows (a server's list of
    images, its folder picker) is made again; indexes are not (`reads.rows_version`)."""
    set_meta(db, "rows_version", reads.rows_version(db) + 1)


def commit_batch(
    db: sqlite_utils.Database,
    new_rows: list[dict[str, Any]],
    replaced_ids: list[int],
    next_row: int,
) -> None:
    """In one transaction: drop replaced rows, insert new ones, advance next_id."""
    with transaction(db):
        _delete(db, replaced_ids)
        _insert(db, new_rows)
        set_meta(db, "next_id", next_row)
        if replaced_ids or any(r["status"] == "indexed" for r in new_rows):
            _bump_generation(db)


def _insert(db: sqlite_utils.Database, rows: list[dict[str, Any]]) -> None:
    """Insert images rows, sealed (inside the caller's transaction)."""
    if not rows:
        return
    write_many(
        db,
        f"insert into images ({', '.join(IMAGE_COLUMNS)}) "
        f"values ({', '.join('?' * len(IMAGE_COLUMNS))})",
        [tuple(r.get(c) for c in IMAGE_COLUMNS) for r in rows],
    )
    _seal(db, "images", [r["id"] for r in rows])


def restore_rows(db: sqlite_utils.Database, rows: list[dict[str, Any]]) -> None:
    """Put back images rows that a duplicates move took out (its undo), each with its own
    id and every value it had, sealed anew, in one transaction. Only committed ids that
    no row holds: an id is never given to another image, so it can only come back."""
    if not rows:
        return
    committed = reads.next_id(db)
    if bad := [r["id"] for r in rows if not 0 <= int(r["id"]) < committed]:
        raise CbirError(f"cannot restore catalog rows of ids {bad[:5]}: never committed", 1)
    with transaction(db):
        _insert(db, rows)
        _bump_generation(db)


def move_rows(
    db: sqlite_utils.Database, moves: dict[int, dict[str, Any]], displaced: list[int]
) -> None:
    """Moved or renamed images, in one transaction: each row of `moves` (id -> its new
    path, mtime, file_key, label) takes those values and keeps its id, vector and the rest;
    `displaced` rows (whose path a moved file took) are dropped. Rows are deleted and put
    back sealed, so two rows may trade paths (a swap) without the unique path index
    meeting one path twice. The generation stays (the same ids hold the same vectors, so
    no index goes stale) unless a displaced row went."""
    if not moves:
        return
    stamp = now()
    with transaction(db):
        _refuse_damaged(db, "images", [*moves, *displaced])
        rows = reads.image_rows(db, moves)
        if lost := sorted(set(moves) - set(rows)):
            raise CbirError(f"cannot move catalog rows of ids {lost[:5]}: not in the catalog", 1)
        _delete(db, [*moves, *displaced])
        _insert(db, [{**rows[i], **moves[i], "updated_at": stamp} for i in moves])
        _bump_rows_version(db)
        if displaced:
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


def set_dates(db: sqlite_utils.Database, dates: dict[int, tuple[float, str]]) -> None:
    """Record the date of images whose rows have none (catalogued before schema 6): id ->
    (unix seconds, 'exif' or 'mtime'), in one transaction. Not a change of the indexed
    vectors, so the generation stays (the rows version moves)."""
    if not dates:
        return
    with transaction(db):
        _refuse_damaged(db, "images", dates)
        write_many(
            db,
            "update images set taken_at = ?, taken_from = ? where id = ?",
            [(at, source, image_id) for image_id, (at, source) in dates.items()],
        )
        _seal(db, "images", dates)
        _bump_rows_version(db)  # a date filter kept by a reader may now pass other ids


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
        _bump_rows_version(db)


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
