"""Crash safety with a real kill -9, vector-file recovery, and verify catching real damage."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import pipeline
from conftest import COREL, ROOT, write_manifest
from pipeline.errors import CbirError
from pipeline.store import catalog, reads, vectors, writes


def committed_rows(db_path: Path) -> int:
    try:
        con = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=5)
        try:
            return con.execute("select count(*) from images").fetchone()[0]
        finally:
            con.close()
    except sqlite3.Error:
        return 0


def vectors_by_path(catalog_path: str) -> dict[str, np.ndarray]:
    db = catalog.open_reader(catalog_path)
    rows = list(db.query("select id, path from images where status = 'indexed'"))
    stored = vectors.open_rows(vectors.vectors_path(catalog_path), 2048, reads.next_id(db))
    return {r["path"]: np.array(stored[r["id"]]) for r in rows}


@pytest.mark.slow
def test_kill_9_mid_job_then_rerun_gives_exact_rows_and_vectors(tmp_path, corel_collection):
    manifest = corel_collection["manifest"]
    cat, idx = tmp_path / "c.db", tmp_path / "idx"
    cmd = [
        sys.executable,
        "-m",
        "pipeline.cli",
        "index",
        str(manifest),
        "--catalog",
        str(cat),
        "--index-dir",
        str(idx),
        "--weights",
        corel_collection["weights"],
        # the shared collection's descriptor, whose vectors the rerun must equal
        "--input",
        corel_collection["input"],
        "--pooling",
        corel_collection["pooling"],
    ]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while committed_rows(cat) < 64 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, (
        "the job ended before it could be killed: " + proc.stderr.read().decode()
    )
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = committed_rows(cat)
    assert 64 <= killed_at < 200

    # The interrupted state is already consistent: only committed rows count.
    assert pipeline.verify(catalog=str(cat), index_dir=str(idx))["ok"]

    rerun = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert f"unchanged {killed_at}" in rerun.stdout

    check = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.cli",
            "verify",
            "--catalog",
            str(cat),
            "--index-dir",
            str(idx),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert check.returncode == 0, check.stdout + check.stderr

    got = vectors_by_path(str(cat))
    want = vectors_by_path(corel_collection["catalog"])
    assert sorted(got) == sorted(want)  # no duplicate, no missing image
    db = catalog.open_reader(cat)
    assert next(iter(db.query("select count(*) n from images")))["n"] == 200
    for path, v in want.items():
        np.testing.assert_allclose(got[path], v, atol=1e-4)
    assert pipeline.info(catalog=str(cat), index_dir=str(idx))["indexes"][0]["vectors"] == 200


def _small_collection(tmp_path, corel_collection, n=12):
    """A fresh small catalog of n Corel images (vectors copied via the duplicate path)."""
    rows = [
        {"path": str(Path(p).relative_to(COREL)), "label": Path(p).parent.name, "split": "database"}
        for p in sorted(vectors_by_path(corel_collection["catalog"]))[:n]
    ]
    manifest = write_manifest(tmp_path / "m.csv", rows)
    o = {
        "catalog": str(tmp_path / "c.db"),
        "index_dir": str(tmp_path / "idx"),
        "weights": corel_collection["weights"],
    }
    pipeline.index([manifest], **o)
    return o


@pytest.mark.slow
def test_torn_vector_tail_is_cut_on_open(tmp_path, corel_collection):
    o = _small_collection(tmp_path, corel_collection)
    path = vectors.vectors_path(o["catalog"])
    size = path.stat().st_size
    with path.open("ab") as f:  # what a crash between fsync and commit leaves behind
        f.write(b"\x01" * (2048 * 4 * 2 + 100))
    report = pipeline.verify(**o)
    assert report["ok"] and any("uncommitted" in n for n in report["notes"])
    # A reader must leave the tail alone: it may be a batch a running job is about to commit.
    assert pipeline.search([1], **o)[0]["results"][0]["id"] == 1
    assert path.stat().st_size == size + 2048 * 4 * 2 + 100
    pipeline.index([tmp_path / "m.csv"], **o)
    assert path.stat().st_size == size
    assert pipeline.verify(**o)["ok"]


@pytest.mark.slow
def test_verify_catches_real_damage(tmp_path, corel_collection):
    o = _small_collection(tmp_path, corel_collection)
    path = vectors.vectors_path(o["catalog"])
    data = bytearray(path.read_bytes())

    # A flipped vector (not unit length any more).
    data[0:4] = np.float32(7.0).tobytes()
    path.write_bytes(bytes(data))
    report = pipeline.verify(**o)
    assert not report["ok"] and any("not unit length" in p for p in report["problems"])

    # A truncated vector file: refused on open, reported by verify.
    path.write_bytes(bytes(data[: 2048 * 4 * 5]))
    assert any("vector file has 5 rows" in p for p in pipeline.verify(**o)["problems"])
    with pytest.raises(CbirError, match="truncated or replaced"):
        pipeline.search([1], **o)

    # An index that disagrees with the catalog.
    path.write_bytes(bytes(data))
    data[0:4] = np.float32(0.0).tobytes()
    db = catalog.open_writer(o["catalog"])
    with writes.transaction(db):
        writes.write(
            db, "delete from images where id = 3"
        )  # behind cbir's back: no generation bump
    report = pipeline.verify(**o)
    assert any("unknown ids" in p for p in report["problems"])

    from click.testing import CliRunner

    from pipeline.cli import main

    r = CliRunner().invoke(
        main, ["verify", "--catalog", o["catalog"], "--index-dir", o["index_dir"]]
    )
    assert r.exit_code == 1 and "PROBLEM" in r.output


def test_second_writer_is_refused(tmp_path):
    lock = tmp_path / "c.db"
    with (
        catalog.write_lock(lock),
        pytest.raises(CbirError, match="another cbir job"),
        catalog.write_lock(lock),
    ):
        pass


def test_not_a_catalog_is_a_clear_error(tmp_path):
    bogus = tmp_path / "c.db"
    bogus.write_text("definitely not sqlite " * 100)
    with pytest.raises(CbirError, match="not a usable SQLite catalog"):
        catalog.open_writer(bogus)
    with pytest.raises(CbirError, match="not a usable SQLite catalog"):
        catalog.open_reader(bogus)
