"""The catalog's schema as data: tables and columns, version, application id, migrations.

Nothing here touches a connection: this is what a catalog file holds, shared by
the row checksums (`seals`: which columns a row's checksum covers), the readers
(`reads`), the writers (`writes`) and the opening (`catalog`: the version check
and running the migrations), so every one of them agrees on one description.

Row checksums: SQLite checks its pages' structure, not the values in them, so
every row of the tables readers answer from carries `row_crc`, a CRC-32 of its
table name and all its other columns (`SEALED`, in checksum order; see `seals`).
`runs` is history that nothing answers from: not sealed.
"""

from __future__ import annotations

SCHEMA_VERSION = 6
# PRAGMA application_id of a cbir catalog ("cbir"), so a foreign SQLite file is told apart.
APP_ID = 0x63626972

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
    # When the photo was taken: its EXIF date (DateTimeOriginal, else DateTime or
    # DateTimeDigitized; local time unless the EXIF gives an offset) as unix seconds, else
    # the file's mtime; `taken_from` says which ('exif' or 'mtime'). NULL on rows from
    # before schema 6 until the next `cbir index` reads their EXIF headers (a date filter
    # uses their mtime meanwhile: `retrieval.filters`).
    "taken_at",
    "taken_from",
)
# The images columns of schema 5 (what its row checksums cover): the migration to schema 6
# re-seals the rows that pass their schema-5 checksum, and only those.
IMAGE_COLUMNS_5 = IMAGE_COLUMNS[:-2]


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
    "data_digest", "taken_from",
}  # fmt: skip
# The key column of each sealed table: what a damaged row is named by.
KEY = {"images": "id", "meta": "key", "indexes": "name"}


def crc_sql(table: str, columns: tuple[str, ...] | None = None) -> str:
    """The SQL expression of a row's checksum, over its columns as stored (the SQL
    function `cbir_row_crc` is `seals.row_crc`, registered on every connection);
    `columns`: those of an older schema (default: this schema's, `SEALED`)."""
    args = [f"cast({c} as blob)" if c in _TEXT else c for c in columns or SEALED[table]]
    return f"cbir_row_crc('{table}', {', '.join(args)})"


def _seal_ddl(table: str) -> list[str]:
    """The row_crc column of one table, and the checksums of its rows from before (the
    migration to schema 5, in its one transaction): over the columns schema 5 has."""
    columns = IMAGE_COLUMNS_5 if table == "images" else None
    return [
        f"alter table {table} add column row_crc integer",
        f"update {table} set row_crc = {crc_sql(table, columns)}",
    ]


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
    # The date of each image (`taken_at`, `taken_from`: see IMAGE_COLUMNS), for date
    # filters. The images rows' checksums cover every column, so each row that passes its
    # schema-5 checksum is sealed anew over the new columns in the same transaction; a row
    # that fails it keeps its checksum and so still fails (a migration never seals damage).
    [
        "alter table images add column taken_at float",
        "alter table images add column taken_from text",
        # The rows a job still has to date (`reads.undated`), found without a table scan
        # by every job (`cbir watch` runs one per batch of changes).
        "create index idx_images_undated on images (id) where taken_at is null",
        f"update images set row_crc = {crc_sql('images')} "
        f"where row_crc is {crc_sql('images', IMAGE_COLUMNS_5)}",
    ],
]
assert len(MIGRATIONS) == SCHEMA_VERSION
# The oldest schema a reader accepts as it is: the migrations since only add index-record
# digests and row checksums a reader can do without (an index recorded without digests,
# and rows without checksums, are read unchecked, and `verify` notes it), and the images
# dates (schema 6: a reader checks a schema-5 row over the columns it has, `seals.intact`,
# and filters its dates by mtime), so a reader need not wait for a writer to upgrade the
# catalog. (A cbir of schema 5 refuses a schema-6 catalog: "newer than this cbir".)
READABLE_FROM = 4
