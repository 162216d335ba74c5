"""`pipeline.api.watch` in this process with the fake model: batches on file events, moves
keep their ids without a model run, another writer is waited for, `stop` ends it.

The watcher runs in a thread; each test waits for the batches it causes (on_batch puts
them on a queue) and compares the catalog with a fresh index of the same folder.
"""

from __future__ import annotations

import queue
import shutil
import threading
from pathlib import Path

import pytest

import fakes
from fakes import assert_same, cli, ok, opts, snapshot
from pipeline import api
from pipeline.errors import CbirError

WAIT = 20  # seconds a test waits for a batch before failing


@pytest.fixture(autouse=True)
def fake_model(monkeypatch, tmp_path):
    log = tmp_path / "model.log"
    monkeypatch.setattr(api.models, "cached_embedder", lambda *a: fakes.cached(*a, log=str(log)))
    return log


class Watcher:
    """api.watch over `folder` in a thread, its batches on a queue."""

    def __init__(self, folder: Path, state: Path, **kw):
        self.batches: queue.Queue = queue.Queue()
        self.busy: list[str] = []
        self.stop = threading.Event()
        self.error: BaseException | None = None
        options = {"catalog": str(state / "c.db"), "index_dir": str(state / "idx")}
        options["runtime"] = "keras"  # fp32: no int8 calibration images for the fake model

        def run() -> None:
            try:
                api.watch(
                    [folder],
                    on_batch=self.batches.put,
                    on_busy=self.busy.append,
                    stop=self.stop,
                    debounce=0.2,
                    rescan=kw.pop("rescan", 0),
                    **options,
                    **kw,
                )
            except BaseException as e:  # reported by the test, never swallowed
                self.error = e

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def next(self) -> api.Batch:
        try:
            return self.batches.get(timeout=WAIT)
        except queue.Empty:
            raise AssertionError(f"no batch within {WAIT} s (error: {self.error!r})") from None

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=WAIT)
        assert not self.thread.is_alive(), "the watcher did not stop"
        assert self.error is None, self.error


def ids(state: Path) -> dict[str, int]:
    db = fakes.catalog.open_reader(state / "c.db")
    try:
        return {r["path"]: r["id"] for r in db.query("select id, path from images")}
    finally:
        db.conn.close()


def test_watch_follows_adds_edits_moves_and_deletes(tmp_path, fake_model):
    imgs, state = tmp_path / "imgs", tmp_path / "s"
    made = fakes.make_images(imgs, 6)
    extra = fakes.make_images(tmp_path / "extra", 3, seed=7)
    w = Watcher(imgs, state)
    try:
        first = w.next()
        assert (first.reason, first.summary.indexed) == ("start", 6)
        before = ids(state)
        fake_model.unlink()

        moved_to = imgs / "blue" / "moved.jpg"
        made[1].rename(moved_to)  # a move: its id and vector stay, no model run
        batch = w.next()
        assert batch.reason == "events" and batch.summary.moved == 1, batch
        assert not fake_model.exists(), "a move ran the model"
        assert ids(state)[str(moved_to)] == before[str(made[1])]

        shutil.copy(extra[0], imgs / "red" / "new.jpg")  # an add
        shutil.copy(extra[1], made[2])  # an edit: other content at the same path
        made[3].unlink()  # a delete
        seen = 0
        while seen < 3:  # the three changes may come in one batch or more
            s = w.next().summary
            seen += s.indexed + s.pruned
        assert str(made[3]) not in ids(state)
    finally:
        w.close()
    fresh = tmp_path / "fresh"
    ok(cli("index", imgs, *opts(fresh)))
    assert_same(snapshot(state / "c.db"), snapshot(fresh / "c.db"), "watched vs fresh")
    ok(cli("verify", *opts(state)))


def test_watch_waits_for_another_writer(tmp_path, monkeypatch):
    monkeypatch.setattr(api.watching, "BUSY_RETRY", 0.2)
    imgs, state = tmp_path / "imgs", tmp_path / "s"
    fakes.make_images(imgs, 2)
    w = Watcher(imgs, state)
    try:
        w.next()
        with fakes.catalog.write_lock(state / "c.db"):  # another job is writing
            fakes.make_images(imgs, 3, seed=3)
            for _ in range(50):
                if w.busy:
                    break
                threading.Event().wait(0.1)
            assert w.busy and "another cbir job" in w.busy[0], w.busy
        assert w.next().summary.indexed == 3  # after the lock is released
    finally:
        w.close()


def test_rescan_without_events_and_refused_values(tmp_path):
    imgs, state = tmp_path / "imgs", tmp_path / "s"
    fakes.make_images(imgs, 2)
    w = Watcher(imgs, state, rescan=0.3)
    try:
        assert w.next().reason == "start"
        assert w.next().reason == "rescan"
    finally:
        w.close()
    for bad in ({"debounce": -1}, {"rescan": float("nan")}, {"max_wait": 0}):
        with pytest.raises(CbirError):
            api.watch([imgs], catalog=str(state / "c.db"), **bad)
