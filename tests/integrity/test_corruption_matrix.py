"""The corruption matrix (issue 17): never a different answer with exit 0.

For every file kind cbir reads, every damage and every command that reads that
kind, the command either gives exactly the answer it gives on the undamaged
collection (same ids, paths, labels, scores to 1e-5; the same catalog state
for `index`; the same figures for `evaluate`) or exits non-zero with exactly
one `cbir: error:` line on stderr (the web route: a non-200 status with one
line of JSON, or a one-line refusal to start). Never a traceback, a crash, a
hang, or "a bug". `verify` must exit non-zero on every damaged file it checks.

Two more outcomes pass, each where the project's rules allow it:

- **A damaged vector row is treated as missing by searches** (issue 17, item 2:
  the `vectors` cells of every search, re-ranking, feedback, web and
  `duplicates` command):
  exit 0 with exactly one line on stderr that mentions `verify --repair`, and
  the answer the undamaged collection gives without the damaged ids (those
  whose row no longer matches its recorded CRC-32). That reference is the
  undamaged command asked for k + (number of damaged ids) results, the damaged
  ids removed, cut to k, same order and scores; for re-ranking and feedback,
  whose shortlist and neighbours a missing row changes, it is the command run
  on a damaged copy that `cbir verify --repair` repaired; for `duplicates`,
  whose groups any row can change, it is the command run on the undamaged
  collection with the damaged ids left out of the ids it may use (`without_ids`;
  a repaired copy would leave its IVF index stale). (`evaluate` gets no
  such pass: a figure over fewer images is a wrong answer, so it refuses.)
- **User-written input files** (config, label, manifest and ground-truth
  CSVs) carry no checksum: damage that leaves a valid file of its kind cannot
  be told from what the user meant. Such a cell also passes with exit 0 and
  exactly one `warning:` line on stderr naming the damaged file (it must be
  reported, whatever the answer).

One small collection (40 fake-model images in 4 colour classes, labels from a
CSV, a ground-truth CSV, a manifest, a config file, an exact, an IVF, an HNSW,
an on-disk IVF (`--shards 2`) and a whitened index built from a whitening
file) is built once per module and kept as a snapshot. Each cell restores the
snapshot into the same folder (recorded absolute paths stay true), damages
one file and runs one command in a fresh process (`fakes.in_fresh_process`:
a first load, and a crash cannot take the run down). Reference answers come
from the same command on the undamaged snapshot.

Damage is aimed at the part of each file that matters: the vector row of the
query id (in the vector file and in every index file that stores it verbatim:
exact, IVF lists, HNSW storage, `.ivfdata`), the table of inverted lists of an
on-disk `.faiss` (size, capacity, offset per list; the bit flipped is in the
offset of the query's list), the projection matrix of the whitened index and
of the whitening file, the SQLite page and the bytes of the query image's row
(its path) in the catalog, and the middle of text files. A flipped bit is an
exponent bit of a float in other binary files, and bit 7 of a byte in text
files (a user's text file has no checksum, so only damage that leaves it
invalid can be noticed at all). Truncation keeps the first half of any file.

The fast tier (`-m 'not slow'`) runs every (file kind, command) pair once, the
damage rotating so that every kind meets every damage (112 of the cells); the
whole matrix runs in the full suite, as in CI.

Set CBIR_MATRIX_LOG=FILE to append every cell's outcome as a JSON line.

Cells left out because the command does not read that file kind are listed in
`NOT_READ` below.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import re
import shutil
import sqlite3
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import fakes

Q_INDEX = 20  # the query's position among the indexed ids: the middle of the vector rows
DIM = 2048
ROW = DIM * 4
CONFIG = "k = 7\nshortlist = 30\nrerank_n = 4\nrerank_alpha = 2.0\n"  # half cuts a key
K = 7  # the config's k
APPROX = ("ivf", "hnsw", "ondisk", "white")
DAMAGES = ("truncate", "zero", "random", "bitflip")

SEARCHES = ("search-id", "search-image", *(f"search-{n}" for n in APPROX), "rerank", "feedback")
EVALS = ("eval-loo", "eval-gt", "eval-queries")
BUILDS = tuple(f"build-{n}" for n in APPROX)
WEB = ("web-exact", *(f"web-{n}" for n in APPROX))
# `cbir duplicates --json` by exact range search over the vector file, and with an IVF index.
DUPLICATES = ("duplicates", "duplicates-ivf")
# Thresholds that cut the 4 colour classes (fake model) into groups of a few images,
# the query among them (defaults are measured on the real model and would join classes).
DUP_THRESHOLDS = ("--near", "0.99", "--similar", "0.97")
EVERY = (*SEARCHES, *EVALS, *BUILDS, "index", "index-manifest", "verify", *WEB, *DUPLICATES)

# Which commands read each file kind (the others are meaningless cells: NOT_READ).
EXACT_READERS = (
    "search-id", "search-image", "rerank", "feedback", *EVALS, "verify", "web-exact",
)  # fmt: skip
READERS: dict[str, tuple[str, ...]] = {
    "catalog": EVERY,
    "vectors": EVERY,
    "config": EVERY,
    "exact": EXACT_READERS,
    **{
        kind: (f"search-{n}", f"build-{n}", "verify", f"web-{n}")
        + (("duplicates-ivf",) if n == "ivf" else ())
        for kind, n in (
            ("ivf", "ivf"),
            ("hnsw", "hnsw"),
            ("ondisk-faiss", "ondisk"),
            ("ondisk-ivfdata", "ondisk"),
            ("white", "white"),
        )
    },
    # The whitened index holds its transform; the file is read again by a rebuild
    # (its record names it), and verify is to check its recorded digest (issue 17, 4).
    "whitening": ("build-white", "verify"),
    "labels": ("index",),
    "manifest": ("index-manifest", "eval-queries"),
    # The whitened index was validated on it: a rebuild reads it again.
    "groundtruth": ("eval-gt", "build-white"),
}
NOT_READ = {kind: tuple(c for c in EVERY if c not in cmds) for kind, cmds in READERS.items()}
# Commands that may answer without a damaged vector row (with one notice), and those of
# them whose reference is a repaired copy (their shortlist re-ranking depends on every row).
ABSENT_OK = (*SEARCHES, *WEB, *DUPLICATES)
REPAIRED_REFERENCE = ("rerank", "feedback")
USER_FILES = ("config", "labels", "manifest", "groundtruth")
CELLS = [(k, d, c) for k in READERS for d in DAMAGES for c in READERS[k]]


def _tier(kind: str, how: str, command: str) -> tuple:
    """The fast tier runs a quarter of the cells: every (file kind, command) pair once,
    with the damage rotating, so each kind meets every damage; the slow tier the rest."""
    kinds, commands = list(READERS), list(EVERY)
    turn = (kinds.index(kind) + commands.index(command)) % len(DAMAGES)
    return () if DAMAGES.index(how) == turn else (pytest.mark.slow,)


PARAMS = [pytest.param(k, d, c, id=f"{k}-{d}-{c}", marks=_tier(k, d, c)) for k, d, c in CELLS]


# --- the collection ------------------------------------------------------------------------


def make_images(folder: Path, n: int, seed: int, classes: int = 4) -> list[Path]:
    """n small JPEGs under folder/c<class>/, each class near its own colour (so mAP,
    whitening validation and ground truth mean something with the fake model)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    bases = np.random.default_rng(99).integers(30, 226, (classes, 3))
    out = []
    for i in range(n):
        c = i % classes
        sub = folder / f"c{c}"
        sub.mkdir(parents=True, exist_ok=True)
        jitter = rng.integers(-40, 40, 3) + rng.integers(-30, 30, (48, 48, 3))
        pixels = np.clip(bases[c] + jitter, 0, 255).astype(np.uint8)
        path = sub / f"s{seed}_{i:03d}.jpg"
        Image.fromarray(pixels).save(path, quality=90)
        out.append(path)
    return out


def label_of(path: Path) -> str:
    return "class-" + path.parent.name


def _run_ok(*args: Any) -> str:
    r = fakes.cli(*args)
    assert r.exit_code == 0, (args, r.output)
    return r.stdout


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Any]:
    """The collection built once in `live`, copied to `snap`; what the commands need."""
    from pipeline import api

    base = tmp_path_factory.mktemp("matrix")
    imgs = make_images(base / "imgs", 40, seed=0)
    extra = make_images(base / "extra", 1, seed=5)
    queries = make_images(base / "queries", 4, seed=7)
    live = base / "live"
    live.mkdir()
    w: dict[str, Any] = {
        "base": str(base),
        "live": str(live),
        "snap": str(base / "snap"),
        "imgs": str(base / "imgs"),
        "extra": str(base / "extra"),
        "catalog": str(live / "catalog.db"),
        "index_dir": str(live / "index"),
        "config": str(live / "cbir.toml"),
        "labels": str(live / "labels.csv"),
        "manifest": str(live / "manifest.csv"),
        "groundtruth": str(live / "groundtruth.csv"),
        "whitening": str(live / "white.pca"),
    }
    Path(w["config"]).write_text(CONFIG)
    with open(w["labels"], "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["path", "label"])
        out.writerows([str(p), label_of(p)] for p in imgs + extra)
    with open(w["manifest"], "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["path", "label", "split"])
        out.writerows([str(p), label_of(p), "database"] for p in imgs + extra)
        out.writerows([str(p), label_of(p), "query"] for p in queries)
    with open(w["groundtruth"], "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["query", "relevant"])
        for q in range(0, 40, 3):  # 14 queries, each with 5 images of its class
            out.writerows([imgs[q].name, imgs[(q + 4 * j) % 40].name] for j in range(1, 6))

    mp = pytest.MonkeyPatch()
    mp.setattr(api.models, "cached_embedder", fakes.cached)
    try:
        opts = common(w)
        _run_ok("index", w["imgs"], "--labels", w["labels"], *opts)
        _run_ok("build-index", "ivf", "--factory", "IVF4,Flat", *opts)
        _run_ok("build-index", "hnsw", "--factory", "HNSW8", *opts)
        _run_ok("build-index", "ondisk", "--factory", "IVF4,Flat", "--shards", "2", *opts)
        learned = ["--whiten", "--whiten-dim", "4", "--validate", w["groundtruth"]]
        learned += ["--save-whitening", w["whitening"]]
        _run_ok("build-index", "white0", *learned, *opts)
        _run_ok(
            "build-index", "white", "--whitening", w["whitening"],
            "--validate", w["groundtruth"], *opts,
        )  # fmt: skip
    finally:
        mp.undo()
    con = sqlite3.connect(w["catalog"])
    con.execute("pragma wal_checkpoint(truncate)")  # everything in catalog.db itself
    ids = [r[0] for r in con.execute("select id from images where status='indexed' order by id")]
    w["q"] = ids[Q_INDEX]
    w["query_path"] = con.execute("select path from images where id=?", [w["q"]]).fetchone()[0]
    w["relevant"] = ids[Q_INDEX + 4]  # the same class
    files = dict(con.execute("select name, file from indexes"))
    con.close()
    index_dir = Path(w["index_dir"])
    w["files"] = {
        "exact": str(index_dir / files["exact"]),
        "ivf": str(index_dir / files["ivf"]),
        "hnsw": str(index_dir / files["hnsw"]),
        "ondisk-faiss": str(index_dir / files["ondisk"]),
        "ondisk-ivfdata": str((index_dir / files["ondisk"]).with_suffix(".ivfdata")),
        "white": str(index_dir / files["white"]),
    }
    assert all(Path(p).is_file() for p in w["files"].values()), w["files"]
    shutil.copytree(live, w["snap"], symlinks=True)
    return w


def restore(w: dict[str, Any]) -> None:
    """The live folder as the snapshot left it."""
    shutil.rmtree(w["live"])
    shutil.copytree(w["snap"], w["live"], symlinks=True)


def common(w: dict[str, Any]) -> list[str]:
    return ["--config", w["config"], "--catalog", w["catalog"], "--index-dir", w["index_dir"]]


# --- damage --------------------------------------------------------------------------------


def file_of(w: dict[str, Any], kind: str) -> Path:
    if kind == "vectors":
        return Path(w["catalog"]).with_suffix(".vectors")
    if kind in w["files"]:
        return Path(w["files"][kind])
    return Path(w[kind])


def target(w: dict[str, Any], kind: str, data: bytes) -> tuple[int, int, int, int]:
    """(start, length) of the range that matters in `data`, (offset, mask) of the bit to flip."""
    if kind == "vectors":
        start = w["q"] * ROW
        return start, 2 * ROW, start + 4 * 1000 + 3, 0x40
    if kind == "catalog":
        return _catalog_target(w, data)
    if kind in ("config", "labels", "manifest", "groundtruth"):
        mid = len(data) // 2
        return mid - 8, 16, mid, 0x80
    if kind == "ondisk-faiss":
        return _ondisk_lists(w, data)
    if kind in ("white", "whitening"):  # the projection every query goes through
        at, length = _projection(file_of(w, kind), kind, data)
        return at, length, at + length // 2 // 4 * 4 + 3, 0x40
    # Index files: the query's own vector where the file stores it verbatim.
    row = Path(w["snap"], "catalog.vectors").read_bytes()[w["q"] * ROW : (w["q"] + 1) * ROW]
    at = data.find(row)
    if at >= 0:
        return at, ROW, at + 4 * 1000 + 3, 0x40
    third = len(data) // 3
    return third, third, (len(data) // 2) // 4 * 4 + 3, 0x40


def _ondisk_lists(w: dict[str, Any], data: bytes) -> tuple[int, int, int, int]:
    """An on-disk index's list table (size, capacity, offset per list, at the end of the
    .faiss), and bit 3 of the offset of the query's list (its entries read 8 bytes off)."""
    import faiss

    path = file_of(w, "ondisk-faiss")
    flags = faiss.IO_FLAG_ONDISK_SAME_DIR | faiss.IO_FLAG_READ_ONLY
    index = faiss.read_index(str(path), flags)
    ivf = faiss.extract_index_ivf(index)
    row = np.fromfile(Path(w["snap"], "catalog.vectors"), np.float32, DIM, offset=w["q"] * ROW)
    list_no = int(ivf.quantizer.assign(row.reshape(1, -1), 1)[0][0])
    table = data.rfind(b"ilod") + 4 + 8 + 8 + 8  # fourcc, nlist, code_size, vector length
    size = 3 * 8 * ivf.nlist
    return table, size, table + 24 * list_no + 16, 0x08


def _projection(path: Path, kind: str, data: bytes) -> tuple[int, int]:
    """Where the whitening's projection matrix A lies in a whitened index or whitening file
    (most of either file is the PCA's unused full eigenvector matrix)."""
    import faiss

    if kind == "white":
        index = faiss.read_index(str(path))  # kept alive: it owns the transform
        transform = faiss.downcast_VectorTransform(index.chain.at(0))
    else:
        transform = faiss.read_VectorTransform(str(path))
    a = faiss.vector_to_array(transform.A).astype(np.float32).tobytes()
    at = data.find(a)
    assert at >= 0, f"the projection of {path} is not stored verbatim"
    return at, len(a)


def _catalog_target(w: dict[str, Any], data: bytes) -> tuple[int, int, int, int]:
    """The images-table page holding the query's row, and a bit of its file name's last digit."""
    con = sqlite3.connect(file_of(w, "catalog"))
    page_size = con.execute("pragma page_size").fetchone()[0]
    table_pages = {
        p
        for (p,) in con.execute("select pageno from dbstat where name='images' and pagetype='leaf'")
    }
    con.close()
    needle = w["query_path"].encode()
    at = data.find(needle)
    while at >= 0 and at // page_size + 1 not in table_pages:
        at = data.find(needle, at + 1)
    assert at >= 0, "the query's row is not in an images page"
    page = at // page_size
    digit = at + len(needle) - len(".jpg") - 1
    return page * page_size, page_size, digit, 0x01


def damage(w: dict[str, Any], kind: str, how: str, seed: int) -> None:
    path = file_of(w, kind)
    data = bytearray(path.read_bytes())
    start, length, flip_at, mask = target(w, kind, bytes(data))
    if how == "truncate":
        data = data[: len(data) // 2]
    elif how == "zero":
        data[start : start + length] = bytes(length)
    elif how == "random":
        rng = np.random.default_rng(seed)
        data[start : start + length] = rng.integers(0, 256, length, dtype=np.uint8).tobytes()
    else:
        data[flip_at] ^= mask
    path.write_bytes(bytes(data))


def damaged_ids(w: dict[str, Any]) -> list[int]:
    """Indexed ids whose vector row is past the end or fails its recorded CRC-32."""
    con = sqlite3.connect(w["catalog"])
    crcs = dict(con.execute("select id, vector_crc from images where status = 'indexed'"))
    con.close()
    data = file_of(w, "vectors").read_bytes()
    return sorted(
        i
        for i, c in crcs.items()
        if (i + 1) * ROW > len(data) or zlib.crc32(data[i * ROW : (i + 1) * ROW]) != c
    )


def stored(w: dict[str, Any]) -> tuple[str, list]:
    """The vector file's sha256 and the catalog's images rows: what a refusal must keep."""
    import hashlib

    con = sqlite3.connect(w["catalog"])
    rows = con.execute("select * from images order by id").fetchall()
    con.close()
    return hashlib.sha256(file_of(w, "vectors").read_bytes()).hexdigest(), rows


# --- the commands, run in a fresh process ----------------------------------------------------


def _cli(w: dict[str, Any], *args: Any) -> dict[str, Any]:
    import traceback

    r = fakes.cli(*args, *common(w))
    exc = None
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        exc = "".join(traceback.format_exception(r.exception))
    return {"exit": r.exit_code, "out": r.stdout, "err": r.stderr, "exc": exc}


def _results(stdout: str) -> list[list[tuple]]:
    """Each JSON line's results as (id, path, label, score)."""
    lines = [json.loads(line) for line in stdout.splitlines() if line.strip()]
    return [[(r["id"], r["path"], r["label"], r["score"]) for r in a["results"]] for a in lines]


def _figures(stdout: str) -> list[float]:
    """The recall and mAP figures a build prints (its timings and sizes are left out)."""
    return [float(x) for x in re.findall(r"(?:recall@10|mAP) ([0-9.]+)", stdout)]


def _state(w: dict[str, Any]) -> dict[str, tuple]:
    """What the catalog holds, path by path (fakes.snapshot), vectors as lists."""
    return {
        p: (*row[:6], None if row[6] is None else row[6].tolist())
        for p, row in fakes.snapshot(Path(w["catalog"])).items()
    }


class _Lines(logging.Handler):
    """The server's notices (logger 'cbir'), as `cbir serve` prints them on stderr."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []
        self.setFormatter(logging.Formatter("cbir: %(levelname)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


def _web(w: dict[str, Any], index: str, k: int | None = None) -> dict[str, Any]:
    import traceback

    from pipeline import api, errors
    from pipeline.errors import CbirError
    from pipeline.web import server as serve

    notices = _Lines()
    logging.getLogger("cbir").addHandler(notices)
    try:  # what `cbir serve` does before serving, under the same one-line guard
        settings = api.settings_for(
            config=w["config"], catalog=w["catalog"], index_dir=w["index_dir"]
        )
        app = serve.open_app(settings, thumbs_dir=Path(w["base"], "thumbs"))
    except CbirError as e:  # the server refuses to start: one line
        return {"exit": e.exit_code or 1, "out": "", "err": f"cbir: error: {e}\n", "exc": None}
    except Exception as e:
        known = errors.describe(e)
        if known:
            return {"exit": 1, "out": "", "err": f"cbir: error: {known}\n", "exc": None}
        return {"exit": 1, "out": "", "err": "", "exc": traceback.format_exc()}
    body: dict[str, Any] = {"id": w["q"]}
    if index != "exact":
        body["index"] = index
    if k is not None:
        body["k"] = k
    r = app.test_client().post("/api/search", json=body)
    text = r.get_data(as_text=True)
    if r.status_code == 200:
        answer = [[(x["id"], x["path"], x["label"], x["score"]) for x in r.get_json()["results"]]]
        err = "".join(line + "\n" for line in notices.lines)
        return {"exit": 0, "out": text, "err": err, "exc": None, "answer": answer}
    try:
        message = json.loads(text)["error"]
    except (ValueError, KeyError, TypeError):
        message = text  # not the one-line JSON error: judged on its lines
    return {"exit": r.status_code, "out": "", "err": f"cbir: error: {message}\n", "exc": None}


def run_command(w: dict[str, Any], command: str, k: int | None = None) -> dict[str, Any]:
    """Run one command of the matrix on the live folder; its outcome and answer (if exit 0).
    `k` asks a search for that many results instead of the config's."""
    fakes.install()
    q, name = w["q"], command.split("-", 1)[-1]
    if command.startswith("web-"):
        return _web(w, name, k)
    deeper = ["-k", k] if k is not None else []
    if command == "search-id":
        r = _cli(w, "search", "--id", q, "--json", *deeper)
    elif command == "search-image":
        r = _cli(w, "search", w["query_path"], "--json", *deeper)
    elif command.startswith("search-"):
        r = _cli(w, "search", "--id", q, "--index", name, "--json", *deeper)
    elif command == "rerank":
        r = _cli(w, "search", "--id", q, "--rerank", "dba+aqe", "--json", *deeper)
    elif command == "feedback":
        r = _cli(w, "search", "--id", q, "--relevant", w["relevant"], "--json", *deeper)
    elif command == "eval-loo":
        r = _cli(w, "evaluate", "--leave-one-out", "--json")
    elif command == "eval-gt":
        r = _cli(w, "evaluate", "--groundtruth", w["groundtruth"], "--json")
    elif command == "eval-queries":
        r = _cli(w, "evaluate", w["manifest"], "--json")
    elif command.startswith("build-"):
        r = _cli(w, "build-index", name)
        if r["exit"] == 0:
            then = _cli(w, "search", "--id", q, "--index", name, "--json")
            found = _results(then["out"]) if then["exit"] == 0 else then["err"].strip()
            r["answer"] = {"figures": _figures(r["out"]), "search": found}
        return r
    elif command == "index":
        r = _cli(w, "index", w["imgs"], w["extra"], "--labels", w["labels"])
        if r["exit"] == 0:
            r["answer"] = _state(w)
        return r
    elif command == "index-manifest":
        r = _cli(w, "index", w["manifest"], "--split", "database")
        if r["exit"] == 0:
            r["answer"] = _state(w)
        return r
    elif command == "verify":
        return _cli(w, "verify")
    elif command in DUPLICATES:
        index = ["--index", "ivf"] if command == "duplicates-ivf" else []
        r = _cli(
            w, "duplicates", "--include", "exact,near,similar", *DUP_THRESHOLDS, *index, "--json"
        )
    else:
        raise ValueError(command)
    if r["exit"] == 0:
        whole = command.startswith("eval") or command in DUPLICATES
        r["answer"] = json.loads(r["out"]) if whole else _results(r["out"])
    return r


def outcome(w: dict[str, Any], command: str, k: int | None = None) -> dict[str, Any]:
    """run_command in a fresh process; a crash, hang or escaped exception as `exc`."""
    value, code, timed_out = fakes.in_fresh_process(
        run_command, w, command, k, timeout=90, preload=(__name__,)
    )
    if timed_out:
        return {"exit": None, "exc": "HANG: killed after 90 s"}
    if value is None:
        return {"exit": code, "exc": f"CRASH: the process died (exit {code})"}
    if value[0] == "raised":
        return {"exit": None, "exc": value[1]}
    return value[1]


# --- judging -------------------------------------------------------------------------------


def difference(got: Any, want: Any, where: str = "") -> str | None:
    """Where got differs from want (floats to 1e-5), or None."""
    if isinstance(want, float) or isinstance(got, float):
        ok = (
            isinstance(got, (int, float))
            and isinstance(want, (int, float))
            and (math.isclose(got, want, abs_tol=1e-5) or (math.isnan(got) and math.isnan(want)))
        )
        return None if ok else f"{where}: {got!r} != {want!r}"
    if isinstance(want, dict):
        if not isinstance(got, dict) or sorted(got) != sorted(want):
            return f"{where}: keys {sorted(got) if isinstance(got, dict) else got!r:.200}"
        for k in want:
            d = difference(got[k], want[k], f"{where}.{k}")
            if d:
                return d
        return None
    if isinstance(want, (list, tuple)):
        if not isinstance(got, (list, tuple)) or len(got) != len(want):
            return f"{where}: length {len(got) if isinstance(got, (list, tuple)) else got!r}"
        for i, (a, b) in enumerate(zip(got, want, strict=True)):
            d = difference(a, b, f"{where}[{i}]")
            if d:
                return d
        return None
    return None if got == want else f"{where}: {got!r:.120} != {want!r:.120}"


def verdict(
    got: dict[str, Any],
    want: dict[str, Any],
    kind: str,
    command: str,
    without: Callable[[], Any] | None = None,
) -> str | None:
    """Why a cell fails, or None: the undamaged answer, or non-zero with one clean line;
    or the two passes of the module's docstring: the answer `without()` the damaged vector
    rows with one `verify --repair` notice, or one warning naming a damaged user file."""
    if got.get("exc"):
        lines = got["exc"].strip().splitlines()
        kind = "CRASH/HANG" if got["exc"].startswith(("CRASH", "HANG")) else "TRACEBACK"
        return f"{kind}: {lines[-1]}"
    out, err = got.get("out", ""), got.get("err", "")
    if "Traceback" in out + err:
        return f"TRACEBACK printed (exit {got['exit']})"
    lines = err.strip().splitlines()
    if command == "verify":
        exact_noted = kind == "exact" and re.search(r"^note: .*\bexact\b", out, re.M)
        if got["exit"] == 0 and not exact_noted:  # the exact index is rebuilt when damaged
            return "UNDETECTED: verify exits 0 on a damaged file"
        if len(lines) > 1:
            return f"LINES: verify printed {len(lines)} lines on stderr: {lines[0][:120]}"
        if any("(a bug" in line for line in lines):
            return f"BUG: {lines[0][:160]}"
        return None
    if got["exit"] == 0:
        d = difference(got.get("answer"), want.get("answer"), "answer")
        if d is None:
            return None
        line = lines[0] if len(lines) == 1 else ""
        named = got.get("named")
        if kind in USER_FILES and "warning:" in line.lower() and named and named in line:
            return None  # reported: the user can tell it from what they meant
        if kind == "vectors" and command in ABSENT_OK and without and "verify --repair" in line:
            d = difference(got.get("answer"), without(), "answer without the damaged rows")
            if d is None:
                return None
        said = f"; stderr: {lines[-1][:120]}" if lines else " silently"
        return f"WRONG (exit 0){said}; {d}"
    if len(lines) != 1 or not lines[0].startswith("cbir: error: "):
        first = lines[0][:120] if lines else "(nothing)"
        return f"LINES: exit {got['exit']} with {len(lines)} stderr lines: {first}"
    if "(a bug" in lines[0] or "internal error (" in lines[0]:
        return f"BUG: {lines[0][:160]}"
    return None


@pytest.fixture(scope="module")
def reference(world) -> Callable[..., dict[str, Any]]:
    """Each command's outcome on the undamaged collection (asked for `k` results when
    given), computed when first needed."""
    cache: dict[tuple[str, int | None], dict[str, Any]] = {}

    def get(command: str, k: int | None = None) -> dict[str, Any]:
        if (command, k) not in cache:
            restore(world)
            got = outcome(world, command, k)
            assert got.get("exc") is None and got["exit"] == 0, (command, got)
            if command != "verify":
                assert got.get("answer"), (command, got)
            cache[command, k] = got
        return cache[command, k]

    return get


def answer_without(w: dict[str, Any], reference, command: str, bad: list[int], redo) -> Any:
    """The undamaged answer of a search as if the ids `bad` were not indexed (docstring).

    `redo()` damages the live folder again, for the repaired-copy reference."""
    if command in DUPLICATES:
        restore(w)
        value, code, timed_out = fakes.in_fresh_process(
            without_ids, w, command, bad, timeout=90, preload=(__name__,)
        )
        assert value and value[0] == "ok" and value[1]["exit"] == 0, (command, code, value)
        return value[1]["answer"]
    if command in REPAIRED_REFERENCE:
        restore(w)
        redo()
        r = fakes.cli("verify", "--repair", *common(w))
        assert "dropped" in r.output, r.output  # the damaged rows are gone: the reference
        got = outcome(w, command)
        if got["exit"] != 0 or got.get("exc"):  # no answer to match: the cell fails
            return f"(the repaired copy answers no: {got.get('err') or got.get('exc')})"
        return got["answer"]
    deeper = reference(command, K + len(bad))["answer"]
    return [[r for r in answer if r[0] not in bad][:K] for answer in deeper]


def without_ids(w: dict[str, Any], command: str, bad: list[int]) -> dict[str, Any]:
    """run_command on the undamaged collection as if the ids `bad` were not indexed (their
    rows left out of what a full scan may use): the reference of `duplicates`, whose
    groups any row can change. Run in a fresh process (the patch dies with it)."""
    from pipeline.store.collection import Collection

    usable = Collection.usable_ids
    Collection.usable_ids = lambda self: np.setdiff1d(usable(self), bad)  # type: ignore[method-assign]
    return run_command(w, command)


def test_config_half_cut_lands_inside_a_key():
    """The truncation cell of the config means damage, not a shorter valid file."""
    import tomllib

    with pytest.raises(tomllib.TOMLDecodeError):
        tomllib.loads(CONFIG[: len(CONFIG.encode()) // 2])


@pytest.mark.parametrize("command", DUPLICATES)
def test_duplicates_reference_groups_the_query(world, reference, command):
    """The damaged-row cells of `duplicates` mean something: undamaged, the query (whose
    row they damage) is in a group, and there are groups of more than one kind."""
    answer = reference(command)["answer"]
    grouped = [im["id"] for g in answer["groups"] for im in g["images"]]
    assert world["q"] in grouped and len(grouped) > 4, answer["groups"]
    assert {g["kind"] for g in answer["groups"]} >= {"near", "similar"}
    if command == "duplicates-ivf":
        assert answer["index"] == "ivf" and answer["pair_recall"] is not None


@pytest.mark.parametrize("kind,how,command", PARAMS)
def test_cell(world, reference, kind, how, command):
    want = reference(command)
    restore(world)
    seed = zlib.crc32(f"{kind}-{how}".encode())
    damage(world, kind, how, seed)
    bad = damaged_ids(world) if kind == "vectors" else []
    before = stored(world) if kind == "vectors" else None
    got = outcome(world, command)
    if before is not None and got["exit"] != 0 and not got.get("exc"):
        # A refusal touches nothing: a writer that "repaired" a damaged vector file
        # before refusing would lose what was indexed.
        assert stored(world) == before, f"{kind} {how}, {command}: refused, but changed files"
    if kind in USER_FILES:
        got["named"] = file_of(world, kind).name
    without = None
    if bad:

        def without() -> Any:
            return answer_without(
                world, reference, command, bad, lambda: damage(world, kind, how, seed)
            )

    why = verdict(got, want, kind, command, without)
    if os.environ.get("CBIR_MATRIX_LOG"):  # every cell's outcome, for the closing note
        with open(os.environ["CBIR_MATRIX_LOG"], "a") as f:
            err = (got.get("err") or got.get("exc") or "").strip().splitlines()
            cell = f"{kind}-{how}-{command}"
            print(json.dumps([cell, got["exit"], why, err[-1][:200] if err else ""]), file=f)
    assert why is None, f"{kind} {how}, {command}: {why}"
