"""The vector file: every vector stored once, row N holding the vector of catalog id N.

It is a raw float32 file, append-only, memory-mappable. Rows are written and
fsynced *before* the catalog rows that point to them are committed; the
catalog's `next_id` says how many rows are committed, and bytes past it are
leftovers of an interrupted job that `recover` cuts off. Each indexed row's
CRC-32 is stored in the catalog with the row, so damage to the file is found
instead of served: `verify`, every index build, and every reader (through
`Collection.damaged` / `damaged_among`) check the rows they use.
"""

from __future__ import annotations

import os
import zlib
from pathlib import Path

import numpy as np

from pipeline import faults
from pipeline.errors import CbirError


def vectors_path(catalog_path: str | Path) -> Path:
    """The vector file lives beside its catalog file: catalog.db -> catalog.vectors.

    Derived from the resolved catalog file, so a symlink to a catalog shares
    its vectors (and its lock) instead of growing a second vector file.
    """
    return Path(os.path.realpath(catalog_path)).with_suffix(".vectors")


def fsync_dir(folder: Path) -> None:
    """Make a file's creation or rename durable (the folder entry is what changed)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    faults.step(f"fsync folder {folder.name}")


def row_count(path: Path, dim: int) -> int:
    """Whole rows in the file (a torn last row does not count)."""
    try:
        return os.path.getsize(path) // (dim * 4)
    except FileNotFoundError:
        return 0


def check(path: Path, dim: int, committed_rows: int) -> int:
    """Fail loudly if the file is shorter than the catalog says; return its size.

    Only a lost, truncated or replaced file can cause that: rows are fsynced before
    the catalog commits them, so no interrupted job leaves a short file. Readers and
    writers alike refuse it (`verify --repair` alone drops what is gone).
    """
    size = os.path.getsize(path) if path.exists() else 0
    if size < committed_rows * dim * 4:
        raise CbirError(
            f"vector file {path} holds {size // (dim * 4)} rows but the catalog has "
            f"committed {committed_rows}: the file was truncated or replaced; nothing was "
            "changed. Restore it from a backup, or run 'cbir verify --repair', which drops "
            "the images whose vectors are gone so that the next 'cbir index' embeds their "
            "files again",
            exit_code=1,
        )
    return size


def resize(path: Path, rows: int, dim: int) -> None:
    """Cut the file to `rows` rows, or extend it with zero rows (writers only), durably."""
    with open(path, "r+b") as f:
        f.truncate(rows * dim * 4)
        f.flush()
        os.fsync(f.fileno())
    faults.step("truncate vectors")


def recover(path: Path, dim: int, committed_rows: int) -> int:
    """Cut bytes past the committed rows (writers only); return how many rows were dropped."""
    size = check(path, dim, committed_rows)
    want = committed_rows * dim * 4
    if size > want:
        resize(path, committed_rows, dim)
    return (size - want) // (dim * 4) + (1 if (size - want) % (dim * 4) else 0)


def append(path: Path, start_row: int, vectors: np.ndarray) -> None:
    """Write rows starting at `start_row` and make them durable before returning."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    created = not path.exists()
    with open(path, "r+b" if not created else "w+b") as f:
        f.seek(start_row * vectors.shape[1] * 4)
        f.write(vectors.tobytes())
        f.flush()
        os.fsync(f.fileno())
    faults.step("fsync vectors")
    if created:
        fsync_dir(path.parent)


CHECK_ROWS = 4096  # rows copied at a time to check their CRCs (32 MiB at d = 2048)


def crc(rows: np.ndarray) -> list[int]:
    """CRC-32 of each float32 row's bytes (catches any bit flip, not only non-unit vectors).

    zlib reads each row in place through one memoryview: no per-row copy.
    """
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    if rows.size == 0:
        return [0] * len(rows)
    step = rows.shape[1] * 4
    flat = memoryview(rows).cast("B")
    return [zlib.crc32(flat[i : i + step]) for i in range(0, len(rows) * step, step)]


def damaged(rows: np.ndarray, ids: np.ndarray, crcs: dict[int, int | None]) -> list[int]:
    """Ids among `ids` whose stored row no longer matches its recorded CRC (None = unknown).

    `rows` may be a memory map of any size: CHECK_ROWS rows are in memory at a time,
    and a run of consecutive ids is read as a slice (no gather copy).
    """
    ids = np.asarray(ids, dtype=np.int64)
    bad: list[int] = []
    for start in range(0, len(ids), CHECK_ROWS):
        chunk = ids[start : start + CHECK_ROWS]
        if (np.diff(chunk) == 1).all():  # consecutive ids: a view of the rows, no copy
            block = rows[int(chunk[0]) : int(chunk[-1]) + 1]
        else:
            block = rows[chunk]
        for i, c in zip(chunk.tolist(), crc(block), strict=True):
            want = crcs.get(i)
            if want is not None and want != c:
                bad.append(i)
    return bad


def damage_text(bad: list[int]) -> str:
    """One line on damaged rows: how many, which, and how to repair them."""
    if len(bad) == 1:
        return (
            f"the stored vector of id {bad[0]} fails its checksum (the vector file is damaged); "
            "'cbir verify --repair' drops it so that the next 'cbir index' embeds it again"
        )
    return (
        f"{len(bad)} stored vectors (ids {bad[:5]}) fail their checksum (the vector file is "
        "damaged); 'cbir verify --repair' drops them so that the next 'cbir index' embeds "
        "them again"
    )


def open_rows(path: Path, dim: int, rows: int) -> np.ndarray:
    """Memory-map the first `rows` rows read-only (no copy, any size)."""
    if rows == 0:
        return np.zeros((0, dim), dtype=np.float32)
    return np.memmap(path, dtype=np.float32, mode="r", shape=(rows, dim))


def take(rows: np.ndarray, ids) -> np.ndarray:
    """Copies of rows[ids], refusing ids outside the committed rows."""
    ids = np.asarray(ids, dtype=np.int64)
    if len(ids) and (ids.min() < 0 or ids.max() >= len(rows)):
        raise CbirError(f"vector id out of range (0..{len(rows) - 1})")
    return np.array(rows[ids], dtype=np.float32)


def read(path: Path, dim: int, rows: int, ids) -> np.ndarray:
    """Copy the vectors of `ids` from the first `rows` committed rows of the file."""
    return take(open_rows(path, dim, rows), ids)
