"""Dates for images catalogued before schema 6, read from their EXIF headers by the next job.

Schema 6 records each image's date (`taken_at`: its EXIF date, else its mtime) when
it is indexed. Rows from before have none; an indexing job fills them for the
files it scans and finds unchanged, reading only each file's header (no pixel
decoded, no model run), a few hundred at a time, each batch one transaction. A row
whose file this job does not scan keeps no date, and a date filter uses its mtime
until a job scans it (`retrieval.filters`).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from pipeline import files
from pipeline.config import Settings
from pipeline.inputs import dates
from pipeline.inputs.scan import ScannedFile
from pipeline.store import reads, writes
from pipeline.store.collection import Collection

BATCH = 500  # rows per transaction: a kill loses at most this many headers' reading


def fill_dates(coll: Collection, scanned: list[ScannedFile], settings: Settings) -> int:
    """Record the date of every undated, indexed image among `scanned` whose file is
    unchanged (same size and mtime as its row); returns how many were dated."""
    undated = reads.undated(coll.db)
    if not undated:
        return 0
    todo = []
    for f in scanned:
        row = undated.get(f.path)
        if row is not None and row["size"] == f.size and row["mtime"] == f.mtime:
            todo.append((row["id"], f))
    limit = files.image_max_bytes(settings.max_pixels)
    with ThreadPoolExecutor(max_workers=max(1, settings.workers)) as pool:
        for start in range(0, len(todo), BATCH):
            chunk = todo[start : start + BATCH]
            found = pool.map(lambda item: dates.file_date(item[1].path, limit), chunk)
            writes.set_dates(
                coll.db,
                {i: dates.taken(at, f.mtime) for (i, f), at in zip(chunk, found, strict=True)},
            )
    return len(todo)
