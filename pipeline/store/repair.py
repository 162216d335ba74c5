"""What a writer repairs on opening: leftovers of an interrupted job, and a lost catalog.

`collection.writing` runs these under the write lock, before anything is written.
They work on the catalog connection and the files (not on a `Collection`), so the
collection module, which opens collections, can call them without a circle;
dropping damaged rows on request (`collection.drop_damaged`) needs a Collection's
checked rows and stays there.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import sqlite_utils

from pipeline.errors import CbirError
from pipeline.store import reads, seals, vectors, writes

log = logging.getLogger("cbir")


def refuse_lost_catalog(catalog_path: str | Path) -> None:
    """Refuse a 0-byte catalog beside a non-empty vector file, before anything is written.

    A new catalog would adopt the vector file and cut it to its 0 committed rows; an
    empty file where a catalog was is a lost catalog (a failed copy, a full disk), not a
    new one. (A missing catalog is a new one: its old vector file is cut.)
    """
    real = Path(os.path.realpath(catalog_path))
    vec = vectors.vectors_path(real)
    try:
        empty = real.stat().st_size == 0
        wal = Path(f"{real}-wal")  # a WAL may hold what the main file does not yet
        empty = empty and not (wal.exists() and wal.stat().st_size)
        size = vec.stat().st_size if empty and vec.exists() else 0
    except OSError:
        return  # no catalog yet, or one the opening reports on
    if size:
        raise CbirError(
            f"catalog {catalog_path} is empty (0 bytes) but its vector file {vec} holds "
            f"{size:,} bytes of vectors: the catalog was lost or truncated. Restore it from a "
            f"backup, or move {vec.name} away to start a new catalog; nothing was changed"
        )


def repair(
    db: sqlite_utils.Database, catalog_path: str | Path, drop_lost: bool = False
) -> list[str]:
    """Bring catalog and vector file back to one consistent state (writers); returns what was done.

    Only what an interrupted job leaves is repaired on every open:
    - rows at or past `next_id` (a commit torn by an older cbir) are dropped, so
      their files are indexed again;
    - vector bytes past `next_id` (a batch fsynced but never committed) are cut;
    - indexed rows without a vector checksum (catalogs older than schema 3) get one;
    - runs left 'running' by a killed job are marked 'interrupted'.

    A vector file shorter than `next_id` rows is never a torn write (vectors are
    fsynced before the rows that point at them are committed): it is damage, refused
    in one line with nothing changed, unless `drop_lost` (`verify --repair`) drops
    the rows past its end (so their files are indexed again) and pads it back.
    """
    vec = vectors.vectors_path(catalog_path)
    done: list[str] = []
    dim = reads.dimension(db)
    committed = reads.next_id(db) if dim else 0
    indexed = len(reads.indexed_ids(db)) if dim else 0  # damaged rows: dropped or refused later
    if not vec.exists() and indexed:
        raise CbirError(
            f"vector file {vec} is missing but the catalog has {indexed} indexed images: "
            "restore it beside the catalog, or start a new catalog",
            exit_code=1,
        )
    if dim and not drop_lost:
        vectors.check(vec, dim, committed)  # before anything is written: refused, untouched
    # Holding the lock, any run still 'running' belongs to a job that was killed.
    writes.close_dead_runs(db)
    if not dim:
        return done
    on_disk = vectors.row_count(vec, dim)
    durable = min(committed, on_disk)
    dropped = writes.drop_rows_from(db, durable)
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
    missing = [i for i, c in reads.vector_crcs(db).items() if c is None]
    unkeyed = list(db.query("select id, path from images where file_key is null"))
    if missing or unkeyed:  # in a sealed catalog only damage leaves these empty: not re-sealed
        bad = set(seals.bad_rows(db, "images"))
        missing = [i for i in missing if i not in bad]
        unkeyed = [r for r in unkeyed if r["id"] not in bad]
    if missing:
        rows = vectors.open_rows(vec, dim, committed)
        ids = np.asarray(sorted(missing), dtype=np.int64)
        crcs: dict[int, int] = {}
        for start in range(0, len(ids), 65536):
            chunk = ids[start : start + 65536]
            crcs.update(zip(chunk.tolist(), vectors.crc(rows[chunk]), strict=True))
        writes.set_vector_crcs(db, crcs)
        done.append(f"recorded checksums of {len(crcs)} vectors (catalog from an older cbir)")
    if unkeyed:
        # '' marks a file that is gone, so it is not looked for again at every open.
        writes.set_file_keys(db, {r["id"]: file_key(r["path"]) or "" for r in unkeyed})
        done.append(
            f"recorded file identities of {len(unkeyed)} images (catalog from an older cbir)"
        )
    for line in done:
        if not line.startswith("cut "):  # routine after any kill; the rest is worth a notice
            log.warning("repaired %s: %s", Path(catalog_path), line)
    return done


def file_key(path: str) -> str | None:
    """'st_dev:st_ino' of the file a path names (after symlinks), or None if it is gone."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return f"{st.st_dev}:{st.st_ino}"
