"""`cbir watch` as a user runs it: a child process (cbir with the fake model) that follows
adds, edits, moves and deletes, is killed with SIGKILL in the middle of a batch, is
started again, and leaves the catalog a fresh index of the folder would make, with the
ids of moved files kept and `verify` passing; SIGTERM ends it cleanly.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import fakes
from fakes import assert_refused, assert_same, cli, ok, opts, snapshot

FAKES = Path(fakes.__file__).resolve()


@pytest.fixture(autouse=True)
def fake_model(monkeypatch):
    from pipeline import api

    monkeypatch.setattr(api.models, "cached_embedder", fakes.cached)


def test_watch_refuses_bad_values_in_one_line(tmp_path):
    for flag, value in (("--debounce", "-1"), ("--rescan", "nan"), ("--max-wait", "0")):
        assert_refused(cli("watch", tmp_path, flag, value, *opts(tmp_path)), flag)
    assert_refused(cli("watch", tmp_path / "nowhere", *opts(tmp_path)), "no such file or folder")
    assert not (tmp_path / "c.db").exists()  # refused before any catalog is made


def paths_and_ids(state: Path) -> dict[str, int]:
    db = fakes.catalog.open_reader(state / "c.db")
    try:
        return {r["path"]: r["id"] for r in db.query("select id, path from images")}
    finally:
        db.conn.close()


def on_disk(folder: Path) -> set[str]:
    return {str(p) for p in folder.rglob("*.jpg")}


def settle(state: Path, folder: Path, proc: subprocess.Popen, timeout: float = 60) -> None:
    """Wait until the catalog's paths are the files under `folder`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the watcher died"
        try:
            if set(paths_and_ids(state)) == on_disk(folder):
                return
        except Exception:  # a catalog being created: look again
            pass
        time.sleep(0.1)
    raise AssertionError("the catalog did not follow the folder")


def start(folder: Path, state: Path, out: Path, env: dict[str, str]) -> subprocess.Popen:
    args = ["watch", folder, "--debounce", "0.2", "--batch-size", "2", "--runtime", "keras"]
    with out.open("a") as f:  # a file, not a pipe: a full pipe would block the watcher
        return subprocess.Popen(
            [sys.executable, str(FAKES), *map(str, args), *opts(state)],
            stdout=f,
            stderr=subprocess.STDOUT,
            env={**os.environ, **env},
        )


@pytest.mark.slow
def test_watch_survives_sigkill_and_ends_as_a_fresh_index(tmp_path):
    imgs, state = tmp_path / "imgs", tmp_path / "s"
    made = fakes.make_images(imgs, 8)
    extra = fakes.make_images(tmp_path / "extra", 12, seed=5)
    log, out = tmp_path / "model.log", tmp_path / "watch.out"
    env = {"FAKE_MODEL_LOG": str(log), "FAKE_MODEL_DELAY": "0.4"}
    proc = start(imgs, state, out, env)
    try:
        settle(state, imgs, proc)
        first = paths_and_ids(state)
        # Adds, an edit, a move to another folder and a delete, while it runs.
        shutil.copy(extra[0], imgs / "red" / "added.jpg")
        shutil.copy(extra[1], made[2])
        (imgs / "green").mkdir()
        made[1].rename(imgs / "green" / "moved.jpg")
        made[3].unlink()
        settle(state, imgs, proc)
        ids = paths_and_ids(state)
        assert ids[str(imgs / "green" / "moved.jpg")] == first[str(made[1])]

        # Many new files (a batch of model runs of 0.4 s each) and a rename: killed once
        # the model has begun.
        log.unlink(missing_ok=True)
        for p in extra[2:]:
            shutil.copy(p, imgs / "blue" / f"new_{p.name}")
        made[4].rename(imgs / "blue" / "renamed.jpg")
        deadline = time.monotonic() + 30
        while not log.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert log.exists(), out.read_text()
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        # While no watcher runs: a move and a delete.
        made[5].rename(imgs / "red" / "while_dead.jpg")
        made[6].unlink()

        proc = start(imgs, state, out, env)
        settle(state, imgs, proc)
        after = paths_and_ids(state)
        assert after[str(imgs / "red" / "while_dead.jpg")] == first[str(made[5])]
        assert after[str(imgs / "green" / "moved.jpg")] == first[str(made[1])]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, out.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    fresh = tmp_path / "fresh"
    ok(cli("index", imgs, *opts(fresh)))
    assert_same(snapshot(state / "c.db"), snapshot(fresh / "c.db"), "watched vs fresh")
    ok(cli("verify", *opts(state)))
    # The rename in the killed batch: a move, or, if it was not committed before the
    # kill, a move at the restart's first scan: never a second vector.
    assert after[str(imgs / "blue" / "renamed.jpg")] == first[str(made[4])]
