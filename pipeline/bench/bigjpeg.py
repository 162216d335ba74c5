"""`cbir bench extract FOLDER --big`: indexing images/s of 12-megapixel JPEGs against the
same photos at their own size, with the model loaded once, and where a big file's time goes.

The big copies are made here (each photo upscaled with Lanczos to 4000x3000, or
3000x4000 upright, JPEG quality 90), so both folders show the same scenes and only the
files' size differs. The model is the one `cbir index` picks for a new catalog (the same
descriptor, runtime, precision and calibration, here from the small photos), loaded once
and warmed up; then each folder is indexed into a new throw-away catalog, alternately,
`repeats` times, and the medians are compared. JPEG's `draft` mode (decoding at 1/2, 1/4
or 1/8 scale) is what keeps the big ones close: the breakdown prints a big file's
decode with and without it.
"""

from __future__ import annotations

import hashlib
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PIL import Image

from pipeline import api
from pipeline.bench.extract import index_rate
from pipeline.config import Settings
from pipeline.errors import CbirError
from pipeline.inputs.decode import decode_file, resize_and_crop
from pipeline.inputs.scan import scan
from pipeline.store.collection import writing

BIG = (4000, 3000)
TARGET = 0.8  # issue 20: big JPEGs index within 20% of the images/s of small ones


def make_big(files: list[str], out: Path, size: tuple[int, int] = BIG) -> list[str]:
    """A `size` copy of each photo (turned for an upright one), Lanczos, JPEG quality 90."""
    out.mkdir(parents=True, exist_ok=True)
    made = []
    for n, path in enumerate(files):
        with Image.open(path) as im:
            im = im.convert("RGB")
            w, h = size if im.width >= im.height else size[::-1]
            target = out / f"{n:05d}.jpg"
            im.resize((w, h), Image.LANCZOS).save(target, quality=90)
        made.append(str(target))
    return made


def _ms(fn: Callable[[str], Any], files: list[str]) -> float:
    """Median milliseconds of `fn(path)` over the files, on this thread (one core)."""
    times = []
    for path in files:
        started = time.perf_counter()
        fn(path)
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def breakdown(files: list[str], settings: Settings, n: int = 20) -> dict[str, float]:
    """Per file, median ms on one core: reading and hashing the bytes; `decode_file` (all
    of it: header, hash, draft decode, orientation, resize); and decoding at full size
    with the same resize (what draft mode saves)."""
    sample = files[:n]
    crop = settings.input == "crop"

    def read_hash(path: str) -> None:
        with open(path, "rb") as f:
            hashlib.sha256(f.read()).hexdigest()

    def full(path: str) -> None:
        with Image.open(path) as im:
            resize_and_crop(im.convert("RGB"), settings.image_size, crop)

    return {
        "file_mb": statistics.mean(os.path.getsize(p) for p in sample) / 1e6,
        "read_hash_ms": _ms(read_hash, sample),
        "decode_file_ms": _ms(
            lambda p: decode_file(p, settings.max_pixels, size=settings.image_size, crop=crop),
            sample,
        ),
        "no_draft_ms": _ms(full, sample),
    }


def bench_big(
    folder: str,
    settings: Settings,
    limit: int | None = None,
    repeats: int = 3,
    work_dir: str | None = None,
    log: Callable[[str], Any] = print,
) -> dict[str, Any]:
    """Index the folder's photos and their 12 MP copies alternately; medians, ratio."""
    small = [f.path for f in scan([folder], labels="none")][: limit or 200]
    if not small:
        raise CbirError(f"no images under {folder}")
    settings = api.with_descriptor(settings, None)
    with tempfile.TemporaryDirectory(prefix="cbir-big-", dir=work_dir) as tmp:
        started = time.perf_counter()
        big = make_big(small, Path(tmp) / "big")
        log(f"made {len(big)} {BIG[0]}x{BIG[1]} copies ({time.perf_counter() - started:.0f} s)")
        # The model `cbir index` would pick for a new catalog of the small photos.
        with writing(Path(tmp) / "m.db", Path(tmp) / "m-index") as coll:
            embedder = api.embedder_for(settings, coll, todo=small)
        index_rate(small[: settings.batch_size], embedder, settings)  # warm-up
        rates: dict[str, list[float]] = {"small": [], "big": []}
        # CPU time of this process (all its threads) per image: what other jobs on the
        # machine change much less than the images/s.
        cpu: dict[str, list[float]] = {"small": [], "big": []}
        for r in range(repeats):
            order = ("small", "big") if r % 2 == 0 else ("big", "small")
            for kind in order:
                files = small if kind == "small" else big
                started = time.process_time()
                rates[kind].append(index_rate(files, embedder, settings))
                cpu[kind].append((time.process_time() - started) * 1000 / len(files))
        parts = {"small": breakdown(small, settings), "big": breakdown(big, settings)}
    producer = embedder.producer
    with Image.open(small[0]) as im:
        shape = f"{im.width}x{im.height}"
    median = {k: statistics.median(v) for k, v in rates.items()}
    cpu_ms = {k: statistics.median(v) for k, v in cpu.items()}
    ratio = median["big"] / median["small"]
    lines = [
        f"{len(small)} images under {folder} ({shape} first) and their {BIG[0]}x{BIG[1]} "
        f"copies; model {producer['runtime']} {producer['precision']}, batch {settings.batch_size}, {settings.workers} "
        f"decode workers, {repeats} runs each, alternating, medians",
        f"small: {median['small']:.1f} images/s  (runs: "
        + ", ".join(f"{x:.1f}" for x in rates["small"])
        + ")",
        f"12 MP: {median['big']:.1f} images/s  (runs: "
        + ", ".join(f"{x:.1f}" for x in rates["big"])
        + ")",
        f"ratio 12 MP / small: {ratio:.3f}  (target >= {TARGET})",
        f"CPU per image (all threads): small {cpu_ms['small']:.1f} ms, 12 MP "
        f"{cpu_ms['big']:.1f} ms; ratio small / 12 MP {cpu_ms['small'] / cpu_ms['big']:.3f}",
    ]
    for kind, p in parts.items():
        lines.append(
            f"one core, per {kind} file ({p['file_mb']:.2f} MB): read+sha256 "
            f"{p['read_hash_ms']:.1f} ms, decode_file {p['decode_file_ms']:.1f} ms, "
            f"decoding at full size instead {p['no_draft_ms']:.1f} ms"
        )
    for line in lines:
        log(line)
    return {"rates": rates, "median": median, "ratio": ratio, "cpu_ms": cpu_ms, "breakdown": parts}
