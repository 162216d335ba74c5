"""Integrity regressions, fast tier (fake model): torn commits, readers that wrote,
foreign files, symlinked catalogs, damaged vector rows, and no tracebacks."""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
from pathlib import Path

import numpy as np
import pytest

import fakes
from fakes import assert_same, cli, opts, snapshot
from pipeline import api
from pipeline.errors import CbirError
from pipeline.store import catalog, reads, schema, vectors


@pytest.fixture(autouse=True)
def fake_model(monkeypatch):
    monkeypatch.setattr(api.models, "cached_embedder", fakes.cached)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_torn_commit_left_by_an_older_cbir_is_repaired(tmp_path):
    imgs = tmp_path / "imgs"
    fakes.make_images(imgs, 12)
    clean, torn = tmp_path / "clean", tmp_path / "torn"
    assert cli("index", imgs, "--batch-size", "4", *opts(clean)).exit_code == 0
    want = snapshot(clean / "c.db")

    # The state a kill left with the old commit: one batch inserted (sqlite-utils
    # committed it on its own) and its vectors written, but next_id not advanced.
    first = sorted(imgs.rglob("*.jpg"))[:8]
    r = cli("index", *first, "--batch-size", "4", *opts(torn))
    assert r.exit_code == 0, r.output
    db = catalog.open_reader(torn / "c.db")
    start = reads.next_id(db)
    db.conn.close()
    con = sqlite3.connect(torn / "c.db")
    with con:
        for i, path in enumerate(sorted(set(imgs.rglob("*.jpg")) - set(first))[:3]):
            con.execute(
                "insert into images (id, path, size, mtime, status) values (?, ?, 1, 1, 'indexed')",
                [start + i, str(path)],
            )
    con.close()

    # Readers ignore the rows past next_id; verify names the damage and the fix.
    r = cli("search", "--id", start, *opts(torn))
    assert r.exit_code == 2 and f"no indexed image with id {start}" in r.output
    r = cli("verify", *opts(torn))
    assert r.exit_code == 1 and "torn commit" in r.output and "--repair" in r.output

    # The next job repairs (one-line notice) and ends exactly like a clean run.
    r = cli("index", imgs, "--batch-size", "4", *opts(torn))
    assert r.exit_code == 0, r.output
    assert "repaired" in r.stderr and "Traceback" not in r.output
    assert_same(snapshot(torn / "c.db"), want, "after repair")
    assert cli("verify", *opts(torn)).exit_code == 0


def test_verify_repair_drops_torn_rows(tmp_path):
    imgs = tmp_path / "imgs"
    fakes.make_images(imgs, 6)
    assert cli("index", imgs, *opts(tmp_path)).exit_code == 0
    con = sqlite3.connect(tmp_path / "c.db")
    with con:
        con.execute("insert into images (id, path, status) values (99, '/x.jpg', 'indexed')")
    con.close()
    r = cli("verify", "--repair", *opts(tmp_path))
    assert r.exit_code == 0, r.output
    assert "repaired: dropped 1 catalog rows" in r.output


def test_reader_of_a_catalog_being_created_says_so_and_writes_nothing(tmp_path):
    cat = tmp_path / "c.db"
    cat.touch()  # what a writer that has just created the file leaves for a moment
    for args in (["search", "--id", "1"], ["info"], ["verify"]):
        r = cli(*args, *opts(tmp_path))
        assert r.exit_code == 2, r.output
        assert "is being created" in r.output and len(r.output.strip().splitlines()) == 1
    assert cat.stat().st_size == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.db"]


def legacy_catalog(path: Path) -> None:
    """A catalog as cbir schema 2 made it (no checksums, no application id)."""
    con = sqlite3.connect(path)
    con.execute("pragma journal_mode = wal")
    with con:
        for sql in schema.MIGRATIONS[0] + schema.MIGRATIONS[1]:
            con.execute(sql)
        con.execute("insert into meta values ('schema_version', '2')")
    con.close()


def test_reader_of_an_older_schema_leaves_it_alone_and_a_writer_upgrades_it(tmp_path):
    imgs = tmp_path / "imgs"
    fakes.make_images(imgs, 4)
    legacy_catalog(tmp_path / "c.db")
    before = digest(tmp_path / "c.db")
    for args in (["search", "--id", "0"], ["info"]):
        r = cli(*args, *opts(tmp_path))
        assert r.exit_code == 2 and "older than this cbir" in r.output, r.output
    assert digest(tmp_path / "c.db") == before
    assert cli("index", imgs, *opts(tmp_path)).exit_code == 0
    assert cli("search", "--id", "0", *opts(tmp_path)).exit_code == 0
    db = catalog.open_reader(tmp_path / "c.db")
    assert reads.get_meta_int(db, "schema_version") == schema.SCHEMA_VERSION


def test_foreign_sqlite_file_is_refused_untouched(tmp_path):
    other = tmp_path / "some.sqlite"
    con = sqlite3.connect(other)
    with con:
        con.execute("create table images (id integer primary key, path text)")
        con.execute("insert into images values (1, 'x')")
    con.close()
    before = digest(other)
    fakes.make_images(tmp_path / "imgs", 1)  # an index job reads its folder first
    for args in (["info"], ["verify"], ["search", "--id", "1"], ["index", tmp_path / "imgs"]):
        r = cli(*args, "--catalog", other, "--index-dir", tmp_path / "idx")
        assert r.exit_code == 2, r.output
        assert "not a cbir catalog" in r.output and "Traceback" not in r.output
    assert digest(other) == before
    assert not Path(str(other) + "-wal").exists()


def test_symlinked_catalog_shares_one_lock_and_one_vector_file(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    alias = tmp_path / "alias.db"
    alias.symlink_to(real / "c.db")
    assert catalog.lock_path(alias) == catalog.lock_path(real / "c.db")
    assert vectors.vectors_path(alias) == vectors.vectors_path(real / "c.db")
    with (
        catalog.write_lock(real / "c.db"),
        pytest.raises(CbirError, match="another cbir job"),
        catalog.write_lock(alias),
    ):
        pass


def test_damaged_vector_rows_are_caught_and_never_indexed(tmp_path):
    imgs = tmp_path / "imgs"
    fakes.make_images(imgs, 10)
    assert cli("index", imgs, *opts(tmp_path)).exit_code == 0
    want = snapshot(tmp_path / "c.db")
    path = vectors.vectors_path(tmp_path / "c.db")
    row = 2048 * 4
    data = bytearray(path.read_bytes())
    data[3 * row : 4 * row] = data[5 * row : 6 * row]  # one row overwritten by another
    data[7 * row + 1] ^= 0x01  # a low-bit flip: still (nearly) a unit vector
    path.write_bytes(bytes(data))

    r = cli("verify", *opts(tmp_path))
    assert r.exit_code == 1 and "2 vectors fail their checksum (ids [3, 7])" in r.output
    # The next index job drops them and embeds those files again, as verify says; it
    # never builds the exact index from the damaged file.
    r = cli("index", imgs, *opts(tmp_path))
    assert r.exit_code == 0 and "model 2" in r.output and "fail their checksum" in r.output
    assert_same(snapshot(tmp_path / "c.db"), want, "after the next job")
    assert cli("verify", *opts(tmp_path)).exit_code == 0
    # Or repair drops them; the next job embeds those files again.
    data = bytearray(path.read_bytes())
    data[-row + 5] ^= 0x10
    path.write_bytes(bytes(data))
    r = cli("verify", "--repair", *opts(tmp_path))
    assert "dropped 1 images whose vectors fail their checksum" in r.output
    r = cli("index", imgs, *opts(tmp_path))
    assert r.exit_code == 0 and "model 1" in r.output, r.output
    assert_same(snapshot(tmp_path / "c.db"), want, "after repair")
    assert cli("verify", *opts(tmp_path)).exit_code == 0


def test_legacy_catalog_gets_checksums_on_upgrade(tmp_path):
    imgs = tmp_path / "imgs"
    fakes.make_images(imgs, 5)
    assert cli("index", imgs, *opts(tmp_path)).exit_code == 0
    con = sqlite3.connect(tmp_path / "c.db")
    with con:
        con.execute("update images set vector_crc = null")
    con.close()
    fakes.reseal(tmp_path / "c.db")  # as an older cbir wrote them: no vector checksums
    r = cli("verify", *opts(tmp_path))
    assert r.exit_code == 0 and "5 vectors have no checksum yet" in r.output
    r = cli("verify", "--repair", *opts(tmp_path))
    assert "recorded checksums of 5 vectors" in r.output
    db = catalog.open_reader(tmp_path / "c.db")
    assert None not in reads.vector_crcs(db).values()


def test_unexpected_error_is_one_line_with_the_traceback_in_a_log(tmp_path, monkeypatch):
    def broken(**_):
        raise ValueError("something nobody expected")

    monkeypatch.setattr(api, "info", broken)
    r = cli("info", *opts(tmp_path))
    assert r.exit_code == 1
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and "unexpected ValueError: something nobody expected" in lines[0]
    log = tmp_path / "c.db.errors.log"
    assert str(log) in lines[0] and "Traceback" in log.read_text()
    r = cli("--debug", "info", *opts(tmp_path))
    assert r.exit_code == 1 and "Traceback" in r.output


def test_disk_full_is_one_line(tmp_path, monkeypatch):
    imgs = tmp_path / "imgs"
    fakes.make_images(imgs, 3)

    def full(*_a, **_k):
        raise OSError(28, "No space left on device", str(tmp_path / "c.vectors"))

    monkeypatch.setattr(vectors, "append", full)
    r = cli("index", imgs, *opts(tmp_path))
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert "disk full while writing" in r.output
    db = catalog.open_reader(tmp_path / "c.db")
    runs = list(db.query("select status from runs"))
    assert runs[-1]["status"] == "failed"
    monkeypatch.undo()
    monkeypatch.setattr(api.models, "cached_embedder", fakes.cached)
    assert cli("index", imgs, *opts(tmp_path)).exit_code == 0
    assert cli("verify", *opts(tmp_path)).exit_code == 0


def test_readers_work_in_a_read_only_folder(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root ignores folder permissions")
    imgs = tmp_path / "imgs"
    fakes.make_images(imgs, 4)
    folder = tmp_path / "ro"
    assert cli("index", imgs, *opts(folder)).exit_code == 0
    folder.chmod(0o555)
    try:
        for args in (["search", "--id", "1"], ["info"], ["verify"]):
            r = cli(*args, *opts(folder))
            assert r.exit_code == 0, r.output
        r = cli("index", imgs, *opts(folder))
        assert r.exit_code == 2 and "writable" in r.output
    finally:
        folder.chmod(0o755)


def test_vectors_checksum_catches_a_single_bit(tmp_path):
    rows = np.random.default_rng(0).standard_normal((4, 2048)).astype(np.float32)
    crcs = dict(enumerate(vectors.crc(rows)))
    flipped = rows.copy()
    flipped.view(np.uint32)[2, 100] ^= 1
    assert vectors.damaged(flipped, np.arange(4), crcs) == [2]


def test_same_file_under_a_second_path_is_one_image(tmp_path):
    real = tmp_path / "real"
    fakes.make_images(real, 6)
    link = tmp_path / "link"
    link.symlink_to(real)
    os.link(real / "red" / "img0_0001.jpg", real / "red" / "hardlink.jpg")
    r = cli("index", real, *opts(tmp_path))
    assert r.exit_code == 0, r.output
    r = cli("index", link, *opts(tmp_path))
    assert r.exit_code == 0, r.output
    db = catalog.open_reader(tmp_path / "c.db")
    paths = [row["path"] for row in db.query("select path from images")]
    assert len(paths) == 6 and all(p.startswith(str(real)) for p in paths)
    r = cli("search", "--id", "0", "-k", "10", "--json", *opts(tmp_path))
    results = [x["path"] for x in json.loads(r.output)["results"]]
    assert len(results) == len(set(results)) == 6


def test_copies_of_indexed_images_do_not_load_the_model(tmp_path, monkeypatch):
    imgs = tmp_path / "imgs"
    made = fakes.make_images(imgs, 4)
    assert cli("index", imgs, *opts(tmp_path)).exit_code == 0
    copies = tmp_path / "copies"
    copies.mkdir()
    for p in made:
        (copies / p.name).write_bytes(p.read_bytes())
    (copies / "broken.jpg").write_bytes(b"\xff\xd8 not really")

    def no_model(*_):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(api.models, "cached_embedder", no_model)
    r = cli("index", copies, *opts(tmp_path))
    assert r.exit_code == 0, r.output
    assert "copied from duplicates 4" in r.output and "failed 1" in r.output


def test_undecodable_file_names_are_stored_and_printed_losslessly(tmp_path):
    imgs = tmp_path / "imgs"
    made = fakes.make_images(imgs, 3)
    odd = os.fsdecode(os.fsencode(str(imgs / "red")) + b"/caf\xe9.jpg")
    made[0].rename(odd)
    odd_label = os.fsdecode(os.fsencode(str(imgs)) + b"/\xff\xfe")
    os.mkdir(odd_label)
    made[1].rename(odd_label + "/x.jpg")
    r = cli("index", imgs, *opts(tmp_path))
    assert r.exit_code == 0, r.output
    assert "indexed 3" in r.output
    db = catalog.open_reader(tmp_path / "c.db")
    rows = {row["path"]: row["label"] for row in db.query("select path, label from images")}
    assert odd in rows and rows[odd_label + "/x.jpg"] == os.path.basename(odd_label)
    # A rerun recognises them (nothing re-indexed), JSON carries them losslessly.
    assert "unchanged 3" in cli("index", imgs, *opts(tmp_path)).output
    r = cli("search", "--id", "0", "--id", "1", "--id", "2", "--json", *opts(tmp_path))
    queries = {json.loads(line)["query"] for line in r.output.splitlines()}
    assert odd in queries
    assert cli("verify", *opts(tmp_path)).exit_code == 0
