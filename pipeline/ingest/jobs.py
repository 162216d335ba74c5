"""The indexing job: diff the folders with the catalog, decode and embed, commit in batches.

A reader -> mapper -> writer runner: the plan (`plan.py`) is the reader, an
engine the mapper, `_Batches` the writer. The local engine decodes in worker threads
ahead of the model (Pillow and the runtimes release the GIL), so the model is
never waiting on JPEG decoding; the Ray engine (`engine_ray.py`) decodes and
embeds on a cluster and streams vectors back. Either way this process alone
writes: each batch is made durable in two steps, vector bytes appended and
fsynced, then one SQLite transaction inserts the rows that point at them. A
kill -9 anywhere leaves either the old state or the new one; leftover bytes
are cut on open.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from pipeline.config import Settings
from pipeline.embed import descriptor
from pipeline.embed.interface import Embedder
from pipeline.errors import CbirError
from pipeline.ingest import backfill
from pipeline.ingest.plan import Plan, make_plan
from pipeline.inputs import dates
from pipeline.inputs.decode import Decoded, DecodeError, decode_file
from pipeline.inputs.scan import Found, ScannedFile, find
from pipeline.retrieval import autoindex, indexes
from pipeline.store import collection, reads, vectors, writes
from pipeline.store.collection import Collection

log = logging.getLogger("cbir")


@dataclass
class Summary:
    """What one job did; printed by the CLI and stored in the runs table."""

    scanned: int = 0
    unchanged: int = 0
    indexed: int = 0  # embedded by the model
    copied: int = 0  # identical bytes already indexed: vector copied, no model run
    failed: int = 0
    duplicates: int = 0
    relabelled: int = 0
    pruned: int = 0
    aliases: int = 0  # the same file under a second path (symlink, hard link): not added
    missing: int = 0  # listed in a manifest CSV but not on disk
    moved: int = 0  # renamed or moved: the row keeps its id and vector, no model run

    failures: list[tuple[str, str]] = field(default_factory=list)
    index_notes: list[str] = field(default_factory=list)  # --update-indexes: one line each

    def counts(self) -> dict[str, int]:
        return {k: v for k, v in self.__dict__.items() if isinstance(v, int)}


@dataclass(frozen=True)
class Embedded:
    """An image decoded and embedded elsewhere (a Ray actor): what the catalog records of it."""

    sha256: str
    width: int
    height: int
    vector: np.ndarray
    taken_at: float | None = None  # its EXIF date (`inputs.dates`)


# What an engine says of one file: pixels to embed here, a vector made elsewhere, or why not.
Result = Decoded | Embedded | DecodeError
Batch = list[tuple[ScannedFile, Result]]


class Engine(Protocol):
    """Turns the files to index into batches of results, in the plan's order."""

    def batches(
        self, todo: list[ScannedFile], model: Callable[[], Embedder], settings: Settings
    ) -> Iterator[Batch]:
        """`model()` loads (and checks) the catalog's model in this process, once."""
        ...


class LocalEngine:
    """Decode in a thread pool ahead of the model; the model runs in `_Batches.commit`."""

    def batches(
        self, todo: list[ScannedFile], model: Callable[[], Embedder], settings: Settings
    ) -> Iterator[Batch]:
        batch: Batch = []
        stream = _decoded_stream(
            todo,
            settings.workers,
            settings.max_pixels,
            lookahead=4 * settings.batch_size,
            shape={"size": settings.image_size, "crop": settings.input == "crop"},
        )
        for item in stream:
            batch.append(item)
            if len(batch) == settings.batch_size:
                yield batch
                batch = []
        if batch:
            yield batch


def _decoded_stream(
    files: list[ScannedFile],
    workers: int,
    max_pixels: int,
    lookahead: int,
    shape: dict[str, Any] | None = None,
) -> Iterator[tuple[ScannedFile, Decoded | DecodeError]]:
    """Decode in a thread pool, in order, keeping at most `lookahead` files in flight;
    `shape` is the descriptor's decode arguments (size, crop)."""

    def work(f: ScannedFile) -> Decoded | DecodeError:
        try:
            return decode_file(f.path, max_pixels, **(shape or {}))
        except DecodeError as e:
            return e

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        pending: deque[tuple[ScannedFile, Future]] = deque()
        it = iter(files)
        for f in it:
            pending.append((f, pool.submit(work, f)))
            if len(pending) >= lookahead:
                break
        while pending:
            f, fut = pending.popleft()
            nxt = next(it, None)
            if nxt is not None:
                pending.append((nxt, pool.submit(work, nxt)))
            yield f, fut.result()


def _row(
    f: ScannedFile,
    image_id: int,
    run_id: int,
    decoded: Decoded | Embedded | None,
    error: str | None,
    key: str | None,
):
    stamp = writes.now()
    taken_at, taken_from = dates.taken(decoded.taken_at, f.mtime) if decoded else (None, None)
    return {
        "id": image_id,
        "path": f.path,
        "size": f.size,
        "mtime": f.mtime,
        "sha256": decoded.sha256 if decoded else None,
        "width": decoded.width if decoded else None,
        "height": decoded.height if decoded else None,
        "label": f.label,
        "status": "failed" if error else "indexed",
        "error": error,
        "run_id": run_id,
        "created_at": stamp,
        "updated_at": stamp,
        "file_key": key,
        "taken_at": taken_at,
        "taken_from": taken_from,
    }


def run_index(
    roots: list[str],
    coll: Collection,
    load_model: Callable[[list[str]], Embedder],
    settings: Settings,
    progress: Callable[[int], Any] | None = None,
    on_total: Callable[[int], Any] | None = None,
    engine: Engine | None = None,
    found: Found | None = None,
) -> Summary:
    """Index `roots` into a collection opened for writing; returns what was done.

    `found` is what `scan.find` found under `roots`, scanned before the collection was
    opened (so bad input never touches the catalog); without it, `roots` are scanned here.

    `load_model(paths to index)` is called only when some file needs embedding
    (it checks the model against the catalog's family and producer, and may
    calibrate an int8 model on a sample of the paths), so a rerun with nothing
    new, or new files that are all copies of indexed ones, never pays for it.
    `engine` decodes and embeds (default: `LocalEngine`, in this process).
    """
    if found is None:
        found = find(roots, settings.labels, settings.split, allow_empty=True)
    summary = Summary()
    db = coll.db
    run_id = writes.start_run(db, "index", {**settings.as_dict(), "roots": roots})
    try:
        _index_into(
            coll, roots, found, load_model, settings, summary, run_id, progress, on_total, engine
        )
        if coll.dim and len(coll.indexed_ids()):
            autoindex.build_and_save(coll, indexes.EXACT, indexes.EXACT_FACTORY)
    except BaseException:
        # A full disk fails this too: the first error is the one to tell.
        with contextlib.suppress(Exception):
            writes.end_run(db, run_id, "failed", summary.counts())
        raise
    writes.end_run(db, run_id, "done", summary.counts())
    return summary


def _index_into(
    coll, roots, found, load_model, settings, summary, run_id, progress, on_total, engine
):
    db = coll.db
    # A row that fails its checksum is dropped first (as 'verify --repair' does), so its
    # file is planned as new and embedded again, and never copied as a duplicate's vector.
    bad = collection.drop_damaged(coll)
    if bad:
        log.warning(
            "repaired %s: dropped %d images whose vectors fail their checksum (ids %s); "
            "those under the folders of this job are embedded again",
            coll.path,
            len(bad),
            bad[:5],
        )
    scanned = found.files
    summary.scanned, summary.missing = len(scanned), found.missing
    plan = make_plan(db, scanned, settings.retry_failed)
    summary.unchanged, summary.aliases = plan.unchanged, plan.aliases
    backfill.fill_dates(coll, scanned, settings)  # rows from before schema 6: EXIF headers
    if plan.relabel:
        writes.update_labels(db, plan.relabel)
        summary.relabelled = len(plan.relabel)
    if plan.moved:  # before pruning, which would drop the rows of the files' old paths
        writes.move_rows(db, plan.moved, plan.displaced)
        summary.moved = len(plan.moved)
    if settings.prune:
        summary.pruned = _prune(db, roots, {f.path for f in scanned})
    if on_total:
        on_total(len(plan.todo))
    if not plan.todo:
        return
    job = _Batches(coll, load_model, plan, run_id, summary)
    for batch in (engine or LocalEngine()).batches(plan.todo, job.model, settings):
        job.commit(batch)
        if progress:
            progress(len(batch))


class _Batches:
    """Commits decoded batches: copy or embed vectors, write them durably, then the rows.

    The model is loaded on the first batch that has an image to embed: a job
    whose new files are all failures or copies of indexed images never pays
    for it. A new catalog learns its dimension from the model, so it loads first.
    """

    def __init__(
        self,
        coll: Collection,
        load_model: Callable[[list[str]], Embedder],
        plan: Plan,
        run_id: int,
        summary: Summary,
    ):
        self.coll, self.db, self.plan, self.run_id, self.summary = (
            coll,
            coll.db,
            plan,
            run_id,
            summary,
        )
        self.load_model = load_model
        self.embedder: Embedder | None = None
        self.vec_path = coll.vectors_path
        self.seen_sha: dict[str, int] = {}  # sha -> id indexed earlier in this run
        if not coll.dim:
            self.model()
            # The writer's repair could not cut a catalog that had no dimension yet: a
            # vector file left beside a deleted catalog would otherwise be appended to.
            vectors.recover(self.vec_path, coll.dim, coll.next_id)
        self.dim = coll.dim

    def model(self) -> Embedder:
        if self.embedder is None:
            # Checked against (or adopted by) the catalog by the loader.
            self.embedder = self.load_model([f.path for f in self.plan.todo])
        return self.embedder

    def commit(self, batch: Batch) -> None:
        db, summary, replaced, dim = self.db, self.summary, self.plan.replaced, self.dim
        start = reads.next_id(db)
        out = np.zeros((len(batch), dim), dtype=np.float32)
        rows = []
        to_embed: list[int] = []
        in_batch: list[tuple[int, int]] = []  # (offset, offset of its identical twin in this batch)
        for offset, (f, result) in enumerate(batch):
            image_id, key = start + offset, self.plan.keys.get(f.path)
            if isinstance(result, DecodeError):
                rows.append(_row(f, image_id, self.run_id, None, str(result), key))
                summary.failed += 1
                summary.failures.append((f.path, str(result)))
                continue
            rows.append(_row(f, image_id, self.run_id, result, None, key))
            twin = self.seen_sha.get(result.sha256)
            if twin is None:
                twin = reads.find_by_sha(db, result.sha256)
            if twin is None:
                to_embed.append(offset)
                self.seen_sha[result.sha256] = image_id
                continue
            if twin != replaced.get(f.path):  # a touched but unchanged file is no duplicate
                summary.duplicates += 1
            summary.copied += 1
            if twin >= start:
                in_batch.append((offset, twin - start))
            else:
                out[offset] = self.coll.vectors([twin])[0]
            self.seen_sha.setdefault(result.sha256, twin)
        here = [i for i in to_embed if isinstance(batch[i][1], Decoded)]
        if here:
            out[here] = self.model().embed(descriptor.batch([batch[i][1].pixels for i in here]))
        made = [i for i in to_embed if isinstance(batch[i][1], Embedded)]
        if made:
            got = np.stack([batch[i][1].vector for i in made])
            if got.shape != (len(made), dim) or not np.isfinite(got).all():
                raise CbirError(
                    f"a worker returned vectors of shape {got.shape}, not (n, {dim})", 1
                )
            out[made] = got
        summary.indexed += len(to_embed)
        for offset, twin_offset in in_batch:
            out[offset] = out[twin_offset]
        vectors.append(self.vec_path, start, out)
        for row, checksum in zip(rows, vectors.crc(out), strict=True):
            if row["status"] == "indexed":
                row["vector_crc"] = checksum
        replaced_ids = [replaced[f.path] for f, _ in batch if f.path in replaced]
        writes.commit_batch(db, rows, replaced_ids, start + len(batch))


def _prune(db, roots: list[str], seen: set[str]) -> int:
    """Drop rows of files under `roots` that the scan no longer found and that are gone.

    A file root stands for its folder and a manifest for the CSV's folder, so a file
    there that this scan did not list (a sibling, a row of another split) still exists
    and keeps its row: --prune removes files gone from disk, not files left unnamed.
    """
    prefixes = []
    for root in roots:
        root = os.path.abspath(root)
        base = (
            os.path.dirname(root) if root.lower().endswith(".csv") or os.path.isfile(root) else root
        )
        prefixes.append(base.rstrip(os.sep) + os.sep)
    gone = [
        row["id"]
        for path, row in reads.rows_by_path(db).items()
        if path not in seen
        and any(path.startswith(p) for p in prefixes)
        and not os.path.exists(path)
    ]
    writes.delete_rows(db, gone)
    return len(gone)
