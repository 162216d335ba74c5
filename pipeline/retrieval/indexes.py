"""FAISS indexes: built from the stored vectors, saved and switched by their record,
checked for staleness, loaded.

The exact index is `IndexFlatIP`; approximate ones come from any FAISS
factory string (`factories`). Each index's record in the catalog names its
files (`index_files`) and holds the catalog generation it was built from, so
a stale index is detected rather than silently served.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from pipeline.errors import CbirError, StaleIndexError
from pipeline.retrieval import factories, index_files, whitening
from pipeline.retrieval.exact import VectorFileExact
from pipeline.store import reads, seals, vectors, writes

EXACT = "exact"
EXACT_FACTORY = "Flat"

TRAIN_ROWS = 200_000


def training_sample(ids: np.ndarray) -> np.ndarray:
    """The ids an index trains on: all of them, or a fixed sample of TRAIN_ROWS (seed 0)."""
    if len(ids) <= TRAIN_ROWS:
        return ids
    return np.sort(np.random.default_rng(0).choice(ids, TRAIN_ROWS, replace=False))


def _faiss_failure(e: BaseException, factory: str, n: int) -> CbirError:
    if isinstance(e, MemoryError):
        return CbirError(f"not enough memory to build {factory!r} on {n} vectors", 1)
    last = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
    return CbirError(f"cannot build {factory!r} on {n} vectors: {last}")


def train(index: faiss.Index, rows: np.ndarray, ids: np.ndarray, factory: str = "") -> None:
    """Train `index` (if it needs it) on training_sample(ids) of `rows`."""
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None and ivf.nlist > len(ids):
        # k-means cannot make more clusters than points; FAISS would fail or waste memory.
        lists = factories.ivf_lists(len(ids))
        raise CbirError(
            f"cannot build {factory!r} on {len(ids)} vectors: {ivf.nlist:,} inverted lists "
            f"is more than the vectors; use about sqrt(vectors) lists, e.g. IVF{lists}"
        )
    if index.is_trained:
        return
    try:
        index.train(np.asarray(rows[training_sample(ids)], dtype=np.float32))
    except (RuntimeError, MemoryError) as e:
        raise _faiss_failure(e, factory, len(ids)) from None


def add_rows(
    index: faiss.Index,
    rows: np.ndarray,
    ids: np.ndarray,
    crcs: dict[int, int | None] | None = None,
    factory: str = "",
) -> None:
    """Add rows[ids] under their ids, 65,536 rows in memory at a time.

    With `crcs` (id -> recorded checksum) every row is checked before it is
    added, so no index is built from a damaged vector file.
    """
    try:
        for start in range(0, len(ids), 65536):
            chunk = ids[start : start + 65536]
            if crcs is not None:
                bad = vectors.damaged(rows, chunk, crcs)
                if bad:
                    raise CbirError(
                        f"the vector file is damaged: {len(bad)} vectors fail their checksum "
                        f"(ids {bad[:5]}); no index was built from it. 'cbir verify --repair' "
                        "drops those images so that the next 'cbir index' embeds them again",
                        exit_code=1,
                    )
            index.add_with_ids(np.asarray(rows[chunk], dtype=np.float32), chunk)
    except (RuntimeError, MemoryError) as e:
        raise _faiss_failure(e, factory, len(ids)) from None


def fill(
    index: faiss.Index,
    rows: np.ndarray,
    ids: np.ndarray,
    factory: str = "",
    crcs: dict[int, int | None] | None = None,
) -> None:
    """Train `index` on (a sample of) rows[ids] if it needs it, then add them in chunks.

    `rows` may be a memory map of any size: at most TRAIN_ROWS rows are trained on
    and 65,536 are in memory at a time. With `crcs` (id -> recorded checksum)
    every row is checked before it is added. FAISS failures (too few vectors
    for the index type, memory) become one-line CbirErrors.
    """
    train(index, rows, ids, factory)
    add_rows(index, rows, ids, crcs, factory)


def build(
    coll,
    factory: str,
    params: dict[str, float] | None = None,
    whiten: Any = None,
    usable_only: bool = False,
) -> faiss.Index:
    """Build an index from the collection's indexed vectors (train, then add in chunks).

    `whiten` (a fitted faiss.PCAMatrix): the index is whitened, PCA -> L2 ->
    IndexIDMap2(`factory` over the PCA's output dimensions); see `whitening`.
    A damaged row refuses the build, or with `usable_only` (a reader's in-memory
    index) is left out, as `Collection.usable_ids` checked every row already.
    """
    ids = coll.usable_ids() if usable_only else coll.indexed_ids()
    if coll.dim == 0 or len(ids) == 0:
        raise CbirError("the catalog has no indexed images yet: run 'cbir index FOLDER' first")
    if whiten is not None:
        index = whitening.wrap(whiten, factories.make_index(factory, int(whiten.d_out)))
    else:
        index = factories.make_index(factory, coll.dim)
    fill(index, coll.rows(), ids, factory, None if usable_only else reads.vector_crcs(coll.db))
    if params:
        factories.apply_params(index, params)
    return index


def save(
    coll, name: str, index: faiss.Index, record: dict[str, Any], data: Path | None = None
) -> dict[str, Any]:
    """Persist `index` under a new file and commit its record; the record switches indexes.

    `data` is the inverted-list file of an on-disk index (NAME+TAG.ivfdata,
    written and fsynced already); the index file takes its name and TAG.
    Older files of this name (and temporaries of builds that crashed) are
    removed after the commit: nobody's any more, and this writer holds the lock.
    """
    index_files.index_path(coll.index_dir, name)  # refuse a bad name before any work
    if data is not None:
        path = data.with_suffix(".faiss")
    else:
        path = coll.index_dir / f"{name}+{index_files.new_tag()}.faiss"
    size = index_files.write_atomic(index, path)
    # Digests of the files as written (read back before the record names them): any later
    # change to them, even one that keeps their size, is refused when they are loaded.
    record = {
        **record,
        "name": name,
        "ntotal": int(index.ntotal),
        "bytes": size,
        "file": path.name,
        "data_bytes": data.stat().st_size if data is not None else None,
        "digest": index_files.file_digest(path),
        "data_digest": index_files.file_digest(data) if data is not None else None,
    }
    writes.save_index_record(coll.db, record)
    index_files.remove_leftovers(coll, name, record)
    return record


def is_stale(coll, record: dict[str, Any] | None) -> bool:
    return record is None or record["generation"] != coll.generation


def load(
    coll,
    name: str,
    params: dict[str, float] | None = None,
    allow_stale: bool = False,
    mmap: bool | None = None,
) -> tuple[Any, dict[str, Any], dict[str, float]]:
    """Load an index for searching; returns (index, record, search parameters in force).

    The exact index is rebuilt in memory when missing, stale or damaged (it is
    a plain copy of the vectors), and from EXACT_FROM_FILE_BYTES on it is the
    vector file itself; an approximate one that is stale is refused. Files
    over MMAP_BYTES (or with mmap=True) are memory-mapped where the index
    type allows, so a large index costs page cache, not private memory.
    """
    try:
        record = reads.index_record(coll.db, name)
    except seals.DamagedRow:
        if name != EXACT:
            raise
        record = None  # the exact index is rebuilt in memory, as when its record is missing
    path = index_files.index_path(coll.index_dir, name, record)
    # Unchecked: a saved index answers with ids whose rows `reads.lookup` checks; the
    # exact search over the vector file answers from the set itself, so checks every row.
    dim, ids = coll.dim, reads.indexed_ids(coll.db)
    exact_record = {"name": EXACT, "factory": EXACT_FACTORY, "params": "{}"}
    if name == EXACT and len(ids) * dim * 4 >= EXACT_FROM_FILE_BYTES:
        index: Any = VectorFileExact(coll.rows(), coll.indexed_ids())
        record = {**exact_record, "factory": "vector file", "generation": coll.generation}
    elif name == EXACT:
        # Derived and cheap: when missing, stale or damaged, rebuilt in memory.
        index = None
        if not is_stale(coll, record) and index_files.matches_file(record, path):
            with contextlib.suppress(CbirError):
                index = _read_checked(path, record, dim, mmap)
        if index is None:
            index = build(coll, EXACT_FACTORY, usable_only=not coll.writer)
            record = {**exact_record, "generation": coll.generation}
    else:
        if record is None:
            known = ", ".join(r["name"] for r in reads.index_records(coll.db)) or "none"
            raise CbirError(
                f"no index named {name!r} (indexes: {known}); "
                f"build it with 'cbir build-index {name} --factory ...'"
            )
        if is_stale(coll, record) and not allow_stale:
            raise StaleIndexError(
                f"index {name!r} is stale: built at catalog generation {record['generation']}, "
                f"catalog is now at {coll.generation}; run 'cbir build-index {name}' to refresh"
            )
        if not path.exists():
            raise CbirError(
                f"the file of index {name!r} is missing; run 'cbir build-index {name}'", 1
            )
        if not index_files.matches_file(record, path):
            raise CbirError(
                f"the file of index {name!r} does not match its record (a build was interrupted, "
                f"or the file was replaced); run 'cbir build-index {name}'",
                1,
            )
        index = _read_checked(path, record, dim, mmap)
    in_force = {**json.loads(record["params"] or "{}"), **(params or {})}
    factories.apply_params(index, in_force)
    return index, record, in_force


def loaded(
    coll,
    name: str,
    params: dict[str, float] | None = None,
    allow_stale: bool = False,
) -> tuple[Any, dict[str, Any], dict[str, float]]:
    """(index, record, parameters in force) of a named index, loaded once per generation
    and shared (`Collection.cached`).

    With explicit `params` the index is loaded afresh for the caller, so a
    shared cached index never has its parameters changed under another thread.
    """
    if params:
        return load(coll, name, params, allow_stale)

    def make() -> tuple[Any, dict[str, Any]]:
        index, record, _ = load(coll, name, None, allow_stale)
        return index, record

    index, record = coll.cached(("index", name, allow_stale), make)
    return index, record, json.loads(record["params"] or "{}")


def _read_checked(path: Path, record: dict[str, Any], dim: int, mmap: bool | None) -> faiss.Index:
    """Read an index file and check it is the index its record describes: its digests
    (DamagedIndex, exit 1), then what FAISS reads from it."""
    name = record["name"]
    mapped = mmap if mmap is not None else _size(path) >= index_files.MMAP_BYTES
    index_files.check_digests(record, path, mapped)
    try:
        index = index_files.read(path, mmap, ondisk=index_files.is_ondisk(record))
    except (RuntimeError, MemoryError):
        index = None
    if index is None or index.d != dim or index.ntotal != record["ntotal"] or unusable(index):
        raise CbirError(
            f"the file of index {name!r} is damaged and cannot be used; "
            f"run 'cbir build-index {name}' to rebuild it",
            1,
        )
    return index


def unusable(index: faiss.Index) -> str | None:
    """Why an index read from its file cannot answer, though FAISS read it: a whitening
    transform with non-finite or absurd values (one built before cbir checked them, or
    recorded without digests) turns every query into NaN. None if it can."""
    space = whitening.transform_of(index)
    return whitening.transform_problem(space.pca) if space is not None else None


# From this size on, exact search reads the vector file itself: a FAISS flat
# index would be a second copy that, beside the first, no longer stays in the
# page cache (measured at 1M x 2048: 2.6 QPS from the copy, 11.5 from the file).
EXACT_FROM_FILE_BYTES = 2 << 30


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0
