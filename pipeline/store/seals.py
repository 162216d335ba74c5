"""Row checksums of the catalog: computing them, checking them, and the words for damage.

SQLite checks its pages' structure, not the values in them: a flipped bit in a path,
a label, `next_id` or an index record's parameters reads back as a valid, different
value. So every row of the tables readers answer from carries `row_crc`, a CRC-32 of
its table name and all its other columns (the key included, so a row cannot be
swapped; the columns are `schema.SEALED`), and every reader checks the rows it uses
(`reads`). Every write function seals the rows it writes in the same transaction
(`writes`), with `cbir_row_crc`, registered on every connection (`catalog`).

Apart from reading and writing because both need it, and it needs neither.
"""

from __future__ import annotations

import sqlite3
import zlib
from typing import Any

import sqlite_utils

from pipeline.errors import CbirError
from pipeline.store.schema import IMAGE_COLUMNS, KEY, crc_sql


def row_crc(*values: Any) -> int:
    """CRC-32 of a row's values (table name first): of the repr of their tuple, which is
    unambiguous for the kinds SQLite hands over (int, float, bytes, None; text columns
    are passed as their bytes), and 3x faster than packing them (1.5 us a row)."""
    return zlib.crc32(repr(values).encode("utf-8", "surrogateescape"))


class DamagedRow(CbirError):
    """A catalog row a reader needs fails its checksum (exit 1)."""

    def __init__(self, message: str):
        super().__init__(message, exit_code=1)


def register(conn: sqlite3.Connection) -> None:
    """Make `cbir_row_crc` (`row_crc`) callable from the SQL of this connection."""
    conn.create_function("cbir_row_crc", -1, row_crc, deterministic=True)


def _images_columns(db: sqlite_utils.Database) -> tuple[bool, tuple[str, ...]]:
    """(whether rows carry checksums, the `IMAGE_COLUMNS` the images table has), cached per
    SQLite schema cookie, so a reader sees a writer's upgrade at once."""
    cookie = db.conn.execute("pragma schema_version").fetchone()[0]
    cached = getattr(db, "_cbir_sealed", None)
    if cached is None or cached[0] != cookie:
        cols = {r[1] for r in db.conn.execute("pragma table_info(images)")}
        cached = (cookie, "row_crc" in cols, tuple(c for c in IMAGE_COLUMNS if c in cols))
        db._cbir_sealed = cached  # type: ignore[attr-defined]
    return cached[1], cached[2]


def sealed(db: sqlite_utils.Database) -> bool:
    """Whether the catalog's rows carry checksums (schema 5); schema 4 is read without."""
    return _images_columns(db)[0]


def has_column(db: sqlite_utils.Database, column: str) -> bool:
    """Whether the catalog's images table has this column (a reader of an older schema)."""
    return column in _images_columns(db)[1]


def intact(db: sqlite_utils.Database, table: str) -> str:
    """A SQL expression, true when a row of `table` matches its checksum (always on schema 4).

    An images row is checked over the columns its catalog has: a reader of a schema-5
    catalog (no dates yet) checks it as schema 5 sealed it."""
    sealed_, columns = _images_columns(db)
    if not sealed_:
        return "1"
    return f"(row_crc is {crc_sql(table, columns if table == 'images' else None)})"


def bad_rows(db: sqlite_utils.Database, table: str) -> list[Any]:
    """The keys of every row of `table` that fails its checksum (reads the whole table)."""
    if not sealed(db):
        return []
    key = KEY[table]
    sql = f"select {key} from {table} where not {intact(db, table)} order by {key}"
    bad = [r[0] for r in db.conn.execute(sql)]
    return still_bad(db, table, bad) if bad else bad


def still_bad(db: sqlite_utils.Database, table: str, keys: list[Any]) -> list[Any]:
    """Of `keys`, the rows that fail their checksum when checked again, sorted. A reader
    that chose the columns to check (`intact`) just before a writer upgraded the schema
    (5 -> 6: every images row sealed anew over more columns) sees every row fail once;
    checked again over the columns the table has now, the intact ones pass."""
    key, out = KEY[table], []
    for start in range(0, len(keys), 500):
        chunk = keys[start : start + 500]
        marks = ",".join("?" * len(chunk))
        sql = f"select {key} from {table} where {key} in ({marks}) and not {intact(db, table)}"
        out += [r[0] for r in db.conn.execute(sql, chunk)]
    return sorted(out)


def unsealed(db: sqlite_utils.Database) -> bool:
    """Whether the catalog predates row checksums (schema 4: read unchecked)."""
    return not sealed(db)


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
