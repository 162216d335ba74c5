"""Opening a collection (catalog + vector file) to read or to write, and repairing it.

A writer holds the write lock, may create or migrate the schema, and repairs
what an interrupted job (or an older cbir with a torn commit) left behind
before it writes anything. A reader opens the catalog read-only and never
changes a byte: uncommitted vector rows may belong to a batch that a running
job is about to commit, and only rows below `next_id` count as committed.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import sqlite_utils

from pipeline import catalog, vectors
from pipeline.errors import CbirError

log = logging.getLogger("cbir")


def open_reader(catalog_path: str | Path) -> sqlite_utils.Database:
    """Open read-only and check that the vector file holds every committed row."""
    db = catalog.open_reader(catalog_path)
    dim = catalog.dimension(db)
    if dim:
        vectors.check(vectors.vectors_path(catalog_path), dim, catalog.next_id(db))
    return db


def open_writer(catalog_path: str | Path, create: bool = True) -> sqlite_utils.Database:
    """Open to write (the caller holds `catalog.write_lock`), after repairing leftovers."""
    db = catalog.open_writer(catalog_path, create=create)
    repair(db, catalog_path)
    return db


def repair(db: sqlite_utils.Database, catalog_path: str | Path) -> list[str]:
    """Bring catalog and vector file back to one consistent state; returns what was done.

    - rows at or past `next_id` (a commit torn by an older cbir) or past the end of
      the vector file (their vectors were cut) are dropped, so their files are
      indexed again;
    - vector bytes past `next_id` (a batch fsynced but never committed) are cut;
    - indexed rows without a vector checksum (catalogs older than schema 3) get one;
    - runs left 'running' by a killed job are marked 'interrupted'.
    """
    done: list[str] = []
    # Holding the lock, any run still 'running' belongs to a job that was killed.
    catalog.close_dead_runs(db)
    dim = catalog.dimension(db)
    if not dim:
        return done
    vec = vectors.vectors_path(catalog_path)
    committed = catalog.next_id(db)
    indexed = len(catalog.indexed_ids(db))
    if not vec.exists() and indexed:
        raise CbirError(
            f"vector file {vec} is missing but the catalog has {indexed} indexed images: "
            "restore it beside the catalog, or start a new catalog",
            exit_code=1,
        )
    on_disk = vectors.row_count(vec, dim)
    durable = min(committed, on_disk)
    dropped = catalog.drop_rows_from(db, durable)
    if dropped:
        done.append(
            f"dropped {dropped} catalog rows at or past id {durable} whose vectors were never "
            "committed or are gone; their files are indexed again"
        )
    if on_disk < committed:
        # Nothing points at these rows any more; the file must still reach next_id,
        # because ids are never reused and the next batch is written at next_id.
        if not vec.exists():
            vec.touch()
        vectors.resize(vec, committed, dim)
        done.append(f"vector file was {on_disk} rows for {committed} ids; padded")
    else:
        cut = vectors.recover(vec, dim, committed)
        if cut:
            done.append(f"cut {cut} uncommitted vector rows left by an interrupted job")
    missing = [i for i, c in catalog.vector_crcs(db).items() if c is None]
    if missing:
        rows = vectors.open_rows(vec, dim, committed)
        ids = np.asarray(sorted(missing), dtype=np.int64)
        crcs: dict[int, int] = {}
        for start in range(0, len(ids), 65536):
            chunk = ids[start : start + 65536]
            crcs.update(zip(chunk.tolist(), vectors.crc(rows[chunk]), strict=True))
        catalog.set_vector_crcs(db, crcs)
        done.append(f"recorded checksums of {len(crcs)} vectors (catalog from an older cbir)")
    unkeyed = list(db.query("select id, path from images where file_key is null"))
    if unkeyed:
        # '' marks a file that is gone, so it is not looked for again at every open.
        catalog.set_file_keys(db, {r["id"]: file_key(r["path"]) or "" for r in unkeyed})
        done.append(
            f"recorded file identities of {len(unkeyed)} images (catalog from an older cbir)"
        )
    for line in done:
        if not line.startswith("cut "):  # routine after any kill; the rest is worth a notice
            log.warning("repaired %s: %s", catalog_path, line)
    return done


def file_key(path: str) -> str | None:
    """'st_dev:st_ino' of the file a path names (after symlinks), or None if it is gone."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return f"{st.st_dev}:{st.st_ino}"


def damaged_ids(db: sqlite_utils.Database, catalog_path: str | Path) -> list[int]:
    """Indexed ids whose vector row no longer matches its checksum (reads every row)."""
    dim = catalog.dimension(db)
    ids = catalog.indexed_ids(db)
    if not dim or not len(ids):
        return []
    rows = vectors.open_rows(vectors.vectors_path(catalog_path), dim, catalog.next_id(db))
    return vectors.damaged(rows, ids, catalog.vector_crcs(db))
