"""Seconds from a file landing in a watched folder to it being searchable, with the real model.

A watcher (`pipeline.api.watch`, the code `cbir watch` runs) keeps a temporary catalog
of N Corel-1K images up to date, with the default runtime and the local ImageNet
weights, its model loaded once. Then, one at a time, an unseen Corel image is copied
into the folder (written to a hidden name and renamed in, so it lands whole) and the
clock runs until a reader of the catalog sees it indexed (exact search answers from
the committed rows, so this is when `cbir search` can return it), and until the
watcher's batch has ended (its exact index rebuilt). Each file is then searched for
by its own pixels, which must rank it first. Prints each file's seconds and the
medians.

    python scripts/watch_latency.py --files 10 --debounce 1.0
"""

from __future__ import annotations

import argparse
import csv
import os
import queue
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pipeline  # noqa: E402
from pipeline import api  # noqa: E402
from pipeline.store import catalog, reads  # noqa: E402

SHARED = ROOT.parent / "shared"
COREL = SHARED / "datasets" / "corel1k"
WEIGHTS = SHARED / "models" / "resnet50_imagenet_notop.weights.h5"


def corel_images() -> list[Path]:
    with (COREL / "manifest.csv").open(newline="") as f:
        return [COREL / r["path"] for r in csv.DictReader(f)]


def indexed(db_path: Path, path: str) -> bool:
    db = catalog.open_reader(db_path)
    try:
        row = db.conn.execute(
            "select status from images where path = ? and id < "
            "(select cast(value as integer) from meta where key = 'next_id')",
            [path],
        ).fetchone()
        return bool(row) and row[0] == "indexed"
    finally:
        db.conn.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--start", type=int, default=60, help="images in the folder at start")
    ap.add_argument("--files", type=int, default=10, help="files landed one at a time")
    ap.add_argument("--debounce", type=float, default=api.watching.DEBOUNCE)
    ap.add_argument("--runtime", default="auto")
    args = ap.parse_args()

    images = corel_images()[:: max(1, 1000 // (args.start + args.files))]
    start, landing = images[: args.start], images[args.start : args.start + args.files]
    tmp = Path(tempfile.mkdtemp(prefix="cbir-watch-latency-"))
    folder = tmp / "photos"
    folder.mkdir()
    for p in start:
        shutil.copy(p, folder / f"{p.parent.name}_{p.name}")
    options = {
        "catalog": str(tmp / "catalog.db"),
        "index_dir": str(tmp / "index"),
        "weights": str(WEIGHTS),
        "runtime": args.runtime,
    }
    batches: queue.Queue = queue.Queue()
    stop = threading.Event()
    watcher = threading.Thread(
        target=api.watch,
        args=([folder],),
        kwargs={"on_batch": batches.put, "stop": stop, "debounce": args.debounce, **options},
        daemon=True,
    )
    t0 = time.monotonic()
    watcher.start()
    first = batches.get(timeout=1800)
    print(f"start: {first.summary.indexed} images indexed in {time.monotonic() - t0:.1f} s "
          f"(model loaded, and for int8 quantised, once)")  # fmt: skip
    db = catalog.open_reader(tmp / "catalog.db")
    print(f"model: {reads.get_meta(db, 'producer')}")
    db.conn.close()
    time.sleep(2 * args.debounce + 1)  # the model preloaded; no batch in flight
    to_row, to_batch = [], []
    try:
        for p in landing:
            dest = folder / f"new_{p.parent.name}_{p.name}"
            hidden = folder / f".{dest.name}.part"  # not an image name: no event, no scan
            shutil.copy(p, hidden)
            landed = time.monotonic()
            os.rename(hidden, dest)
            while not indexed(tmp / "catalog.db", str(dest)):
                time.sleep(0.005)
            to_row.append(time.monotonic() - landed)
            batch = batches.get(timeout=300)
            to_batch.append(time.monotonic() - landed)
            top = pipeline.search(str(dest), k=1, **options)[0]["results"][0]["path"]
            assert top == str(dest), (top, dest)
            print(f"{dest.name}: searchable after {to_row[-1]:.2f} s, batch done after "
                  f"{to_batch[-1]:.2f} s ({batch.seconds:.2f} s of indexing job)")  # fmt: skip
            time.sleep(0.5)
    finally:
        stop.set()
        watcher.join(timeout=60)
        shutil.rmtree(tmp, ignore_errors=True)
    print(
        f"median over {len(to_row)} files, debounce {args.debounce} s: searchable after "
        f"{statistics.median(to_row):.2f} s (min {min(to_row):.2f}, max {max(to_row):.2f}), "
        f"batch done after {statistics.median(to_batch):.2f} s"
    )


if __name__ == "__main__":
    main()
