"""What the routes share: the API's session (collection and model), the limits, thumbnails.

Every search goes through the session (pipeline/api/session.py), which calls
`api.search_in` as `cbir search` does; this module only adds what an HTTP
server needs around it: decodes under `DecodeSlots`, errors worded for the
client, thumbnails on disk, messages without the server's folders.
"""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path
from typing import Any

from pipeline import api
from pipeline.api.session import Session
from pipeline.config import Settings
from pipeline.errors import NotFoundError
from pipeline.inputs.decode import DecodeError, decode_bytes
from pipeline.inputs.thumbs import thumbnail_bytes
from pipeline.specs import parse_rerank
from pipeline.web.carry import CarriedQuery, from_upload
from pipeline.web.failures import CATALOG_BUSY, BadRequest
from pipeline.web.params import SearchParams
from pipeline.web.redact import Redactor
from pipeline.web.slots import Busy, DecodeSlots, decode_cost


class Service:
    """One collection served: searches, rows, thumbnails and info for the routes."""

    def __init__(
        self,
        session: Session,
        settings: Settings,
        slots: DecodeSlots,
        thumbs_dir: str | Path | None = None,
    ):
        self.session, self.settings, self.slots = session, settings, slots
        # Absolute now: Flask's send_file reads a relative path against the package's
        # folder, not the working directory (every thumbnail was a 500 under `cd coll`).
        self.thumbs = Path(thumbs_dir or session.catalog_path.with_suffix(".thumbs")).absolute()
        self.redact = Redactor([*session.folders(), self.thumbs])

    def warm_up(self) -> None:
        """Trace the model's graph and load the default index now, not on the first request.

        A stale or damaged default index stops `cbir serve` here, with its message.
        """
        self.session.warm_up(self.settings.index)

    # --- searching: every path ends in api.search_in -------------------------------------

    def search(
        self, query: int | api.Upload, params: SearchParams, source: bytes | None = None
    ) -> dict[str, Any]:
        """One answer in the shape of `cbir search --json`; an undecodable image is a 400.
        `source`: the original upload of a carried query, for `--rerank verify`."""
        settings = params.settings(self.settings)
        self.session.check_vectors()
        if isinstance(query, api.Upload):
            # Only the decoding holds a slot of the memory budget: the small decoded
            # pixels then wait for a micro-batch with those of other requests.
            with self.slots.hold(decode_cost(query.data, self.session.input_size)):
                try:
                    decoded = decode_bytes(
                        query.data, settings.max_pixels, **self.session.decode_args
                    ).pixels
                except DecodeError as e:
                    raise BadRequest(f"cannot use query image {query.name}: {e}") from None
            # The bytes stay with the pixels for `--rerank verify` (no copy: the same object).
            query = api.Pixels(query.name, decoded, source=source or query.data)
        answer = self.session.search(
            query, settings, allow_stale=params.allow_stale, within=params.within,
            **params.feedback(),
        )  # fmt: skip
        if "error" in answer:
            raise BadRequest(answer["error"])
        return answer

    def carry(self, name: str, data: bytes) -> CarriedQuery:
        """Decode an upload once, into what a results page carries (see carry.py)."""
        with self.slots.hold(decode_cost(data, self.session.input_size)):
            return from_upload(name, data, self.settings.max_pixels, self.session.decode_args)

    def search_carried(
        self, query: CarriedQuery, params: SearchParams, source: bytes | None = None
    ) -> dict[str, Any]:
        return self.search(query.upload(), params, source)

    def verifies(self, params: SearchParams) -> bool:
        """Whether the search re-ranks by local features (it then wants the upload itself)."""
        return "verify" in parse_rerank(params.settings(self.settings).rerank)

    # --- rows, thumbnails, the collection ------------------------------------------------

    def row(self, image_id: int) -> dict[str, Any]:
        """The catalog row of an indexed id, or 404."""
        return self.session.row(image_id)

    def browse_rows(self) -> list[dict[str, Any]]:
        """Indexed images (id, path, label) in id order, re-read when the catalog changes."""
        return self.session.indexed_rows()

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
        return self.session.index_names()

    def info(self) -> dict[str, Any]:
        """`cbir info`; a file a job replaces between two looks of it is a busy catalog."""
        for _ in range(3):
            try:
                return self.session.info()
            except FileNotFoundError:
                time.sleep(0.05)
        raise Busy(CATALOG_BUSY)
