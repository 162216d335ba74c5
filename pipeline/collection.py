"""The open collection: catalog, committed vector rows, index folder, model fingerprint.

`reading(...)` opens one for reading: the catalog read-only (a connection per
thread, so a web server can share it), never a byte written. `writing(...)`
takes the write lock, creates or migrates the schema, and repairs what an
interrupted job (or an older cbir with a torn commit) left behind before
anything is written. Everything else takes a `Collection`; nothing else
derives file paths, maps the vector file or checks a fingerprint.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import sqlite_utils

from pipeline import catalog, vectors
from pipeline.errors import CbirError

log = logging.getLogger("cbir")


class Collection:
    """One collection, opened once and passed in (reader or writer)."""

    def __init__(
        self, catalog_path: str | Path, index_dir: str | Path, writer: bool, db, check: bool = True
    ):
        self.path = Path(catalog_path)
        self.index_dir = Path(index_dir)
        self.writer = writer
        self.vectors_path = vectors.vectors_path(catalog_path)
        self._db = db
        self._local = threading.local()
        self._local.db = db
        self._rows_lock = threading.Lock()
        self._index_lock = threading.Lock()  # loading an index maps rows: two locks, no deadlock
        self._rows: tuple[int, np.ndarray] | None = None
        self._indexes: dict[tuple[str, int, bool], tuple[Any, dict[str, Any]]] = {}
        self.repaired: list[str] = []  # what the writer's repair did on opening
        if check and not writer and self.dim:
            vectors.check(self.vectors_path, self.dim, self.next_id)

    # --- the catalog --------------------------------------------------------------------

    @property
    def db(self) -> sqlite_utils.Database:
        """The catalog connection; a reader opens one per thread (sqlite3 objects stay in theirs)."""
        if self.writer:
            return self._db
        db = getattr(self._local, "db", None)
        if db is None:
            db = self._local.db = catalog.open_reader(self.path)
        return db

    @property
    def dim(self) -> int:
        return catalog.dimension(self.db)

    @property
    def next_id(self) -> int:
        return catalog.next_id(self.db)

    @property
    def generation(self) -> int:
        return catalog.generation(self.db)

    @property
    def fingerprint(self) -> dict[str, Any] | None:
        return catalog.fingerprint(self.db)

    def indexed_ids(self) -> np.ndarray:
        return catalog.indexed_ids(self.db)

    # --- the vectors --------------------------------------------------------------------

    def rows(self) -> np.ndarray:
        """The committed rows of the vector file, memory-mapped (re-mapped as it grows)."""
        committed = self.next_id
        with self._rows_lock:
            if self._rows is None or self._rows[0] != committed:
                self._rows = (committed, vectors.open_rows(self.vectors_path, self.dim, committed))
            return self._rows[1]

    def vectors(self, ids) -> np.ndarray:
        """Copies of the stored vectors of `ids` (committed ids only)."""
        return vectors.take(self.rows(), ids)

    # --- the model ----------------------------------------------------------------------

    @property
    def producer(self) -> dict[str, Any] | None:
        """What computed the catalog's vectors (Keras fp32 for catalogs that predate producers)."""
        from pipeline.embed import KERAS_FP32

        if self.fingerprint is None:
            return None
        text = catalog.get_meta(self.db, "producer")
        return json.loads(text) if text else dict(KERAS_FP32)

    @property
    def calibration_paths(self) -> list[str]:
        """The int8 calibration images the catalog's producer was quantised with."""
        text = catalog.get_meta(self.db, "calibration_paths")
        return json.loads(text) if text else []

    def check_embedder(
        self, embedder, allow_mixed: bool = False, calibration: list[str] | None = None
    ) -> None:
        """The one model check: vectors of different model families never mix, and
        vectors of another producer of the same family are added only when allowed.

        A writer on a catalog without a model adopts this one (with the int8
        `calibration` images, so later commands can rebuild the same model).
        """
        from pipeline.embed import (
            describe_mismatch,
            describe_producer,
            fingerprint_json,
            same_producer,
        )

        stored, current = self.fingerprint, embedder.fingerprint
        if stored is None:
            if self.writer:
                catalog.adopt_model(
                    self.db,
                    fingerprint_json(current),
                    current["dimension"],
                    embedder.source,
                    json.dumps(embedder.producer, sort_keys=True),
                    json.dumps(sorted(calibration)) if calibration else None,
                )
            return
        if fingerprint_json(stored) != fingerprint_json(current):
            differs = describe_mismatch(stored, current)
            if self.writer:
                raise CbirError(
                    "the catalog's vectors were made by a different model or preprocessing "
                    f"({differs}); use a new --catalog, or the same --weights"
                )
            raise CbirError(
                f"the query model differs from the one that built the catalog ({differs}); "
                "pass the catalog's --weights"
            )
        recorded = self.producer or {}
        if same_producer(recorded, embedder.producer):
            return
        was, now = describe_producer(recorded), describe_producer(embedder.producer)
        if not self.writer:
            log.warning(
                "the catalog's vectors come from %s, this query's from %s (the same model): "
                "scores may differ slightly",
                was,
                now,
            )
            return
        if not allow_mixed:
            raise CbirError(
                f"the catalog's vectors come from {was}, this job would add vectors from {now}; "
                "leave --runtime/--precision at auto to use the catalog's, or pass --allow-mixed"
            )
        log.warning("adding %s vectors to a catalog of %s vectors, as --allow-mixed asks", now, was)
        catalog.mark_mixed(self.db, json.dumps(embedder.producer, sort_keys=True))

    # --- indexes ------------------------------------------------------------------------

    def index(self, name: str, params: dict[str, float] | None = None, allow_stale: bool = False):
        """(index, record, parameters in force) of a named index, loaded once per generation.

        With explicit `params` the index is loaded afresh for the caller, so a
        shared cached index never has its parameters changed under another thread.
        """
        from pipeline import indexes

        if params:
            return indexes.load(self, name, params, allow_stale)
        key = (name, self.generation, allow_stale)
        with self._index_lock:
            if key not in self._indexes:
                self._indexes = {k: v for k, v in self._indexes.items() if k[1] == key[1]}
                index, record, _ = indexes.load(self, name, None, allow_stale)
                self._indexes[key] = (index, record)
            index, record = self._indexes[key]
        return index, record, json.loads(record["params"] or "{}")

    def close(self) -> None:
        db = getattr(self._local, "db", None)
        if db is not None:
            db.conn.close()
            self._local.db = None


def reading(catalog_path: str | Path, index_dir: str | Path, check: bool = True) -> Collection:
    """Open read-only; `check` makes sure the vector file holds every committed row."""
    return Collection(catalog_path, index_dir, False, catalog.open_reader(catalog_path), check)


@contextmanager
def writing(
    catalog_path: str | Path, index_dir: str | Path, create: bool = True
) -> Iterator[Collection]:
    """Hold the write lock, open to write, repair leftovers; closed on exit."""
    with catalog.write_lock(catalog_path):
        db = catalog.open_writer(catalog_path, create=create)
        coll = Collection(catalog_path, index_dir, True, db)
        coll.repaired = repair(coll)
        try:
            yield coll
        finally:
            db.conn.close()


def repair(coll: Collection) -> list[str]:
    """Bring catalog and vector file back to one consistent state (writers); returns what was done.

    - rows at or past `next_id` (a commit torn by an older cbir) or past the end of
      the vector file (their vectors were cut) are dropped, so their files are
      indexed again;
    - vector bytes past `next_id` (a batch fsynced but never committed) are cut;
    - indexed rows without a vector checksum (catalogs older than schema 3) get one;
    - runs left 'running' by a killed job are marked 'interrupted'.
    """
    db, vec = coll.db, coll.vectors_path
    done: list[str] = []
    # Holding the lock, any run still 'running' belongs to a job that was killed.
    catalog.close_dead_runs(db)
    dim = coll.dim
    if not dim:
        return done
    committed = coll.next_id
    indexed = len(coll.indexed_ids())
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
        rows = coll.rows()
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
            log.warning("repaired %s: %s", coll.path, line)
    return done


def file_key(path: str) -> str | None:
    """'st_dev:st_ino' of the file a path names (after symlinks), or None if it is gone."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return f"{st.st_dev}:{st.st_ino}"


def damaged_ids(coll: Collection) -> list[int]:
    """Indexed ids whose vector row no longer matches its checksum (reads every row)."""
    ids = coll.indexed_ids()
    if not coll.dim or not len(ids):
        return []
    return vectors.damaged(coll.rows(), ids, catalog.vector_crcs(coll.db))
