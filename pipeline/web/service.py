"""What the routes share: the open collection, the one model, the limits, two small caches.

Every search goes through `api.search_in`, as `cbir search` does; this module
only adds what a long-running, many-threaded server needs around it: one
forward pass at a time through the shared model, decodes under `DecodeSlots`,
a check that the vector file was not cut behind its back, thumbnails on disk.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import api
from pipeline.config import Settings
from pipeline.embed.interface import Embedder
from pipeline.errors import CbirError, NotFoundError
from pipeline.inputs.decode import DecodeError, decode_bytes
from pipeline.inputs.thumbs import thumbnail_bytes
from pipeline.retrieval import indexes
from pipeline.store import catalog, vectors
from pipeline.store.collection import Collection
from pipeline.web.batcher import MicroBatcher
from pipeline.web.carry import CarriedQuery, from_upload
from pipeline.web.failures import CATALOG_BUSY, BadRequest
from pipeline.web.params import SearchParams
from pipeline.web.redact import Redactor
from pipeline.web.slots import Busy, DecodeSlots, decode_cost

MAX_ID = 2**63 - 1  # larger ids cannot be in SQLite; refuse them before asking


class Service:
    """One collection served: searches, rows, thumbnails and info for the routes."""

    def __init__(
        self,
        coll: Collection,
        embedder: Embedder,
        settings: Settings,
        slots: DecodeSlots,
        thumbs_dir: str | Path | None = None,
    ):
        if not coll.dim:
            raise CbirError(f"catalog {coll.path} has no indexed images yet")
        coll.check_embedder(embedder)
        self.coll, self.settings, self.slots = coll, settings, slots
        # Concurrent uploads share forward passes (one at a time, each on every core).
        self.embedder = MicroBatcher(embedder, max_batch=embedder.batch_size)
        # Absolute now: Flask's send_file reads a relative path against the package's
        # folder, not the working directory (every thumbnail was a 500 under `cd coll`).
        self.thumbs = Path(thumbs_dir or coll.path.with_suffix(".thumbs")).absolute()
        self.redact = Redactor(
            [coll.path.parent, coll.vectors_path.parent, coll.index_dir, self.thumbs]
        )
        self._browse: tuple[int, list[dict[str, Any]]] = (-1, [])
        self._browse_lock = threading.Lock()

    def warm_up(self) -> None:
        """Trace the model's graph and load the default index now, not on the first request.

        A stale or damaged default index stops `cbir serve` here, with its message.
        """
        size = self.embedder.descriptor.size
        self.embedder.embed(np.zeros((1, size, size, 3), np.uint8))
        self.coll.index(self.settings.index)

    # --- searching: every path ends in api.search_in -------------------------------------

    def search(self, query: int | api.Upload, params: SearchParams) -> dict[str, Any]:
        """One answer in the shape of `cbir search --json`; an undecodable image is a 400."""
        settings = params.settings(self.settings)
        self._check_vectors()

        def run() -> dict[str, Any]:
            return api.search_in(
                self.coll, [query], settings, lambda: self.embedder,  # noqa: B023
                allow_stale=params.allow_stale, **params.feedback(),
            )[0]  # fmt: skip

        if isinstance(query, api.Upload):
            # Only the decoding holds a slot of the memory budget: the small decoded
            # pixels then wait for a micro-batch with those of other requests.
            with self.slots.hold(decode_cost(query.data, self.embedder.descriptor.size)):
                try:
                    decoded = decode_bytes(
                        query.data, settings.max_pixels, **self.embedder.descriptor.decode
                    ).pixels
                except DecodeError as e:
                    raise BadRequest(f"cannot use query image {query.name}: {e}") from None
            query = api.Pixels(query.name, decoded)
        answer = run()
        if "error" in answer:
            raise BadRequest(answer["error"])
        return answer

    def carry(self, name: str, data: bytes) -> CarriedQuery:
        """Decode an upload once, into what a results page carries (see carry.py)."""
        with self.slots.hold(decode_cost(data, self.embedder.descriptor.size)):
            return from_upload(
                name, data, self.settings.max_pixels, self.embedder.descriptor.decode
            )

    def search_carried(self, query: CarriedQuery, params: SearchParams) -> dict[str, Any]:
        return self.search(query.upload(), params)

    def _check_vectors(self) -> None:
        """A vector file cut behind the server's back is a 500 now, not a crash (SIGBUS) later."""
        vectors.check(self.coll.vectors_path, self.coll.dim, self.coll.next_id)

    # --- rows, thumbnails, the collection ------------------------------------------------

    def row(self, image_id: int) -> dict[str, Any]:
        """The catalog row of an indexed id, or 404."""
        if 0 <= image_id <= MAX_ID:
            row = catalog.lookup(self.coll.db, [image_id]).get(image_id)
            if row is not None and row["status"] == "indexed":
                return row
        raise NotFoundError(f"no indexed image with id {image_id}")

    def browse_rows(self) -> list[dict[str, Any]]:
        """Indexed images (id, path, label) in id order, re-read when the catalog changes."""
        db = self.coll.db
        gen = catalog.generation(db)
        with self._browse_lock:
            if self._browse[0] != gen:
                found = catalog.lookup(db, catalog.indexed_ids(db))
                self._browse = (gen, [found[i] for i in sorted(found)])
            return self._browse[1]

    def thumb(self, image_id: int) -> Path:
        """The cached thumbnail of an indexed id, made on first request."""
        row = self.row(image_id)
        out = self.thumbs / f"{image_id}.jpg"
        if not out.exists():
            try:
                with self.slots.hold(decode_cost(row["path"])):
                    data = thumbnail_bytes(row["path"], self.settings.max_pixels)
            except (OSError, DecodeError, ValueError, SyntaxError):
                raise NotFoundError(f"image {image_id} cannot be read any more") from None
            self.thumbs.mkdir(parents=True, exist_ok=True)
            tmp = out.with_name(f".{out.name}.{uuid.uuid4().hex}")
            tmp.write_bytes(data)
            os.replace(tmp, out)  # concurrent makers of one thumbnail never tear it
        return out

    def index_names(self) -> list[str]:
        records = catalog.index_records(self.coll.db)
        return [indexes.EXACT] + [r["name"] for r in records if r["name"] != indexes.EXACT]

    def info(self) -> dict[str, Any]:
        """`cbir info`; a file a job replaces between two looks of it is a busy catalog."""
        for _ in range(3):
            try:
                return api.info_in(self.coll)
            except FileNotFoundError:
                time.sleep(0.05)
        raise Busy(CATALOG_BUSY)
