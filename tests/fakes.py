"""A deterministic stand-in for ResNet50 and small real image files, for the fast tier.

The fake model turns pixels into 2048-d features by a fixed random projection
of an 8x8 thumbnail, so identical images give identical vectors and different
images different ones, in microseconds and without TensorFlow.

Run as a script, it is the `cbir` command with the fake model in place of
ResNet50: `python tests/fakes.py index FOLDER --catalog ...`. Crash-injection
tests run it as a child process with CBIR_CRASH_AFTER set.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from pipeline.embed.interface import DIM, Embedder, l2_normalize, preprocess  # noqa: E402
from pipeline.store import catalog, reads, schema, seals, vectors  # noqa: E402

FAKE_FINGERPRINT = {
    "architecture": "fake-projection (tests)",
    "pooling": "avg",
    "weights_sha256": "0" * 64,
    "preprocessing": "tests",
    "dimension": DIM,
    "normalization": "l2",
}


class FakeModel:
    """predict_on_batch like a Keras model: (n, 224, 224, 3) -> (n, 2048)."""

    def __init__(self, delay: float = 0.0, log: str | None = None):
        self.projection = np.random.default_rng(1234).standard_normal((192, DIM)).astype(np.float32)
        self.delay = delay  # seconds per batch, to give kill tests a job that lasts
        self.log = log  # a file that hears the size of every batch begun (fault tests)

    def predict_on_batch(self, batch: np.ndarray) -> np.ndarray:
        if self.log:
            with open(self.log, "a") as f:
                f.write(f"{len(batch)}\n")
        if self.delay:
            time.sleep(self.delay)
        n = len(batch)
        thumbs = batch.reshape(n, 8, 28, 8, 28, 3).mean(axis=(2, 4)).reshape(n, 192)
        return np.abs(thumbs @ self.projection) + 1e-3


class FakeEmbedder:
    """Satisfies pipeline.embed.interface.Embedder: unit vectors from the fake model, no TensorFlow.

    Its producer is whatever runtime and precision were asked for (the vectors
    are the same), so the catalog's producer rules can be tested too.
    """

    def __init__(
        self,
        batch_size: int = 32,
        delay: float = 0.0,
        runtime="keras",
        precision="fp32",
        log: str | None = None,
        descriptor=None,
    ):
        self.model = FakeModel(delay, log)
        # The catalog's descriptor is recorded as a real model records it; images of
        # other sizes (whole-image descriptors) are resized to 224x224 for the projection.
        from pipeline.embed.descriptor import Descriptor

        self.descriptor = descriptor or Descriptor()
        self.fingerprint = {**FAKE_FINGERPRINT, **(descriptor.fingerprint() if descriptor else {})}
        self.producer = {"runtime": runtime, "precision": precision, "calibration": None}
        self.batch_size = batch_size
        self.source = "imagenet"

    def embed(self, pixels) -> np.ndarray:
        if isinstance(pixels, list) or np.asarray(pixels).shape[1:] != (224, 224, 3):
            from PIL import Image

            pixels = np.stack(
                [np.asarray(Image.fromarray(np.asarray(p)).resize((224, 224))) for p in pixels]
            )
        return l2_normalize(self.model.predict_on_batch(preprocess(pixels)))

    def maps(self, pixels: np.ndarray) -> np.ndarray:
        """Feature maps like a runtime's ResNet50 without pooling: (n, 7, 7, 2048), each
        location the fake model's projection of its own 32x32 cell's 8x8 thumbnail."""
        from PIL import Image

        pixels = np.stack(
            [np.asarray(Image.fromarray(np.asarray(p)).resize((224, 224))) for p in pixels]
        )
        n = len(pixels)
        cells = preprocess(pixels).reshape(n, 7, 8, 4, 7, 8, 4, 3).mean(axis=(3, 6))
        cells = cells.transpose(0, 1, 4, 2, 5, 3).reshape(n, 7, 7, 192)
        return np.abs(cells @ self.model.projection) + 1e-3


def fake_embedder(batch_size: int = 32, pooling: str = "avg", delay: float = 0.0) -> Embedder:
    return FakeEmbedder(batch_size, delay)


def cached(
    weights: str,
    batch_size: int,
    pooling: str = "avg",
    runtime: str = "keras",
    precision: str = "fp32",
    calibration: tuple[str, ...] = (),
    descriptor=None,
    delay: float = 0.0,
    log: str | None = None,
) -> Embedder:
    """Stands in for pipeline.api.models.cached_embedder (same arguments): tests patch it in."""
    return FakeEmbedder(batch_size, delay, runtime, precision, log, descriptor)


def install(delay: float = 0.0, log: str | None = None) -> None:
    """Make every model load in this process return the fake model (`log`: see FakeModel)."""
    from pipeline import api

    api.models.cached_embedder = lambda *args: cached(*args, delay=delay, log=log)


def make_images(folder: Path, n: int, seed: int = 0, size: int = 48) -> list[Path]:
    """n small, distinct JPEG files under folder/<label>/, two labels."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        sub = folder / ("red" if i % 2 else "blue")
        sub.mkdir(parents=True, exist_ok=True)
        base = rng.integers(0, 256, 3)
        noise = rng.integers(0, 64, (size, size, 3))
        pixels = np.clip(base + noise, 0, 255).astype(np.uint8)
        path = sub / f"img{seed}_{i:04d}.jpg"
        Image.fromarray(pixels).save(path, quality=90)
        out.append(path)
    return out


# The known warp of `warped_pair`'s copy: a slight rotation, scale and perspective.
WARP = np.array([[0.9, 0.12, 30.0], [-0.08, 0.95, 20.0], [0.0002, 0.0001, 1.0]])


def warped_pair(folder: Path, size: tuple[int, int] = (360, 270), seed: int = 7) -> None:
    """folder/original.png, a texture of many corners (noise, rectangles, discs), and
    folder/warped.png, it warped by WARP: a pair that local features verify."""
    import cv2
    from PIL import Image

    w, h = size
    rng = np.random.default_rng(seed)
    im = cv2.GaussianBlur(rng.integers(0, 255, (h, w, 3), dtype=np.uint8), (5, 5), 0)
    for _ in range(40):
        x, y = int(rng.integers(0, w - 20)), int(rng.integers(0, h - 20))
        colour = tuple(int(c) for c in rng.integers(0, 255, 3))
        if rng.random() < 0.5:
            cv2.rectangle(im, (x, y), (x + int(rng.integers(8, 40)), y + 20), colour, -1)
        else:
            cv2.circle(im, (x, y), int(rng.integers(4, 18)), colour, -1)
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(im).save(folder / "original.png")
    Image.fromarray(cv2.warpPerspective(im, WARP, (w, h))).save(folder / "warped.png")


def index_record(state: Path, name: str) -> dict | None:
    """The catalog's record of index `name` in a test's state folder (`opts(state)`)."""
    db = catalog.open_reader(state / "c.db")
    try:
        return reads.index_record(db, name)
    finally:
        db.conn.close()


def snapshot(cat: Path) -> dict[str, tuple]:
    """path -> (status, label, sha256, size, mtime, error, vector or None): what a user owns."""
    db = catalog.open_reader(cat)
    dim, committed = reads.dimension(db), reads.next_id(db)
    rows = vectors.open_rows(vectors.vectors_path(cat), dim, committed) if dim else None
    out = {}
    for r in db.query("select * from images where id < ?", [committed]):
        vec = np.array(rows[r["id"]]) if r["status"] == "indexed" else None
        out[r["path"]] = (
            r["status"], r["label"], r["sha256"], r["size"], r["mtime"], r["error"], vec,
        )  # fmt: skip
    db.conn.close()
    return out


def assert_same(got: dict[str, tuple], want: dict[str, tuple], where: str) -> None:
    assert sorted(got) == sorted(want), f"{where}: different images"
    for path, row in want.items():
        assert got[path][:6] == row[:6], f"{where}: {path} differs"
        if row[6] is None:
            assert got[path][6] is None, f"{where}: {path} has a vector"
        else:
            np.testing.assert_allclose(got[path][6], row[6], atol=1e-5, err_msg=where)


# --- the CLI in-process, for tests ----------------------------------------------------------


def run_child(args: list, env: dict[str, str] | None = None):
    """`python tests/fakes.py ARGS` (cbir with the fake model) in a child process, with
    extra environment (CBIR_CRASH_AFTER, ...); its CompletedProcess."""
    import subprocess

    return subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), *map(str, args)],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=120,
    )


def cli(*args):
    """`cbir ARGS` in this process (Click's runner); every argument is str()-ed."""
    from click.testing import CliRunner

    from pipeline.cli import main

    return CliRunner().invoke(main, [str(a) for a in args])


def opts(state: Path) -> list[str]:
    """The catalog and index folder of a test's state folder."""
    return ["--catalog", str(state / "c.db"), "--index-dir", str(state / "idx")]


def ok(r, where: str = "") -> str:
    assert r.exit_code == 0, f"{where}: {r.output}"
    return r.output


def one_line_error(r, code: int) -> str:
    """The one `cbir: error:` line of a refused command, which exited with `code`."""
    assert r.exit_code == code, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cbir: error: "), r.output
    assert "Traceback" not in r.output
    return lines[0]


def assert_refused(result, *words: str) -> None:
    """Exit 2, exactly one line on stderr, `cbir: error: ...` naming `words`, no traceback."""
    lines = result.stderr.splitlines()
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert len(lines) == 1 and lines[0].startswith("cbir: error: "), result.stderr
    assert "Traceback" not in result.output
    for w in words:
        assert w in lines[0], (w, lines[0])


if __name__ == "__main__":
    install(float(os.environ.get("FAKE_MODEL_DELAY", "0")), os.environ.get("FAKE_MODEL_LOG"))
    from pipeline.cli import main

    main()


# --- a server started the way the README starts it (appended) -------------------------------

from contextlib import contextmanager  # noqa: E402


@contextmanager
def served(cwd: Path, log: Path, *args: str, cbir: list[str] | None = None, timeout: float = 120):
    """`cbir serve --port 0 ARGS` started in `cwd`, as `cd coll && cbir serve` starts it (the
    default, relative catalog); yields its URL, and stops it at the end. `cbir`: the command
    (default: this file, cbir with the fake model). The server's stderr goes to `log`."""
    import re
    import subprocess

    command = cbir or [sys.executable, str(Path(__file__).resolve())]
    with log.open("w") as err:  # a file, not a pipe: a full pipe would block the server
        proc = subprocess.Popen(
            [*command, "serve", "--port", "0", *args],
            cwd=cwd,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    try:
        deadline, url = time.monotonic() + timeout, None
        while url is None and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
            found = re.search(r"serving on (http://127\.0\.0\.1:\d+)/", log.read_text())
            url = found.group(1) if found else None
        assert url, f"the server did not start: {log.read_text()}"
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


# --- a fresh process per call, forked from a preloaded server (the corruption matrix) -------

_FRESH = None


def _fresh_child(conn, fn, args) -> None:
    import traceback

    try:
        value = ("ok", fn(*args))
    except BaseException:  # reported to the caller, which judges it (never swallowed)
        value = ("raised", traceback.format_exc())
    conn.send(value)
    conn.close()


def in_fresh_process(fn, *args, timeout: float = 120.0, preload: tuple[str, ...] = ()):
    """fn(*args) in a new process forked from a server that imported cbir once.

    Each call is a fresh process (a first load, no state shared with the caller, and
    a crash or a hang cannot take the test run down) that starts in milliseconds.
    `fn` must be a module-level function; `preload` names modules the server imports
    once (the first call fixes them). Returns (("ok", value) or ("raised", traceback)
    or None if the process died, its exit code (minus the signal that killed it),
    whether it was killed after `timeout` seconds).
    """
    import multiprocessing

    global _FRESH
    if _FRESH is None:
        _FRESH = multiprocessing.get_context("forkserver")
        _FRESH.set_forkserver_preload(["fakes", "pipeline.cli", "pipeline.web.server", *preload])
    receive, send = _FRESH.Pipe(duplex=False)
    proc = _FRESH.Process(target=_fresh_child, args=(send, fn, args))
    proc.start()
    send.close()
    value, timed_out = None, False
    if receive.poll(timeout):
        try:
            value = receive.recv()
        except EOFError:  # died without an answer (a signal, os._exit)
            value = None
    else:
        timed_out = True
        proc.kill()
    proc.join()
    receive.close()
    return value, proc.exitcode, timed_out


# --- writing a catalog behind cbir's back (appended) ----------------------------------------


def reseal(path: Path) -> None:
    """Record the checksum of every catalog row as it is now, as cbir's writers do: for a
    test that changes rows behind cbir's back to make an older cbir's catalog."""
    import sqlite3

    con = sqlite3.connect(path)
    con.create_function("cbir_row_crc", -1, seals.row_crc, deterministic=True)
    with con:
        for table in schema.SEALED:
            con.execute(f"update {table} set row_crc = {schema.crc_sql(table)}")
    con.close()


def as_schema_4(path: Path) -> None:
    """Make a catalog what cbir schema 4 wrote: no index digests, no row checksums."""
    import sqlite3

    con = sqlite3.connect(path)
    with con:
        con.execute("alter table indexes drop column digest")
        con.execute("alter table indexes drop column data_digest")
        for table in schema.SEALED:
            con.execute(f"alter table {table} drop column row_crc")
        con.execute("drop index idx_images_undated")  # schema 6's, and its columns
        for column in schema.IMAGE_COLUMNS[len(schema.IMAGE_COLUMNS_5) :]:
            con.execute(f"alter table images drop column {column}")
        con.execute("update meta set value = '4' where key = 'schema_version'")
    con.execute("pragma wal_checkpoint(truncate)")
    con.close()


def as_schema_5(path: Path) -> None:
    """Make a catalog what cbir schema 5 wrote: no image dates, rows sealed over schema 5's
    columns (a row that failed its checksum before still fails it)."""
    import sqlite3

    con = sqlite3.connect(path)
    con.create_function("cbir_row_crc", -1, seals.row_crc, deterministic=True)
    v5 = schema.crc_sql("images", schema.IMAGE_COLUMNS_5)
    with con:
        con.execute(f"update images set row_crc = {v5} where row_crc is {schema.crc_sql('images')}")
        con.execute("drop index idx_images_undated")
        for column in schema.IMAGE_COLUMNS[len(schema.IMAGE_COLUMNS_5) :]:
            con.execute(f"alter table images drop column {column}")
        con.execute("update meta set value = '5' where key = 'schema_version'")
        con.execute(
            f"update meta set row_crc = {schema.crc_sql('meta')} where key = 'schema_version'"
        )
    con.execute("pragma wal_checkpoint(truncate)")
    con.close()
