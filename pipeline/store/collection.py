"""The open collection: catalog, committed vector rows, index folder, model fingerprint.

`reading(...)` opens one for reading: the catalog read-only (a connection per
thread, so a web server can share it), never a byte written. `writing(...)`
takes the write lock, creates or migrates the schema, and repairs what an
interrupted job (or an older cbir with a torn commit) left behind before
anything is written (`repair`). Everything else takes a `Collection`; nothing else
derives file paths, maps the vector file or checks a fingerprint.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import sqlite_utils

from pipeline.embed.interface import (
    KERAS_FP32,
    describe_mismatch,
    describe_producer,
    fingerprint_json,
    same_producer,
)
from pipeline.errors import CbirError
from pipeline.store import catalog, reads, seals, vectors, writes
from pipeline.store.repair import refuse_lost_catalog, repair

log = logging.getLogger("cbir")

T = TypeVar("T")


class Collection:
    """One collection, opened once and passed in (reader or writer)."""

    def __init__(
        self, catalog_path: str | Path, index_dir: str | Path, writer: bool, db, check: bool = True
    ):
        self.path = Path(catalog_path)
        self.index_dir = Path(index_dir)
        self.writer = writer
        self.vectors_path = vectors.vectors_path(catalog_path)
        # The catalog's own int8 model (openvino_convert.keep): catalog.db -> catalog.models/
        self.models_dir = self.vectors_path.with_suffix(".models")
        self._db = db
        self._local = threading.local()
        self._local.db = db
        self._rows_lock = threading.Lock()
        # Making a cached value (loading an index) maps rows: two locks, no deadlock.
        self._cache_lock = threading.Lock()
        self._rows: tuple[int, np.ndarray] | None = None
        self._damaged_lock = threading.Lock()
        self._damaged: tuple[int, np.ndarray] | None = None  # (generation, bad ids), all checked
        self._rows_checked: int | None = None  # the generation whose images rows all passed
        self._reported: set[int] = set()  # damaged ids already told on stderr
        self._cache: dict[tuple[int, Hashable], Any] = {}  # (generation, key) -> value
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
        return reads.dimension(self.db)

    @property
    def next_id(self) -> int:
        return reads.next_id(self.db)

    @property
    def generation(self) -> int:
        return reads.generation(self.db)

    @property
    def rows_state(self) -> tuple[int, int]:
        """(generation, rows version): changes whenever what a row shows may have changed,
        also by a move or relabel that keeps the generation (and so the indexes)."""
        return reads.generation(self.db), reads.rows_version(self.db)

    @property
    def fingerprint(self) -> dict[str, Any] | None:
        return reads.fingerprint(self.db)

    def indexed_ids(self) -> np.ndarray:
        """The indexed ids, once every images row passed its checksum (`check_rows`)."""
        self.check_rows()
        return reads.indexed_ids(self.db)

    def check_rows(self) -> None:
        """Every images row against its checksum, once per generation (cached): a damaged
        one is refused in one line (DamagedRow, exit 1) by whatever reads all rows, since
        a damaged status or id would leave an image out unseen.

        One SQL pass calling `seals.row_crc` per row (measured in docs/architecture.md).
        """
        generation = self.generation
        if self._rows_checked == generation:
            return
        bad = seals.bad_rows(self.db, "images")
        if bad:
            raise seals.DamagedRow(seals.rows_damage_text(bad))
        self._rows_checked = generation

    def cached(self, key: Hashable, make: Callable[[], T]) -> T:
        """The value of `key` at this generation, made by `make()` the first time it is
        asked for (under a lock, so two threads share one) and kept until the catalog
        changes: values of older generations are dropped then (an index loaded for
        searching is one; `retrieval.indexes.loaded`)."""
        entry = (self.generation, key)
        with self._cache_lock:
            if entry not in self._cache:
                self._cache = {k: v for k, v in self._cache.items() if k[0] == entry[0]}
                self._cache[entry] = make()
            return self._cache[entry]

    # --- the vectors --------------------------------------------------------------------

    def rows(self) -> np.ndarray:
        """The committed rows of the vector file, memory-mapped (re-mapped as it grows)."""
        committed = self.next_id
        with self._rows_lock:
            if self._rows is None or self._rows[0] != committed:
                self._rows = (committed, vectors.open_rows(self.vectors_path, self.dim, committed))
            return self._rows[1]

    def vectors(self, ids) -> np.ndarray:
        """Copies of the stored vectors of `ids` (committed ids only), unchecked: rank only
        with ids that `damaged_among` / `usable_ids` let through, or use `checked_vectors`."""
        return vectors.take(self.rows(), ids)

    # --- damaged rows: a row that fails its CRC-32 is treated as missing ----------------

    def damaged(self, notice: bool = True) -> np.ndarray:
        """Sorted indexed ids whose vector row fails its recorded CRC-32; reads every row.

        Checked once per generation and cached, so a process pays it once (0.3 to 0.55 s
        per 100,000 rows of 2048 floats from the page cache) until the catalog changes.
        """
        generation = self.generation
        with self._damaged_lock:
            if self._damaged is None or self._damaged[0] != generation:
                ids = self.indexed_ids()  # before the rows are mapped: rows() covers them
                bad: list[int] = []
                if self.dim and len(ids):
                    bad = vectors.damaged(self.rows(), ids, reads.vector_crcs(self.db))
                self._damaged = (generation, np.asarray(bad, dtype=np.int64))
            found = self._damaged[1]
        if notice:
            self._notice(found)
        return found

    def damaged_among(self, ids, notice: bool = True) -> np.ndarray:
        """The ids among `ids` whose row fails its CRC-32 (sorted): only those rows are read,
        unless every row was already checked at this generation. Cheap enough per query
        (a CRC-32 of 8 KiB per candidate); `notice` tells new ones on stderr once."""
        ids = np.unique(np.asarray(ids, dtype=np.int64))
        cached = self._damaged
        if cached is not None and cached[0] == self.generation:
            found = np.intersect1d(ids, cached[1])
        else:
            crcs = reads.vector_crcs(self.db, ids)
            known = np.asarray(sorted(crcs), dtype=np.int64)  # indexed, so within the rows
            bad = vectors.damaged(self.rows(), known, crcs) if len(known) else []
            found = np.asarray(bad, dtype=np.int64)
        if notice:
            self._notice(found)
        return found

    def usable_ids(self) -> np.ndarray:
        """Indexed ids whose vector row passes its checksum: what a full scan may rank."""
        bad = self.damaged()
        return np.setdiff1d(self.indexed_ids(), bad) if len(bad) else self.indexed_ids()

    def checked_vectors(self, ids) -> np.ndarray:
        """Copies of the stored vectors of `ids`, refused in one line if one fails its CRC."""
        ids = np.asarray(ids, dtype=np.int64)
        bad = self.damaged_among(ids, notice=False)
        if len(bad):
            raise CbirError(vectors.damage_text(bad.tolist()), exit_code=1)
        return self.vectors(ids)

    def refuse_damaged(self) -> None:
        """Refuse in one line (exit 1) if any indexed row fails its CRC-32: for answers
        about the whole collection (evaluation figures, a learned whitening), where
        leaving a row out would be another answer."""
        bad = self.damaged(notice=False)
        if len(bad):
            raise CbirError(vectors.damage_text(bad.tolist()), exit_code=1)

    def _notice(self, bad: np.ndarray) -> None:
        """One line on stderr for damaged rows not yet told (readers; writers drop them).

        A search meets damaged candidates a few at a time (searching deeper finds more), so
        the first one found has every row checked (`damaged`, once per generation) and
        the one line names them all.
        """
        if self.writer or not len(bad):
            return
        with self._damaged_lock:
            if not set(bad.tolist()) - self._reported:
                return
        every = self.damaged(notice=False)
        with self._damaged_lock:
            new = set(every.tolist()) - self._reported
            self._reported |= new
        if new:
            log.warning("left out of results: %s", vectors.damage_text(every.tolist()))

    # --- the model ----------------------------------------------------------------------

    @property
    def producer(self) -> dict[str, Any] | None:
        """What computed the catalog's vectors (Keras fp32 for catalogs that predate producers)."""
        if self.fingerprint is None:
            return None
        text = reads.get_meta(self.db, "producer")
        return json.loads(text) if text else dict(KERAS_FP32)

    @property
    def calibration_paths(self) -> list[str]:
        """The int8 calibration images the catalog's producer was quantised with."""
        text = reads.get_meta(self.db, "calibration_paths")
        return json.loads(text) if text else []

    def check_embedder(
        self, embedder, allow_mixed: bool = False, calibration: list[str] | None = None
    ) -> None:
        """The one model check: vectors of different model families never mix, and
        vectors of another producer of the same family are added only when allowed.

        A writer on a catalog without a model adopts this one (with the int8
        `calibration` images, so later commands can rebuild the same model).
        """
        stored, current = self.fingerprint, embedder.fingerprint
        if stored is None:
            if self.writer:
                writes.adopt_model(
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
        writes.mark_mixed(self.db, json.dumps(embedder.producer, sort_keys=True))

    @contextmanager
    def snapshot(self) -> Iterator[None]:
        """Every catalog read in the block sees one moment of the catalog: a read
        transaction on this thread's connection (WAL: writers go on meanwhile). So a search
        that a job commits during answers wholly from before the commit or after it, never
        with the index of one generation and the rows of the next (a removed image would
        leave k - 1 results). Readers only; a block inside another shares its moment."""
        conn = self.db.conn
        if self.writer or conn.in_transaction:
            yield
            return
        conn.execute("BEGIN")  # deferred: the moment is that of the first read
        try:
            yield
        finally:
            if conn.in_transaction:
                conn.execute("COMMIT")  # it wrote nothing: this only ends the snapshot

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
    catalog_path: str | Path,
    index_dir: str | Path,
    create: bool = True,
    drop_lost: bool = False,
) -> Iterator[Collection]:
    """Hold the write lock, open to write, repair leftovers; closed on exit.

    A vector file shorter than the committed rows is refused (see `repair`) unless
    `drop_lost` (only `verify --repair`) drops the rows whose vectors are gone.
    """
    with catalog.write_lock(catalog_path):
        refuse_lost_catalog(catalog_path)
        db = catalog.open_writer(catalog_path, create=create)
        coll = Collection(catalog_path, index_dir, True, db)
        coll.repaired = repair(db, catalog_path, drop_lost)
        try:
            yield coll
        finally:
            db.conn.close()


def drop_damaged(coll: Collection) -> list[int]:
    """Drop the images whose vector row fails its checksum (writers), so that the next
    job over their files embeds them again; returns their ids.

    Images whose catalog row fails its checksum are dropped first (their path, label or
    status cannot be trusted, so no vector row of theirs either), told in `coll.repaired`
    and on stderr: their files are found as new by the next job and indexed again.
    """
    if bad_rows := seals.bad_rows(coll.db, "images"):
        writes.drop_damaged_rows(coll.db, bad_rows)
        line = (
            f"dropped {len(bad_rows)} images whose catalog rows fail their checksum "
            f"(ids {bad_rows[:5]}); the next 'cbir index' of their folders indexes them again"
        )
        coll.repaired.append(line)
        log.warning("repaired %s: %s", coll.path, line)
    bad = coll.damaged().tolist()
    if bad:
        writes.delete_rows(coll.db, bad)
    return bad
