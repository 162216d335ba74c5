"""Benchmarks that print figures: measured in one run, compared as ratios, medians quoted."""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import api, jobs
from pipeline.decode import DecodeError, decode_file
from pipeline.errors import CbirError
from pipeline.scan import scan


def bench_extract(
    folder: str, settings: dict[str, Any], limit: int | None = None, repeats: int = 1
) -> dict[str, Any]:
    """End-to-end indexing throughput against the model alone on the same images.

    End to end = scan, read, hash, decode, resize, embed, write vectors, commit
    rows (into a throw-away catalog). Model alone = the same number of images,
    already decoded in memory, through the same model and batch size. A ratio
    near 1 means decoding and storage are hidden behind the model.
    """
    files = [f.path for f in scan([folder], labels="none")]
    if limit:
        files = files[:limit]
    if not files:
        raise CbirError(f"no images under {folder}")
    embedder = api.cached_embedder(
        str(settings["weights"]), int(settings["batch_size"]), str(settings["pooling"])
    )
    pixels = []
    for path in files:
        try:
            pixels.append(decode_file(path, int(settings["max_pixels"])).pixels)
        except DecodeError:
            continue
    pixels = np.stack(pixels)
    embedder.embed(pixels[: embedder.batch_size])  # warm-up: graph tracing is not throughput

    e2e, model = [], []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory(prefix="cbir-bench-") as tmp:
            started = time.perf_counter()
            summary = jobs.run_index(
                files, Path(tmp) / "catalog.db", Path(tmp) / "index", lambda: embedder, settings
            )
            e2e.append(
                (summary.indexed + summary.copied + summary.failed)
                / (time.perf_counter() - started)
            )
        started = time.perf_counter()
        embedder.embed(pixels)
        model.append(len(pixels) / (time.perf_counter() - started))
    e2e_med, model_med = statistics.median(e2e), statistics.median(model)
    lines = [
        f"images: {len(files)} under {folder} (batch {embedder.batch_size}, "
        f"{settings['workers']} decode workers, {repeats} repeats, medians)",
        f"end-to-end indexing: {e2e_med:.1f} images/s  (runs: {', '.join(f'{x:.1f}' for x in e2e)})",
        f"model alone:         {model_med:.1f} images/s  (runs: {', '.join(f'{x:.1f}' for x in model)})",
        f"ratio end-to-end / model: {e2e_med / model_med:.3f}  (target >= 0.9)",
    ]
    return {"end_to_end": e2e_med, "model": model_med, "ratio": e2e_med / model_med, "lines": lines}
