"""FAISS indexes: derived from the stored vectors, persisted atomically, checked for staleness.

Every index is an inner-product index over catalog ids. The exact one is
`IndexFlatIP`; approximate ones come from any FAISS index factory string.
IVF indexes (also under a pre-transform such as OPQ or PCA) are kept bare:
they store catalog ids in their inverted lists, so they can grow and shrink
(`add_with_ids`, `remove_ids`) and be merged on disk (`shards`); every other
type is wrapped in `IndexIDMap2`. An on-disk index is two files,
`NAME+TAG.faiss` and the inverted lists `NAME+TAG.ivfdata` beside it. Each
index's record in the catalog holds the catalog generation it was built
from, so a stale index is detected rather than silently served.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import re
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from pipeline import catalog, config, faults, vectors
from pipeline.errors import CbirError, StaleIndexError
from pipeline.exact import VectorFileExact

EXACT = "exact"
EXACT_FACTORY = "Flat"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def index_path(index_dir: str | Path, name: str, record: dict[str, Any] | None = None) -> Path:
    """The file of index `name`: the one its record names (NAME+TAG.faiss), else NAME.faiss."""
    if not _NAME_RE.match(name):
        raise CbirError(f"invalid index name {name!r}: use letters, digits, '.', '_' and '-'")
    if record and record.get("file"):
        return Path(index_dir) / str(record["file"])
    return Path(index_dir) / f"{name}.faiss"


def data_path(path: Path) -> Path:
    """The inverted-list file of an on-disk index: NAME+TAG.faiss -> NAME+TAG.ivfdata."""
    return path.with_suffix(".ivfdata")


def _own_files(index_dir: Path, name: str) -> list[Path]:
    """Every file a build of `name` may have left: NAME.faiss, NAME+TAG.faiss and .ivfdata,
    the trained and shard temporaries of a sharded build (.NAME+TAG.trained.faiss,
    .NAME+TAG.shardK.faiss), and the temporaries of atomic writes.

    '+' cannot occur in an index name, so no other index's files match.
    """
    if not index_dir.is_dir():
        return []
    # A kind (trained, shardK) only after a tag: 'a.trained.faiss' is index 'a.trained''s file.
    ours = re.compile(
        rf"^\.?{re.escape(name)}(\+[0-9a-f]+(\.(trained|shard\d+))?)?"
        r"\.(faiss|ivfdata)(\.\d+\.tmp)?$"
    )
    return [f for f in index_dir.iterdir() if ours.match(f.name)]


def parse_params(
    items: str | list[str] | tuple[str, ...] | dict[str, Any] | None,
) -> dict[str, float]:
    """`["nprobe=16", "efSearch=64"]` -> {"nprobe": 16, "efSearch": 64}; values range-checked."""
    if not items:
        return {}
    if isinstance(items, dict):
        return {str(k): config.search_param(str(k), v) for k, v in items.items()}
    if isinstance(items, str):
        items = [items]  # one "name=value", not its letters
    out: dict[str, float] = {}
    for item in items:
        key, sep, value = item.partition("=") if isinstance(item, str) else ("", "", "")
        if not sep or not key.strip():
            raise CbirError(f"search parameter must look like name=number, got {item!r}")
        out[key.strip()] = config.search_param(key.strip(), value.strip())
    return out


# Parameters cbir applies itself rather than FAISS: `refine` = how many times k
# candidates the index returns for exact re-scoring from the vector file.
OWN_PARAMS = ("refine",)


def apply_params(index: faiss.Index, params: dict[str, float]) -> None:
    """Set search-time parameters (nprobe, efSearch, ...) through FAISS' ParameterSpace."""
    space = faiss.ParameterSpace()
    for key, value in params.items():
        # Checked here too: stored records and API dicts reach FAISS without parse_params,
        # and FAISS casts NaN or 1e12 to a C int without complaint.
        value = config.search_param(key, value)
        if not isinstance(index, faiss.Index) and key not in OWN_PARAMS:
            raise CbirError(f"exact search has no search parameter {key!r}")
        if key in OWN_PARAMS:
            continue
        try:
            space.set_index_parameter(index, key, value)
        except RuntimeError:
            raise CbirError(f"this index has no search parameter {key!r}") from None


def ivf_core(index: Any) -> faiss.IndexIVF | None:
    """The IVF index `index` is, directly or under a pre-transform (OPQ, PCA); else None.

    None also for an IVF wrapped in IndexIDMap2 (built by an older cbir): its
    ids live in the wrapper, so it cannot grow or be merged on disk.
    """
    if not isinstance(index, faiss.Index):
        return None
    idx = faiss.downcast_index(index)
    if isinstance(idx, faiss.IndexPreTransform):
        idx = faiss.downcast_index(idx.index)
    return idx if isinstance(idx, faiss.IndexIVF) else None


def make_index(factory: str, dim: int) -> faiss.Index:
    """An empty inner-product index from a factory string, holding catalog ids.

    IVF indexes stay bare (their inverted lists hold the ids; FAISS'
    IndexIDMap.remove_ids is wrong for IVF); every other type is wrapped in
    IndexIDMap2, which gives it add_with_ids and reconstruct by id.
    """
    if re.search(r"\bIDMap2?\b", factory):
        raise CbirError(
            f"invalid FAISS factory string {factory!r}: leave out IDMap/IDMap2, "
            "cbir maps catalog ids itself"
        )
    lists = max((int(n) for n in re.findall(r"IVF(\d+)", factory)), default=0)
    if lists > config.IVF_LISTS_MAX:
        # FAISS would allocate every list up front: a MemoryError, or worse, swapping.
        raise CbirError(
            f"{factory!r} asks for {lists:,} inverted lists, more than cbir allows "
            f"({config.IVF_LISTS_MAX:,}); use about sqrt(number of vectors)"
        )
    try:
        inner = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[-1] if str(e).strip() else ""
        raise CbirError(f"invalid FAISS factory string {factory!r}: {first}") from None
    except MemoryError:
        raise CbirError(f"not enough memory to create a {factory!r} index", 1) from None
    if ivf_core(inner) is not None:
        return inner
    return faiss.IndexIDMap2(inner)


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
    from pipeline.autoindex import ivf_lists

    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None and ivf.nlist > len(ids):
        # k-means cannot make more clusters than points; FAISS would fail or waste memory.
        raise CbirError(
            f"cannot build {factory!r} on {len(ids)} vectors: {ivf.nlist:,} inverted lists "
            f"is more than the vectors; use about sqrt(vectors) lists, e.g. IVF{ivf_lists(len(ids))}"
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
    coll, factory: str, params: dict[str, float] | None = None, whiten: Any = None
) -> faiss.Index:
    """Build an index from the collection's indexed vectors (train, then add in chunks).

    `whiten` (a fitted faiss.PCAMatrix): the index is whitened, PCA -> L2 ->
    IndexIDMap2(`factory` over the PCA's output dimensions); see `whitening`.
    """
    ids = coll.indexed_ids()
    if coll.dim == 0 or len(ids) == 0:
        raise CbirError("the catalog has no indexed images yet: run 'cbir index FOLDER' first")
    if whiten is not None:
        from pipeline import whitening

        index = whitening.wrap(whiten, make_index(factory, int(whiten.d_out)))
    else:
        index = make_index(factory, coll.dim)
    fill(index, coll.rows(), ids, factory, catalog.vector_crcs(coll.db))
    if params:
        apply_params(index, params)
    return index


def write_atomic(
    index: Any, path: Path, write: Callable[[Any, str], None] = faiss.write_index, what: str = ""
) -> int:
    """Temporary file, fsync, rename, fsync of the folder: readers never see half an index.

    `write` saves the object (an index by default; `faiss.write_VectorTransform` for a
    whitening transform), `what` names it in errors. On any failure (a full disk, say)
    the temporary file is removed.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CbirError(f"cannot create index folder {path.parent}: {e.strerror}") from None
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(index, str(tmp))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        faults.step(f"fsync {tmp.name}")
        os.replace(tmp, path)
        faults.step(f"rename {path.name}")
    except (OSError, RuntimeError) as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(e, RuntimeError) or e.errno == errno.ENOSPC:
            reason = "the disk is full or the folder is not writable"
        else:
            reason = e.strerror
        raise CbirError(
            f"could not write {what or 'index ' + path.stem} in {path.parent} ({reason}); "
            "free space and rerun",
            exit_code=1,
        ) from None
    vectors.fsync_dir(path.parent)
    return path.stat().st_size


def new_tag() -> str:
    """The TAG of a build's files NAME+TAG.*: new for every build, so no live file is reused."""
    return uuid.uuid4().hex[:12]


def save(
    coll, name: str, index: faiss.Index, record: dict[str, Any], data: Path | None = None
) -> dict[str, Any]:
    """Persist `index` under a new file and commit its record; the record switches indexes.

    `data` is the inverted-list file of an on-disk index (NAME+TAG.ivfdata,
    written and fsynced already); the index file takes its name and TAG.
    Older files of this name (and temporaries of builds that crashed) are
    removed after the commit: nobody's any more, and this writer holds the lock.
    """
    index_path(coll.index_dir, name)  # refuse a bad name before any work
    if data is not None:
        path = data.with_suffix(".faiss")
    else:
        path = coll.index_dir / f"{name}+{new_tag()}.faiss"
    size = write_atomic(index, path)
    record = {
        **record,
        "name": name,
        "ntotal": int(index.ntotal),
        "bytes": size,
        "file": path.name,
        "data_bytes": data.stat().st_size if data is not None else None,
    }
    catalog.save_index_record(coll.db, record)
    remove_leftovers(coll, name, record)
    return record


def remove_leftovers(coll, name: str, record: dict[str, Any]) -> None:
    """Remove every file of `name` that its committed `record` does not name (older builds,
    temporaries of crashed ones); only a writer, holding the lock, calls this."""
    path = index_path(coll.index_dir, name, record)
    keep = {path, data_path(path)} if is_ondisk(record) else {path}
    remove_files([f for f in _own_files(coll.index_dir, name) if f not in keep])


def remove_files(files: list[Path]) -> None:
    """Unlink files nobody's record names any more (each a write step); gone ones are fine."""
    for f in files:
        with contextlib.suppress(OSError):
            f.unlink()
            faults.step(f"unlink {f.name}")


def is_stale(coll, record: dict[str, Any] | None) -> bool:
    return record is None or record["generation"] != coll.generation


def is_ondisk(record: dict[str, Any] | None) -> bool:
    """Whether the record describes an on-disk index (with a NAME+TAG.ivfdata file)."""
    return bool(record) and record.get("data_bytes") is not None


def matches_file(record: dict[str, Any] | None, path: Path) -> bool:
    """Whether the index file (and an on-disk index's .ivfdata) is what its record describes.

    Each build writes new files before its record commits, so this only
    fails for a file replaced, truncated or removed behind cbir's back (or one
    written by an older cbir, which renamed over the file the record
    described). A short .ivfdata must be caught here: FAISS maps it whole, and
    reading past its end would kill the process (SIGBUS).
    """
    try:
        if record is None or path.stat().st_size != record["bytes"]:
            return False
        return not is_ondisk(record) or data_path(path).stat().st_size == record["data_bytes"]
    except OSError:
        return False


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
    record = catalog.index_record(coll.db, name)
    path = index_path(coll.index_dir, name, record)
    dim, ids = coll.dim, coll.indexed_ids()
    exact_record = {"name": EXACT, "factory": EXACT_FACTORY, "params": "{}"}
    if name == EXACT and len(ids) * dim * 4 >= EXACT_FROM_FILE_BYTES:
        index: Any = VectorFileExact(coll.rows(), ids)
        record = {**exact_record, "factory": "vector file", "generation": coll.generation}
    elif name == EXACT:
        # Derived and cheap: when missing, stale or damaged, rebuilt in memory.
        index = None
        if not is_stale(coll, record) and matches_file(record, path):
            with contextlib.suppress(CbirError):
                index = _read_checked(path, record, dim, mmap)
        if index is None:
            index = build(coll, EXACT_FACTORY)
            record = {**exact_record, "generation": coll.generation}
    else:
        if record is None:
            known = ", ".join(r["name"] for r in catalog.index_records(coll.db)) or "none"
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
        if not matches_file(record, path):
            raise CbirError(
                f"the file of index {name!r} does not match its record (a build was interrupted, "
                f"or the file was replaced); run 'cbir build-index {name}'",
                1,
            )
        index = _read_checked(path, record, dim, mmap)
    in_force = {**json.loads(record["params"] or "{}"), **(params or {})}
    apply_params(index, in_force)
    return index, record, in_force


def _read_checked(path: Path, record: dict[str, Any], dim: int, mmap: bool | None) -> faiss.Index:
    """Read an index file and check it is the index its record describes."""
    name = record["name"]
    try:
        index = read(path, mmap, ondisk=is_ondisk(record))
    except (RuntimeError, MemoryError):
        index = None
    if index is None or index.d != dim or index.ntotal != record["ntotal"]:
        raise CbirError(
            f"the file of index {name!r} is damaged and cannot be used; "
            f"run 'cbir build-index {name}' to rebuild it",
            1,
        )
    return index


MMAP_BYTES = 1 << 30
# From this size on, exact search reads the vector file itself: a FAISS flat
# index would be a second copy that, beside the first, no longer stays in the
# page cache (measured at 1M x 2048: 2.6 QPS from the copy, 11.5 from the file).
EXACT_FROM_FILE_BYTES = 2 << 30


def read(path: Path, mmap: bool | None = None, ondisk: bool = False) -> faiss.Index:
    """Read an index file, memory-mapped when large (or asked) and the type allows it.

    An on-disk index (`ondisk`) always maps its .ivfdata read-only, found
    beside the index file (IO_FLAG_ONDISK_SAME_DIR), so the folder can move.
    """
    if ondisk:
        flags = faiss.IO_FLAG_ONDISK_SAME_DIR | faiss.IO_FLAG_READ_ONLY
        with quiet():
            return faiss.read_index(str(path), flags)
    if mmap is None:
        mmap = path.stat().st_size >= MMAP_BYTES
    if mmap:
        try:
            # IO_FLAG_MMAP maps inverted lists (IVF); IO_FLAG_MMAP_IFC flat codes (Flat, PQ).
            flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY
            return faiss.read_index(str(path), flags)
        except RuntimeError:
            pass  # this index type cannot be mapped: read it into memory
    return faiss.read_index(str(path))


def stored_ids(index: faiss.Index) -> np.ndarray:
    """The catalog ids an index holds, sorted: from IndexIDMap2's map, or an IVF's lists."""
    outer = faiss.downcast_index(index)
    if isinstance(outer, faiss.IndexPreTransform):  # a whitened index: IDMap2 inside
        inner = faiss.downcast_index(outer.index)
        if isinstance(inner, faiss.IndexIDMap | faiss.IndexIDMap2):
            outer = inner
    if isinstance(outer, faiss.IndexIDMap | faiss.IndexIDMap2):
        return np.sort(faiss.vector_to_array(outer.id_map))
    ivf = ivf_core(index)
    if ivf is None:
        raise CbirError(f"cannot list the ids of a {type(outer).__name__} index", 1)
    invlists = ivf.invlists
    parts = [np.zeros(0, dtype=np.int64)]
    for lst in range(ivf.nlist):
        size = invlists.list_size(lst)
        if size:
            ptr = invlists.get_ids(lst)
            parts.append(faiss.rev_swig_ptr(ptr, size).copy())
            invlists.release_ids(lst, ptr)
    return np.sort(np.concatenate(parts))


_QUIET = threading.Lock()


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence what FAISS' on-disk code prints with C printf on stdout ("resizing ...",
    "IO_FLAG_ONDISK_SAME_DIR: updating ..."), which would land in `cbir search --json`.

    It swaps file descriptor 1 for /dev/null, for the whole process, only
    while an on-disk index is read, merged or shrunk (serialised by a lock).
    """
    with _QUIET:
        with contextlib.suppress(OSError, ValueError, AttributeError):
            sys.stdout.flush()
        try:
            saved: int | None = os.dup(1)
        except OSError:
            saved = None  # no stdout at all: nothing to protect
        if saved is None:
            yield
            return
        libc = ctypes.CDLL(None)
        libc.fflush(None)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.close(devnull)
        try:
            yield
        finally:
            libc.fflush(None)  # C stdio buffers what it printed: out to /dev/null, not later
            os.dup2(saved, 1)
            os.close(saved)
