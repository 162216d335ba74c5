"""`cbir bench serve`: requests/s, p50 and p99 of uploads and of id searches, over real HTTP.

The server is the one `cbir serve` runs (the app on waitress, the model loaded
once); the clients (pipeline/web/load.py) run in a child process, so their
own Python work does not slow the server's. Every answer is checked: an
upload of a catalogued image, or a search by its id, must find it at rank 1.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from pipeline.config import Settings
from pipeline.errors import CbirError
from pipeline.store import reads
from pipeline.web.load import Job, run_in_process
from pipeline.web.server import DEFAULT_THREADS, open_app, running

MAX_ITEMS = 200  # distinct images queried in turn (the clients hold their bytes)


def _items(db, images: list[str]) -> list[tuple[int, str]]:
    """(id, file) to query: the given files that are catalogued, else a sample of the catalog."""
    if images:
        by_path = reads.rows_by_path(db)
        wanted = {os.path.abspath(p) for p in images} | {os.path.realpath(p) for p in images}
        rows = [r for p, r in by_path.items() if p in wanted and r["status"] == "indexed"]
        if not rows:
            raise CbirError(
                "none of the given images is in the catalog: answers can only be checked "
                "for catalogued images (give none to sample the catalog)"
            )
        found = sorted((r["id"], r["path"]) for r in rows)
    else:
        ids = reads.indexed_ids(db)
        rows = reads.lookup(
            db, ids[np.linspace(0, len(ids) - 1, min(len(ids), 4 * MAX_ITEMS)).astype(int)]
        )
        found = sorted((i, r["path"]) for i, r in rows.items())
    found = [(i, p) for i, p in found if os.path.isfile(p)][:MAX_ITEMS]
    if not found:
        raise CbirError("no catalogued image file is readable here to upload")
    return found


def bench_serve(
    settings: Settings,
    images: list[str],
    concurrency: int = 16,
    seconds: float | None = 10.0,
    requests: int | None = None,
    threads: int = DEFAULT_THREADS,
    kinds: tuple[str, ...] = ("upload", "id"),
) -> list[dict[str, Any]]:
    """One result per kind: requests, errors, wrong answers, requests/s, p50 and p99 in ms.

    First, the model alone: images/s of the server's model on the same images in
    batches of its size (the micro-batch), so uploads/s can be read as a share of it.
    """
    app = open_app(settings)
    service = app.extensions["cbir"]
    items = _items(service.session.coll.db, images)
    model = _model_throughput(
        service.session.embedder.inner, [p for _, p in items], settings.max_pixels
    )
    results = [{"kind": "model alone", "images_per_s": round(model, 1)}]
    with running(app, threads) as url:
        for kind in kinds:
            job = Job(url, kind, items, concurrency, seconds, requests, k=settings.k)
            result = {**run_in_process(job), "threads": threads}
            if kind == "upload":
                result["share_of_model"] = round(result["requests_per_s"] / model, 3)
            results.append(result)
    return results


def _model_throughput(embedder, paths: list[str], max_pixels: int) -> float:
    """Images/s of the model alone on these images, in batches of its batch size (median of 3)."""
    import statistics
    import time

    from pipeline.inputs.decode import decode_file

    pixels = np.stack([decode_file(p, max_pixels).pixels for p in paths])
    embedder.embed(pixels[: embedder.batch_size])  # warm-up
    rates = []
    for _ in range(3):
        started = time.perf_counter()
        for i in range(0, len(pixels), embedder.batch_size):
            embedder.embed(pixels[i : i + embedder.batch_size])
        rates.append(len(pixels) / (time.perf_counter() - started))
    return statistics.median(rates)
