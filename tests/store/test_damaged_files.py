"""Damaged index and catalog files, a full disk and a read-only folder: one line, never a traceback.

The disk-full and read-only cases use a real small tmpfs (root only; skipped
with the reason elsewhere).
"""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

import fakes
from fakes import assert_same, cli, opts, snapshot
from pipeline import api
from pipeline.retrieval import index_files
from pipeline.store import catalog, reads


@pytest.fixture(autouse=True)
def fake_model(monkeypatch):
    monkeypatch.setattr(api.models, "cached_embedder", fakes.cached)


def one_line_error(r, code: int) -> str:
    assert r.exit_code == code, r.output
    assert "Traceback" not in r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cbir: error:"), r.stderr
    return lines[0]


def index_file(folder: Path, name: str) -> Path:
    rec = reads.index_record(catalog.open_reader(folder / "c.db"), name)
    return index_files.index_path(folder / "idx", name, rec)


DAMAGE = {
    "truncated": lambda b: b[: len(b) // 2],
    "zeroed": lambda b: bytes(len(b)),
    "header flipped": lambda b: bytes(x ^ 0xFF for x in b[:64]) + b[64:],
    "garbage appended": lambda b: b + b"\x00garbage" * 100,
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_damaged_index_file_is_one_line_and_rebuilds(tmp_path, damage):
    fakes.make_images(tmp_path / "imgs", 40)
    assert cli("index", tmp_path / "imgs", *opts(tmp_path)).exit_code == 0
    assert cli("build-index", "ivf", "--factory", "IVF2,Flat", *opts(tmp_path)).exit_code == 0
    for name in ("ivf", "exact"):
        path = index_file(tmp_path, name)
        path.write_bytes(DAMAGE[damage](path.read_bytes()))
    line = one_line_error(cli("search", "--id", "1", "--index", "ivf", *opts(tmp_path)), 1)
    assert "index 'ivf'" in line and "cbir build-index ivf" in line
    # The exact index is derived and cheap: search rebuilds it in memory meanwhile.
    assert cli("search", "--id", "1", *opts(tmp_path)).exit_code == 0
    r = cli("verify", *opts(tmp_path))
    assert r.exit_code == 1 and "ivf" in r.output and "Traceback" not in r.output
    assert cli("build-index", "ivf", *opts(tmp_path)).exit_code == 0
    assert cli("build-index", "exact", *opts(tmp_path)).exit_code == 0
    assert cli("search", "--id", "1", "--index", "ivf", *opts(tmp_path)).exit_code == 0
    assert cli("verify", *opts(tmp_path)).exit_code == 0


def test_corrupt_catalog_page_is_reported_by_verify_and_one_line_everywhere(tmp_path):
    fakes.make_images(tmp_path / "imgs", 150)
    assert cli("index", tmp_path / "imgs", *opts(tmp_path)).exit_code == 0
    con = sqlite3.connect(tmp_path / "c.db")
    con.execute("pragma wal_checkpoint(truncate)")
    page = con.execute("pragma page_size").fetchone()[0]
    pages = con.execute("pragma page_count").fetchone()[0]
    con.close()
    assert pages > 4
    with open(tmp_path / "c.db", "r+b") as f:  # damage every page but the schema's
        for p in range(2, pages):
            f.seek(p * page + 100)
            f.write(b"\xde\xad\xbe\xef" * 200)
    r = cli("verify", *opts(tmp_path))
    assert r.exit_code == 1 and "quick_check" in r.output and "Traceback" not in r.output
    # Other commands meet the damage only where they read it; when they do, one line.
    failed = 0
    for args in (["search", "--id", "1"], ["info"], ["index", tmp_path / "imgs"]):
        r = cli(*args, *opts(tmp_path))
        if r.exit_code:
            line = one_line_error(r, 1)
            assert "damaged" in line or "malformed" in line, line
            failed += 1
    assert failed


# --- real small file systems ---------------------------------------------------------------


@pytest.fixture
def tmpfs(tmp_path):
    """A real tmpfs of a given size, remountable (read-only, larger); root only."""
    mount = tmp_path / "fs"
    mount.mkdir()

    def remount(options: str) -> None:
        subprocess.run(["mount", "-o", f"remount,{options}", str(mount)], check=True)

    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.decode().strip()})")
    try:
        yield mount, remount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


@pytest.mark.slow
@pytest.mark.parametrize("size_kb", [120, 400, 700, 1000])
def test_disk_full_is_one_line_and_a_rerun_finishes(tmp_path, tmpfs, size_kb):
    mount, remount = tmpfs
    imgs = tmp_path / "imgs"
    fakes.make_images(imgs, 100)
    clean = tmp_path / "clean"
    assert cli("index", imgs, "--batch-size", "8", *opts(clean)).exit_code == 0
    want = snapshot(clean / "c.db")
    remount(f"size={size_kb}k")
    r = cli("index", imgs, "--batch-size", "8", *opts(mount))
    line = one_line_error(r, 1)
    assert "disk full" in line and "free space and rerun" in line, line
    leftovers = [p.name for p in mount.rglob("*.tmp")]
    assert not leftovers, leftovers
    remount("size=20m")
    r = cli("index", imgs, "--batch-size", "8", *opts(mount))
    assert r.exit_code == 0, r.output
    assert_same(snapshot(mount / "c.db"), want, f"after a full disk at {size_kb} kB")
    assert cli("verify", *opts(mount)).exit_code == 0
    runs = list(catalog.open_reader(mount / "c.db").query("select status from runs"))
    assert [x["status"] for x in runs][-1] == "done"
    assert all(x["status"] != "running" for x in runs), runs


@pytest.mark.slow
def test_read_only_folder_reads_and_refuses_writes_in_one_line(tmp_path, tmpfs):
    mount, remount = tmpfs
    remount("size=20m")
    fakes.make_images(tmp_path / "imgs", 20)
    # In a child process, so no file stays open for writing and the remount can happen.
    child = [sys.executable, fakes.__file__, "index", str(tmp_path / "imgs"), *opts(mount)]
    assert subprocess.run(child, capture_output=True).returncode == 0
    shutil.rmtree(tmp_path / "imgs" / "red")
    remount("ro")
    for args in (["search", "--id", "1"], ["info"], ["verify"]):
        r = cli(*args, *opts(mount))
        assert r.exit_code == 0, r.output
    for args in (
        ["index", tmp_path / "imgs", "--prune"],
        ["build-index", "x", "--factory", "Flat"],
    ):
        line = one_line_error(cli(*args, *opts(mount)), 2)
        assert "read-only" in line or "writable" in line, line
