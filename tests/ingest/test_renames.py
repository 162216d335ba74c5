"""Renames and moves found by a plain `cbir index`: the row keeps its id and its vector.

Each test indexes small JPEGs with the fake model, moves files the way a user would
(rename, another folder, another root, a copy across filesystems), indexes again,
and checks the ids, the vector bytes, that the model did not run (the fake model's
log hears every batch), that `verify` passes and that the catalog holds what a fresh
index of the same folders holds.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

import fakes
from fakes import assert_same, cli, ok, opts, snapshot
from pipeline.store import catalog, reads, vectors


@pytest.fixture(autouse=True)
def model_log(monkeypatch, tmp_path):
    """The fake model, writing one line per batch it embeds to the returned file."""
    from pipeline import api

    log = tmp_path / "model.log"
    monkeypatch.setattr(api.models, "cached_embedder", lambda *a: fakes.cached(*a, log=str(log)))
    return log


def index(state: Path, *args) -> str:
    return ok(cli("index", *args, *opts(state)), "index")


def rows(state: Path) -> dict[str, dict]:
    """path -> {id, label, file_key, vector bytes} of every catalogued image."""
    db = catalog.open_reader(state / "c.db")
    try:
        dim, committed = reads.dimension(db), reads.next_id(db)
        vecs = vectors.open_rows(vectors.vectors_path(state / "c.db"), dim, committed)
        return {
            r["path"]: {**r, "vector": np.array(vecs[r["id"]]).tobytes()}
            for r in db.query("select id, path, label, file_key, status from images")
        }
    finally:
        db.conn.close()


def embedded(log: Path) -> int:
    """Images the model embedded since the log was last cleared."""
    return sum(int(n) for n in log.read_text().split()) if log.exists() else 0


def moved_run(state: Path, log: Path, *args) -> str:
    """Index again after a move: the output; the model must not have run."""
    log.unlink(missing_ok=True)
    out = index(state, *args)
    assert embedded(log) == 0, out
    return out


def verified(state: Path) -> None:
    ok(cli("verify", *opts(state)), "verify")


def same_as_fresh(state: Path, tmp_path: Path, *roots) -> None:
    """The catalog holds what a fresh index of `roots` would hold (paths, labels, vectors)."""
    fresh = tmp_path / "fresh"
    index(fresh, *roots)
    assert_same(snapshot(state / "c.db"), snapshot(fresh / "c.db"), "against a fresh index")


@pytest.fixture
def lib(tmp_path, model_log):
    """A folder of six images (red/ and blue/) indexed into tmp_path/s."""
    imgs = tmp_path / "imgs"
    fakes.make_images(imgs, 6)
    state = tmp_path / "s"
    index(state, imgs)
    assert embedded(model_log) == 6
    return imgs, state


def test_rename_in_place_keeps_id_vector_and_label(lib, model_log, tmp_path):
    imgs, state = lib
    before = rows(state)
    old, new = imgs / "red" / "img0_0001.jpg", imgs / "red" / "renamed.jpg"
    old.rename(new)
    out = moved_run(state, model_log, imgs)
    assert "moved 1 (ids and vectors kept)" in out, out
    after = rows(state)
    assert str(old) not in after
    assert after[str(new)]["id"] == before[str(old)]["id"]
    assert after[str(new)]["vector"] == before[str(old)]["vector"]
    assert after[str(new)]["label"] == "red"
    verified(state)
    same_as_fresh(state, tmp_path, imgs)
    assert "moved" not in index(state, imgs)  # settled: nothing moves twice


def test_move_to_another_folder_relabels(lib, model_log, tmp_path):
    imgs, state = lib
    before = rows(state)
    old = imgs / "red" / "img0_0003.jpg"
    (imgs / "green").mkdir()
    new = imgs / "green" / "img0_0003.jpg"
    old.rename(new)
    moved_run(state, model_log, imgs, "--prune")
    after = rows(state)
    assert after[str(new)]["id"] == before[str(old)]["id"]
    assert after[str(new)]["label"] == "green"
    assert len(after) == len(before)  # the old path was moved, not pruned
    verified(state)
    same_as_fresh(state, tmp_path, imgs)


def test_move_across_roots(tmp_path, model_log):
    a, b = tmp_path / "a", tmp_path / "b"
    fakes.make_images(a, 4, seed=1)
    fakes.make_images(b, 4, seed=2)
    state = tmp_path / "s"
    index(state, a, b)
    before = rows(state)
    old, new = a / "red" / "img1_0001.jpg", b / "red" / "from_a.jpg"
    old.rename(new)
    out = moved_run(state, model_log, b)  # only the destination root is indexed
    assert "moved 1" in out
    assert rows(state)[str(new)]["id"] == before[str(old)]["id"]
    verified(state)
    same_as_fresh(state, tmp_path, a, b)


def test_a_copy_beside_the_original_is_a_new_image(lib, model_log):
    imgs, state = lib
    before = rows(state)
    orig = imgs / "blue" / "img0_0000.jpg"
    copy = imgs / "blue" / "copy.jpg"
    shutil.copy2(orig, copy)
    out = moved_run(state, model_log, imgs)  # copied from its duplicate: no model run either
    assert "moved" not in out and "copied from duplicates 1" in out, out
    after = rows(state)
    assert after[str(orig)]["id"] == before[str(orig)]["id"]
    assert after[str(copy)]["id"] not in {r["id"] for r in before.values()}
    verified(state)


def test_a_move_that_changed_the_content_is_a_new_image(lib, model_log, tmp_path):
    imgs, state = lib
    before = rows(state)
    old, new = imgs / "red" / "img0_0005.jpg", imgs / "red" / "edited.jpg"
    old.rename(new)
    fakes.make_images(tmp_path / "other", 1, seed=9)
    new.write_bytes(next((tmp_path / "other").rglob("*.jpg")).read_bytes())
    model_log.unlink()
    out = index(state, imgs)
    assert "moved" not in out and embedded(model_log) == 1, out
    after = rows(state)
    assert after[str(new)]["id"] not in {r["id"] for r in before.values()}
    assert str(old) in after  # a plain run keeps a gone file's row, as before
    index(state, imgs, "--prune")
    assert str(old) not in rows(state)
    verified(state)
    same_as_fresh(state, tmp_path, imgs)


def test_swapping_two_names_swaps_their_rows(lib, model_log, tmp_path):
    imgs, state = lib
    before = rows(state)
    a, b, tmp = imgs / "red" / "img0_0001.jpg", imgs / "blue" / "img0_0002.jpg", imgs / "t"
    a.rename(tmp)
    b.rename(a)
    tmp.rename(b)
    out = moved_run(state, model_log, imgs)
    assert "moved 2" in out, out
    after = rows(state)
    assert after[str(a)]["id"] == before[str(b)]["id"]
    assert after[str(b)]["id"] == before[str(a)]["id"]
    assert after[str(a)]["vector"] == before[str(b)]["vector"]
    assert (after[str(a)]["label"], after[str(b)]["label"]) == ("red", "blue")
    verified(state)
    same_as_fresh(state, tmp_path, imgs)


def test_same_content_under_a_new_inode_is_a_move(lib, model_log, tmp_path):
    """A copy across filesystems (or a tool that rewrites): another inode, same bytes."""
    imgs, state = lib
    before = rows(state)
    old, new = imgs / "blue" / "img0_0004.jpg", imgs / "blue" / "elsewhere.jpg"
    shutil.copy(old, new)  # a new inode and a new mtime
    old.unlink()
    out = moved_run(state, model_log, imgs)
    assert "moved 1" in out, out
    after = rows(state)
    assert after[str(new)]["id"] == before[str(old)]["id"]
    assert after[str(new)]["vector"] == before[str(old)]["vector"]
    st = os.stat(new)
    assert after[str(new)]["file_key"] == f"{st.st_dev}:{st.st_ino}"
    verified(state)
    same_as_fresh(state, tmp_path, imgs)


def test_two_copies_claim_one_vanished_row_once(lib, model_log, tmp_path):
    imgs, state = lib
    before = rows(state)
    old = imgs / "red" / "img0_0003.jpg"
    x, y = imgs / "red" / "x.jpg", imgs / "red" / "y.jpg"
    shutil.copy(old, x)
    shutil.copy(old, y)
    old.unlink()
    out = moved_run(state, model_log, imgs)
    assert "moved 1" in out and "copied from duplicates 1" in out, out
    after = rows(state)
    assert after[str(x)]["id"] == before[str(old)]["id"]  # the first in scan order
    assert after[str(y)]["id"] not in {r["id"] for r in before.values()}
    verified(state)


def test_a_file_moved_over_a_catalogued_one_takes_its_place(lib, model_log, tmp_path):
    imgs, state = lib
    before = rows(state)
    src, dest = imgs / "red" / "img0_0001.jpg", imgs / "red" / "img0_0003.jpg"
    src.rename(dest)  # img0_0003's image is gone
    out = moved_run(state, model_log, imgs)
    assert "moved 1" in out, out
    after = rows(state)
    assert after[str(dest)]["id"] == before[str(src)]["id"]
    assert before[str(dest)]["id"] not in {r["id"] for r in after.values()}
    assert str(src) not in after
    verified(state)
    same_as_fresh(state, tmp_path, imgs)


def test_a_running_server_session_sees_a_rename(lib, model_log):
    """A move keeps the generation (indexes stay current), so the web session's list of
    rows must notice the rewrite by another process by other means."""
    from pipeline import api
    from pipeline.api.session import open_session
    from pipeline.retrieval import filters

    imgs, state = lib
    s = api.settings_for(None, catalog=str(state / "c.db"), index_dir=str(state / "idx"))
    session = open_session(s, batch_size=4)
    try:
        old = imgs / "red" / "img0_0001.jpg"
        new = imgs / "green" / "renamed.jpg"
        assert str(old) in {r["path"] for r in session.indexed_rows()}
        assert str(imgs / "green") not in {f["folder"] for f in session.image_folders()}
        green = filters.make_filter(under=[str(imgs / "green")])
        assert len(filters.matching(session.coll, green)) == 0  # and now kept
        new.parent.mkdir()
        old.rename(new)
        moved_run(state, model_log, imgs)
        paths = {r["path"] for r in session.indexed_rows()}
        assert str(new) in paths and str(old) not in paths
        assert str(imgs / "green") in {f["folder"] for f in session.image_folders()}
        moved_id = rows(state)[str(new)]["id"]
        assert list(filters.matching(session.coll, green)) == [moved_id]
    finally:
        session.coll.close()


def test_a_reused_inode_with_other_bytes_is_no_move(tmp_path, model_log):
    """A deleted file's inode is reused and archive tools keep mtimes: another picture of
    the same size under the old file's identity is a new image, not the old row moved."""
    from PIL import Image

    from pipeline.store import collection, repair, writes

    imgs, state = tmp_path / "imgs", tmp_path / "s"
    imgs.mkdir()
    old, new = imgs / "a.bmp", imgs / "b.bmp"
    Image.new("RGB", (64, 48), (200, 30, 30)).save(old)
    index(state, imgs)
    before = rows(state)[str(old)]
    st = os.stat(old)
    old.unlink()
    Image.new("RGB", (64, 48), (20, 30, 220)).save(new)  # a BMP: the same size in bytes
    os.utime(new, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.path.getsize(new) == st.st_size
    with collection.writing(state / "c.db", state / "idx") as coll:  # as if the inode were reused
        writes.set_file_keys(coll.db, {before["id"]: repair.file_key(str(new))})
    model_log.unlink(missing_ok=True)
    out = index(state, imgs, "--prune")
    assert "moved" not in out, out
    assert embedded(model_log) == 1  # the new picture got its own vector
    after = rows(state)
    assert after[str(new)]["id"] != before["id"]
    assert after[str(new)]["vector"] != before["vector"]
    verified(state)
    same_as_fresh(state, tmp_path, imgs)
