"""The vector file: every vector stored once, row N holding the vector of catalog id N.

It is a raw float32 file, append-only, memory-mappable. Rows are written and
fsynced *before* the catalog rows that point to them are committed; the
catalog's `next_id` says how many rows are committed, and bytes past it are
leftovers of an interrupted job that `recover` cuts off.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from pipeline.errors import CbirError


def vectors_path(catalog_path: str | Path) -> Path:
    """The vector file lives beside its catalog: catalog.db -> catalog.vectors."""
    return Path(catalog_path).with_suffix(".vectors")


def row_count(path: Path, dim: int) -> int:
    """Whole rows in the file (a torn last row does not count)."""
    try:
        return os.path.getsize(path) // (dim * 4)
    except FileNotFoundError:
        return 0


def check(path: Path, dim: int, committed_rows: int) -> int:
    """Fail loudly if the file is shorter than the catalog says; return its size.

    Only a lost, truncated or replaced file can cause that.
    """
    size = os.path.getsize(path) if path.exists() else 0
    if size < committed_rows * dim * 4:
        raise CbirError(
            f"vector file {path} holds {size // (dim * 4)} rows but the catalog has "
            f"committed {committed_rows}: the file was truncated or replaced",
            exit_code=1,
        )
    return size


def recover(path: Path, dim: int, committed_rows: int) -> int:
    """Cut bytes past the committed rows (writers only); return how many rows were dropped."""
    size = check(path, dim, committed_rows)
    want = committed_rows * dim * 4
    if size > want:
        with open(path, "r+b") as f:
            f.truncate(want)
            f.flush()
            os.fsync(f.fileno())
    return (size - want) // (dim * 4) + (1 if (size - want) % (dim * 4) else 0)


def append(path: Path, start_row: int, vectors: np.ndarray) -> None:
    """Write rows starting at `start_row` and make them durable before returning."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    mode = "r+b" if path.exists() else "w+b"
    with open(path, mode) as f:
        f.seek(start_row * vectors.shape[1] * 4)
        f.write(vectors.tobytes())
        f.flush()
        os.fsync(f.fileno())


def open_rows(path: Path, dim: int, rows: int) -> np.ndarray:
    """Memory-map the first `rows` rows read-only (no copy, any size)."""
    if rows == 0:
        return np.zeros((0, dim), dtype=np.float32)
    return np.memmap(path, dtype=np.float32, mode="r", shape=(rows, dim))


def read(path: Path, dim: int, rows: int, ids) -> np.ndarray:
    """Copy the vectors of `ids` into memory."""
    ids = np.asarray(ids, dtype=np.int64)
    if len(ids) and (ids.min() < 0 or ids.max() >= rows):
        raise CbirError(f"vector id out of range (0..{rows - 1})")
    return np.array(open_rows(path, dim, rows)[ids], dtype=np.float32)
