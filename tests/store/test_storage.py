"""Fast tests of the storage layer: catalog schema and migrations, the vector file and its
recovery, the Collection, job planning, and the index choice function."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import numpy as np
import pytest

import fakes
from pipeline import files
from pipeline.errors import CbirError
from pipeline.ingest.plan import make_plan
from pipeline.inputs.scan import scan
from pipeline.retrieval import autoindex, exact
from pipeline.store import catalog, collection, reads, schema, vectors, writes


def row(i: int, path: str, status: str = "indexed", **extra) -> dict:
    return {"id": i, "path": path, "status": status, "size": 1, "mtime": 1.0, **extra}


# --- catalog ---------------------------------------------------------------------------------


def test_new_catalog_gets_the_whole_schema_in_one_transaction(tmp_path):
    db = catalog.open_writer(tmp_path / "c.db")
    assert reads.get_meta_int(db, "schema_version") == schema.SCHEMA_VERSION
    assert db.conn.execute("pragma application_id").fetchone()[0] == schema.APP_ID
    assert db.conn.execute("pragma journal_mode").fetchone()[0] == "wal"
    cols = {r[1] for r in db.conn.execute("pragma table_info(images)")}
    assert {"vector_crc", "file_key", "path", "status"} <= cols


def test_migration_from_schema_2_keeps_rows(tmp_path):
    path = tmp_path / "c.db"
    con = sqlite3.connect(path)
    with con:
        for sql in schema.MIGRATIONS[0] + schema.MIGRATIONS[1]:
            con.execute(sql)
        con.execute("insert into meta values ('schema_version', '2')")
        con.execute("insert into images (id, path, status) values (0, '/a.jpg', 'indexed')")
    con.close()
    db = catalog.open_writer(path)
    assert reads.get_meta_int(db, "schema_version") == schema.SCHEMA_VERSION
    assert [r["path"] for r in db.query("select path from images")] == ["/a.jpg"]


def test_a_failed_transaction_leaves_nothing(tmp_path):
    db = catalog.open_writer(tmp_path / "c.db")
    with pytest.raises(sqlite3.IntegrityError):
        writes.commit_batch(db, [row(0, "/a.jpg"), row(1, "/a.jpg")], [], 2)  # same path twice
    assert reads.next_id(db) == 0
    assert db.conn.execute("select count(*) from images").fetchone()[0] == 0
    writes.commit_batch(db, [row(0, "/a.jpg"), row(1, "/b.jpg")], [], 2)
    assert reads.next_id(db) == 2 and reads.generation(db) == 1


def test_writes_outside_a_transaction_are_refused(tmp_path):
    db = catalog.open_writer(tmp_path / "c.db")
    with pytest.raises(RuntimeError, match="writes.transaction"):
        writes.write(db, "delete from images")


def test_rows_past_next_id_are_invisible_to_readers(tmp_path):
    db = catalog.open_writer(tmp_path / "c.db")
    writes.commit_batch(db, [row(0, "/a.jpg")], [], 1)
    with writes.transaction(db):
        writes.write(db, "insert into images (id, path, status) values (5, '/x.jpg', 'indexed')")
    assert reads.indexed_ids(db).tolist() == [0]
    assert 5 not in reads.lookup(db, [0, 5])


def test_undecodable_names_round_trip(tmp_path):
    db = catalog.open_writer(tmp_path / "c.db")
    odd = os.fsdecode(b"/photos/caf\xe9.jpg")
    writes.commit_batch(db, [row(0, odd, label=os.fsdecode(b"\xff"))], [], 1)
    assert odd in reads.rows_by_path(db)
    assert reads.lookup(db, [0])[0]["label"] == os.fsdecode(b"\xff")
    assert files.shown(odd) == "/photos/caf\ufffd.jpg"


# --- vector file -----------------------------------------------------------------------------


def test_vector_file_append_recover_and_check(tmp_path):
    path, dim = tmp_path / "c.vectors", 4
    vectors.append(path, 0, np.eye(4, dtype=np.float32)[:2])
    vectors.append(path, 2, np.eye(4, dtype=np.float32)[2:])
    with path.open("ab") as f:
        f.write(b"\x01" * 10)  # a torn row from a crash
    assert vectors.row_count(path, dim) == 4
    assert vectors.recover(path, dim, 3) == 2  # one whole uncommitted row and the torn one
    assert path.stat().st_size == 3 * dim * 4
    np.testing.assert_array_equal(vectors.read(path, dim, 3, [2]), np.eye(4)[2:3])
    with pytest.raises(CbirError, match="truncated or replaced"):
        vectors.check(path, dim, 5)
    with pytest.raises(CbirError, match="out of range"):
        vectors.read(path, dim, 3, [3])


def _rows_and_meta(path: Path) -> tuple[list, list]:
    """Every images row and meta value, as stored (no vector file needed)."""
    with sqlite3.connect(path) as con:
        return (
            con.execute("select * from images order by id").fetchall(),
            con.execute("select * from meta order by key").fetchall(),
        )


def test_collection_repairs_torn_rows_and_cut_vectors(tmp_path, monkeypatch):
    import pipeline
    from pipeline import api

    monkeypatch.setattr(api.models, "cached_embedder", fakes.cached)
    fakes.make_images(tmp_path / "imgs", 6)
    pipeline.index(
        [tmp_path / "imgs"], catalog=str(tmp_path / "c.db"), index_dir=str(tmp_path / "i")
    )
    vec = vectors.vectors_path(tmp_path / "c.db")
    with open(vec, "r+b") as f:  # the last two vectors were cut
        f.truncate(4 * 2048 * 4)
    before = _rows_and_meta(tmp_path / "c.db")
    # Vectors are fsynced before their rows commit, so a short file is damage: every
    # writer refuses it, changing nothing (it used to drop the rows and pad the file).
    with pytest.raises(CbirError, match="truncated or replaced.*verify --repair"):
        collection.writing(tmp_path / "c.db", tmp_path / "i", create=False).__enter__()
    assert vec.stat().st_size == 4 * 2048 * 4 and _rows_and_meta(tmp_path / "c.db") == before
    # Only `verify --repair` drops the rows whose vectors are gone.
    with collection.writing(tmp_path / "c.db", tmp_path / "i", False, drop_lost=True) as coll:
        assert any("dropped 2 catalog rows" in line for line in coll.repaired)
        assert coll.indexed_ids().tolist() == [0, 1, 2, 3]
        assert vectors.row_count(vec, 2048) == coll.next_id == 6  # padded: ids never reused


# --- job planning ----------------------------------------------------------------------------


def test_plan_new_changed_unchanged_relabelled_and_aliases(tmp_path):
    made = fakes.make_images(tmp_path / "imgs", 4)
    db = catalog.open_writer(tmp_path / "c.db")
    scanned = list(scan([tmp_path / "imgs"]))
    by_name = {Path(f.path).name: f for f in scanned}
    a, b, c = (by_name[p.name] for p in made[:3])
    writes.commit_batch(
        db,
        [
            row(0, a.path, size=a.size, mtime=a.mtime, label=a.label),  # unchanged
            row(1, b.path, size=b.size, mtime=b.mtime, label="old"),  # relabelled
            row(2, c.path, size=c.size + 1, mtime=c.mtime, label=c.label),  # changed
        ],
        [],
        3,
    )
    os.link(made[3], tmp_path / "imgs" / "red" / "zz_hardlink.jpg")
    plan = make_plan(db, list(scan([tmp_path / "imgs"])), retry_failed=False)
    assert plan.unchanged == 2 and plan.relabel == {1: b.label}
    assert plan.replaced == {c.path: 2}
    assert sorted(Path(f.path).name for f in plan.todo) == sorted(
        [c.path.split("/")[-1], made[3].name]
    )
    assert plan.aliases == 1  # the hard link to a file that is new in this same scan


# --- exact search and the index choice -------------------------------------------------------


def test_exact_top_k_gives_real_scores_and_pads():
    rows = np.eye(3, dtype=np.float32)
    scores, ids = exact.top_k(rows, np.arange(3), rows[:1], k=5)
    assert ids[0].tolist() == [0, 1, 2, -1, -1]
    assert scores[0, 0] == 1.0 and scores[0, 1] == 0.0 and scores[0, 3] == -np.inf


@pytest.mark.parametrize(
    "n, budget, kind",
    [
        (1_000, 1 << 30, "Flat"),
        (50_000, 1 << 31, "HNSW32"),
        (200_000, 1 << 31, "IVF"),
        (1_000_000, 1 << 31, "PQ"),
    ],
)
def test_choice_follows_its_named_thresholds(n, budget, kind):
    assert kind in autoindex.choose(n, 2048, budget).factory


def test_choice_thresholds_are_parameters():
    assert autoindex.choose(1_000, 2048, 1 << 30, flat_threshold=500).factory.startswith("HNSW")
    assert autoindex.choose(50_000, 2048, 1 << 31, hnsw_threshold=10_000).factory.startswith("IVF")
    choice = autoindex.choose(1_000_000, 2048, 1 << 31, pq_refine=20)
    assert choice.params["refine"] == 20
