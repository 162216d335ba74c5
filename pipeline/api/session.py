"""A long-lived reader: one collection opened for reading and its model, for a server.

The web app (pipeline/web) is a front-end: it may not touch the catalog, the
vector file, the indexes or the model itself. Everything it needs of them is
here, in the API layer: opening the collection and loading its model once,
warming both up, answering a query (through `searching.search_in`, as `cbir
search` does), looking up rows and index names. The web keeps only what is HTTP:
request options, the token, decode slots, thumbnails on disk, status codes.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.api import checks, explaining, models, searching
from pipeline.api.batcher import MicroBatcher
from pipeline.api.dedup_cache import DuplicatesCache
from pipeline.config import Settings
from pipeline.embed.descriptor import SIZE_RANGE
from pipeline.embed.interface import Embedder
from pipeline.errors import CbirError, NotFoundError
from pipeline.inputs.decode import MAX_ASPECT
from pipeline.retrieval import filters, indexes
from pipeline.store import reads, vectors
from pipeline.store.collection import Collection

MAX_ID = 2**63 - 1  # larger ids cannot be in SQLite; refuse them before asking


def open_session(settings: Settings, batch_size: int) -> Session:
    """The settings' collection opened for reading, its model loaded (`batch_size` images
    per forward pass) and checked against the catalog."""
    coll = models.open_collection(settings)
    return Session(coll, models.embedder_for(settings, coll, batch_size=batch_size))


def is_model_input(width: int, height: int) -> bool:
    """Whether an image of this size is one that some descriptor's decoding yields, and so
    leaves as it is when decoded again: its shorter side a model input size, its longer
    side at most MAX_ASPECT times that."""
    lo, hi = SIZE_RANGE
    return lo <= min(width, height) <= hi and max(width, height) <= MAX_ASPECT * min(width, height)


class Session:
    """One collection served: queries, rows and index names, shared by many threads."""

    def __init__(self, coll: Collection, embedder: Embedder):
        if not coll.dim:
            raise CbirError(f"catalog {coll.path} has no indexed images yet")
        coll.check_embedder(embedder)
        self.coll = coll
        # Concurrent queries share forward passes (one at a time, each on every core).
        self.embedder = MicroBatcher(embedder, max_batch=embedder.batch_size)
        self._browse: tuple[Any, list[dict[str, Any]]] = (None, [])
        self._browse_lock = threading.Lock()
        self._duplicates = DuplicatesCache(coll)

    @property
    def catalog_path(self) -> Path:
        return self.coll.path

    def folders(self) -> list[Path]:
        """The collection's folders (catalog, vector file, indexes): no message may show them."""
        return [self.coll.path.parent, self.coll.vectors_path.parent, self.coll.index_dir]

    @property
    def input_size(self) -> int:
        """The side of the model's input, as the catalog's descriptor decodes images."""
        return self.embedder.descriptor.size

    @property
    def decode_args(self) -> dict[str, Any]:
        """The descriptor's arguments of `decode_bytes` for a query image."""
        return self.embedder.descriptor.decode

    def warm_up(self, index: str) -> None:
        """Trace the model's graph and load the named index now, not on the first query.

        A stale or damaged index raises here, with its message.
        """
        size = self.input_size
        self.embedder.embed(np.zeros((1, size, size, 3), np.uint8))
        indexes.loaded(self.coll, index)

    # --- queries -------------------------------------------------------------------------

    def check_vectors(self) -> None:
        """A vector file cut behind the server's back is an error now, not a crash (SIGBUS) later."""
        vectors.check(self.coll.vectors_path, self.coll.dim, self.coll.next_id)

    def search(
        self,
        query: int | searching.Upload | searching.Pixels,
        settings: Settings,
        allow_stale: bool = False,
        relevant: tuple[int, ...] = (),
        not_relevant: tuple[int, ...] = (),
        within: searching.Filter | None = None,
    ) -> dict[str, Any]:
        """The answer to one query, in the shape of `cbir search --json` (see `search_in`),
        from one moment of the catalog: a job's commit meanwhile is wholly in it or not."""
        with self.coll.snapshot():
            return searching.search_in(
                self.coll, [query], settings, lambda: self.embedder, allow_stale=allow_stale,
                relevant=relevant, not_relevant=not_relevant, within=within,
            )[0]  # fmt: skip

    def explain(
        self, query: int | searching.Upload, image_id: int, settings: Settings, matches: bool = True
    ) -> explaining.Explanation:
        """Why `image_id` answers `query` (api/explaining.py), from one moment of the catalog."""
        with self.coll.snapshot():
            return explaining.explanation_in(
                self.coll, query, image_id, settings, lambda: self.embedder, matches=matches
            )

    # --- rows, indexes, the collection ---------------------------------------------------

    def row(self, image_id: int) -> dict[str, Any]:
        """The catalog row of an indexed id, or NotFoundError."""
        if 0 <= image_id <= MAX_ID:
            row = reads.lookup(self.coll.db, [image_id]).get(image_id)
            if row is not None and row["status"] == "indexed":
                return row
        raise NotFoundError(f"no indexed image with id {image_id}")

    def indexed_rows(self) -> list[dict[str, Any]]:
        """Indexed images (id, path, label) in id order, re-read when the catalog changes."""
        db = self.coll.db
        gen = self.coll.rows_state  # a move or relabel keeps the generation
        with self._browse_lock:
            if self._browse[0] != gen:
                found = reads.lookup(db, reads.indexed_ids(db))
                self._browse = (gen, [found[i] for i in sorted(found)])
            return self._browse[1]

    def image_folders(self, limit: int = 200) -> list[dict[str, Any]]:
        """The folders holding indexed images, the `limit` fullest, for a folder picker
        ([{"folder", "images"}] by folder; `retrieval.filters.folders`)."""
        return filters.folders(self.coll, limit)

    def index_names(self) -> list[str]:
        """The exact search first, then the catalog's built indexes."""
        records = reads.index_records(self.coll.db)
        return [indexes.EXACT] + [r["name"] for r in records if r["name"] != indexes.EXACT]

    def info(self) -> dict[str, Any]:
        """`cbir info` of the collection."""
        return checks.info_in(self.coll)

    # --- duplicates: the review page -----------------------------------------------------

    def duplicates(
        self, include: Any, near: float | None, similar: float | None, index: str = indexes.EXACT
    ) -> dict[str, Any]:
        """The report of `cbir duplicates --json`, regrouped from pairs kept across calls
        (a slider moved on the review page does not search the pairs again)."""
        return self._duplicates.report(include, near, similar, index)

    def forget_duplicates(self) -> None:
        """Drop the kept pairs and reports: files were moved."""
        self._duplicates.forget()
