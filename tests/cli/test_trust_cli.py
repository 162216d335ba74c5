"""One line instead of a hang, "a bug" or a silent guess (issue 17, items 8, 11, 12), fast tier.

An unreachable Ray address, a bad CBIR_* variable, an output path under a regular file,
a symlink loop, queries that cannot be used and a manifest that contradicts itself: each
is refused in one line (`cbir: error: ...`, exit 2) before anything is written.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import fakes
from pipeline import api, errors
from pipeline.errors import CbirError
from pipeline.evaluation.report import write_report
from pipeline.inputs.scan import read_label_csv
from pipeline.store import catalog

N_IMAGES = 8
HAS_RAY = importlib.util.find_spec("ray") is not None


@pytest.fixture(autouse=True)
def fake_model(monkeypatch):
    monkeypatch.setattr(api.models, "cached_embedder", fakes.cached)


@pytest.fixture(scope="module")
def coll(tmp_path_factory) -> Path:
    """8 labelled images indexed once; tests only read it."""
    root = tmp_path_factory.mktemp("trust")
    fakes.make_images(root / "imgs", N_IMAGES)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(api.models, "cached_embedder", fakes.cached)
        fakes.ok(fakes.cli("index", root / "imgs", *fakes.opts(root)), "index")
    return root


def _loop(folder: Path, name: str = "loop") -> Path:
    """A symlink loop: name -> name.2 -> name."""
    (folder / f"{name}.2").symlink_to(folder / name)
    (folder / name).symlink_to(folder / f"{name}.2")
    return folder / name


def _a_file(folder: Path) -> Path:
    path = folder / "plain-file"
    path.write_text("not a folder")
    return path


# --- item 8: an unreachable --ray-address ---------------------------------------------------


def _index_with_ray(tmp_path: Path, address: str, limit: float) -> tuple[subprocess.Popen, float]:
    """`cbir index --engine ray --ray-address ADDRESS` (fake model) in a child; killed at `limit`."""
    fakes.make_images(tmp_path / "imgs", 2)
    args = ["index", tmp_path / "imgs", *fakes.opts(tmp_path), "--engine", "ray"]
    started = time.monotonic()
    try:
        r = subprocess.run(
            [sys.executable, str(Path(fakes.__file__).resolve()), *map(str, args),
             "--ray-address", address],
            capture_output=True, text=True, timeout=limit,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        pytest.fail(f"--ray-address {address}: still connecting after {limit} s")
    return r, time.monotonic() - started


def _refused_cleanly(r, seconds: float, limit: float, tmp_path: Path, *words: str) -> None:
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    # Ray's own multi-line warnings (C++ and Python) stay off the terminal.
    assert len(lines) == 1 and lines[0].startswith("cbir: error: "), r.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])
    assert seconds < limit, seconds
    assert sorted(p.name for p in tmp_path.iterdir()) == ["imgs"], "something was written"


@pytest.mark.skipif(not HAS_RAY, reason="Ray is not installed")
def test_a_refused_ray_address_is_one_line_at_once_and_writes_nothing(tmp_path):
    """Nothing listens on port 1: refused in seconds (it hung for minutes), no catalog made."""
    r, seconds = _index_with_ray(tmp_path, "127.0.0.1:1", limit=60)
    _refused_cleanly(r, seconds, 20, tmp_path, "127.0.0.1:1", "cannot reach")


@pytest.mark.skipif(not HAS_RAY, reason="Ray is not installed")
def test_build_index_joins_the_cluster_before_touching_the_catalog(tmp_path):
    """`build-index --engine ray` with a refused address: one line at once, before the catalog
    is locked or anything trained (it used to connect only after training), nothing changed."""
    fakes.make_images(tmp_path / "imgs", 8)
    fakes.ok(fakes.cli("index", tmp_path / "imgs", *fakes.opts(tmp_path)))
    before = fakes.snapshot(tmp_path / "c.db")
    files = sorted(p.name for p in tmp_path.rglob("*"))
    started = time.monotonic()
    # The lock held here: a build that locked (and trained) before joining would say
    # "another cbir job is writing" instead of naming the address.
    with catalog.write_lock(tmp_path / "c.db"):
        r = subprocess.run(
            [sys.executable, str(Path(fakes.__file__).resolve()), "build-index", "ivf",
         "--factory", "IVF2,Flat", *map(str, fakes.opts(tmp_path)),
             "--engine", "ray", "--ray-address", "127.0.0.1:1"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    seconds = time.monotonic() - started
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cbir: error: "), r.stderr
    assert "127.0.0.1:1" in lines[0] and seconds < 20, (lines, seconds)
    fakes.assert_same(fakes.snapshot(tmp_path / "c.db"), before, "after a refused join")
    assert sorted(p.name for p in tmp_path.rglob("*")) == files


@pytest.mark.slow  # ~18 s: Ray's own join limits, not the TCP probe, end this one
@pytest.mark.skipif(not HAS_RAY, reason="Ray is not installed")
def test_a_port_that_is_not_a_ray_head_is_one_line_within_limits(tmp_path):
    """A port that accepts connections but never answers as a Ray head (the probe passes)."""
    server = socket.create_server(("", 0))  # every address: Ray maps 127.0.0.1 to the node's
    port = server.getsockname()[1]
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        r, seconds = _index_with_ray(tmp_path, f"127.0.0.1:{port}", limit=90)
    finally:
        stop.set()
        thread.join()
        for s in [server, *held]:
            s.close()
    _refused_cleanly(r, seconds, 40, tmp_path, f"127.0.0.1:{port}", "cannot join")


# --- item 11: CBIR_* variables and output paths ---------------------------------------------


@pytest.mark.parametrize(
    ("var", "value"),
    [
        ("CBIR_THREADS", "abc"),
        ("CBIR_THREADS", "0"),
        ("CBIR_CRASH_AFTER", "abc"),
        ("CBIR_CRASH_AFTER", "0"),  # never crashes: a test relying on it would pass wrongly
        ("CBIR_CRASH_LOG", "{file}/steps.log"),
        ("CBIR_INDEX_DIR", "{file}/idx"),
        ("CBIR_CATALOG", "{loop}"),
        ("CBIR_RAY_LOGS", "maybe"),  # any text used to mean "on", "0" included
    ],
)
def test_a_bad_variable_is_one_line_before_anything_is_written(tmp_path, monkeypatch, var, value):
    fakes.make_images(tmp_path / "imgs", 2)
    state = tmp_path / "state"
    state.mkdir()
    value = value.format(file=_a_file(tmp_path), loop=_loop(tmp_path))
    monkeypatch.setenv(var, value)
    catalog = [] if var == "CBIR_CATALOG" else ["--catalog", state / "c.db"]
    line = fakes.one_line_error(fakes.cli("index", tmp_path / "imgs", *catalog), 2)
    assert var in line, line
    assert list(state.iterdir()) == [], "something was written"


def test_the_variables_read_where_they_act_are_checked_there_too(monkeypatch):
    """For API callers, who start no command: the model's threads, the crash hook."""
    from pipeline import faults, specs

    monkeypatch.setenv("CBIR_THREADS", "many")
    with pytest.raises(CbirError, match="CBIR_THREADS"):
        specs.env_int("CBIR_THREADS")
    monkeypatch.setenv("CBIR_CRASH_AFTER", "soon")
    with pytest.raises(CbirError, match="CBIR_CRASH_AFTER"):
        faults.step("a test step")


@pytest.mark.parametrize(
    ("command", "where"),
    [
        (["evaluate", "--leave-one-out", "--report"], "{file}/report"),
        (["evaluate", "--leave-one-out", "--report"], "{loop}"),
        (["train", "--epochs", "1", "--out"], "{file}/w.weights.h5"),
        (["train", "--epochs", "1", "--out"], "{loop_h5}"),
        (["build-index", "w", "--whiten", "--validate", "labels", "--save-whitening"], "{file}/w"),
        (["bench", "scale", "--sizes", "100", "--out"], "{file}/bench"),
    ],
)
def test_an_output_path_that_cannot_be_made_is_refused_before_work(coll, tmp_path, command, where):
    """Found while parsing (the evaluation or training is not run first); it was "a bug"."""
    where = where.format(
        file=_a_file(tmp_path), loop=_loop(tmp_path), loop_h5=_loop(tmp_path, "w.weights.h5")
    )
    before = sorted(p.name for p in coll.iterdir())
    line = fakes.one_line_error(fakes.cli(*command, where, *fakes.opts(coll)), 2)
    assert os.path.basename(where) in line or "plain-file" in line, line
    assert sorted(p.name for p in coll.iterdir()) == before


def test_the_report_api_refuses_a_folder_it_cannot_make(tmp_path):
    with pytest.raises(CbirError, match="plain-file is a file, not a folder"):
        write_report({"per_query": []}, _a_file(tmp_path) / "report")


def test_an_unusable_path_from_anywhere_is_one_line_not_a_bug(tmp_path, capsys):
    """The guard's net for a path no option checked: ENOTDIR, ELOOP ... exit 2, one line."""
    with pytest.raises(SystemExit) as stop, errors.one_line(str(tmp_path / "c.db")):
        open(_a_file(tmp_path) / "x", "w")  # noqa: SIM115 - it raises
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "plain-file/x" in err[0] and "a bug" not in err[0], err
    assert not (tmp_path / "c.db.errors.log").exists()


# --- item 12: queries, catalogs, manifests --------------------------------------------------


def test_evaluate_refuses_queries_with_leave_one_out(coll):
    """QUERIES was silently ignored: the figures were leave-one-out's, not the queries'."""
    line = fakes.one_line_error(
        fakes.cli("evaluate", coll / "imgs", "--leave-one-out", *fakes.opts(coll)), 2
    )
    assert "QUERIES" in line and "--leave-one-out" in line


def test_searching_a_folder_without_images_is_an_error(coll, tmp_path):
    """It printed nothing and exited 0, like a search that matched nothing."""
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no image here")
    line = fakes.one_line_error(fakes.cli("search", empty, *fakes.opts(coll)), 2)
    assert f"no images found under {empty}" in line


def test_unusable_query_files_are_named_and_missing_ones_said_to_be(coll, tmp_path):
    good = sorted((coll / "imgs" / "red").glob("*.jpg"))[0]
    (tmp_path / "broken.jpg").write_text("not an image")
    rows = [f"{good},red", "gone-1.jpg,red", "gone-2.jpg,blue", "broken.jpg,blue"]
    (tmp_path / "q.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
    line = fakes.one_line_error(fakes.cli("evaluate", tmp_path / "q.csv", *fakes.opts(coll)), 2)
    assert "3 of 4" in line, line
    assert f"2 not found ({tmp_path / 'gone-1.jpg'}, {tmp_path / 'gone-2.jpg'})" in line, line
    assert f"1 could not be decoded ({tmp_path / 'broken.jpg'})" in line, line


def test_a_catalog_that_is_a_symlink_loop_is_said_to_be_one(coll, tmp_path, monkeypatch):
    """It was reported missing ("run 'cbir index' first"), which would not help."""
    loop = _loop(tmp_path)
    line = fakes.one_line_error(fakes.cli("info", "--catalog", loop), 2)
    assert "symlink loop" in line
    # The same catalog from a config file, which no option checks: readers and writers.
    (tmp_path / "c.toml").write_text(f'catalog = "{loop}"\n')
    monkeypatch.chdir(tmp_path)
    for command in (["search", "--id", "1"], ["index", coll / "imgs"]):
        line = fakes.one_line_error(fakes.cli(*command, "--config", tmp_path / "c.toml"), 2)
        assert "symlink loop" in line and "no catalog" not in line, line
    assert not list(tmp_path.glob("*.lock")), "the writer made a lock file first"


def test_an_index_root_or_label_file_that_is_a_symlink_loop_is_one_line(coll, tmp_path):
    loop = _loop(tmp_path)
    for args in ([loop], [coll / "imgs", "--labels", loop]):
        line = fakes.one_line_error(fakes.cli("index", *args, *fakes.opts(tmp_path)), 2)
        assert "loop" in line and "a bug" not in line, line


def test_a_manifest_giving_one_file_two_labels_is_refused(coll, tmp_path):
    """Either label would be a guess that every later figure rests on: refused, naming both."""
    img = sorted((coll / "imgs" / "red").glob("*.jpg"))[0]
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"path,label\n{img},red\n{img.parent}/./{img.name},blue\n")
    line = fakes.one_line_error(fakes.cli("index", manifest, *fakes.opts(tmp_path)), 2)
    assert img.name in line and "'red'" in line and "'blue'" in line, line
    assert "data row 1" in line and "data row 2" in line, line
    with pytest.raises(CbirError, match="listed twice"):
        read_label_csv(manifest)
    # The same label twice (two manifests pasted together) is no contradiction.
    manifest.write_text(f"path,label\n{img},red\n{img},red\n")
    assert read_label_csv(manifest) == {str(img): "red"}
