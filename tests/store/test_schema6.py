"""Schema 6: each image's date (`taken_at`, `taken_from`), recorded at indexing, migrated.

A catalog written by schema-5 cbir (made here from a schema-6 one by `fakes.as_schema_5`,
as the other migration tests do) is read as it is (rows checked over schema 5's
columns, dates by mtime), then upgraded by the first writer in one transaction: every
row that passed its checksum is sealed anew, a damaged one stays damaged, and the
job dates the unchanged files from their EXIF headers. Fast tier, fake model.
"""

from __future__ import annotations

import json
import os
import sqlite3
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import fakes
from fakes import cli, ok, opts
from pipeline import api
from pipeline.store import catalog, reads, schema, seals

WHEN = datetime(2021, 6, 15, 10, 20, 30).timestamp()
MTIME = datetime(2019, 3, 1, 12).timestamp()


@pytest.fixture(autouse=True)
def fake_model(monkeypatch):
    monkeypatch.setattr(api.models, "cached_embedder", fakes.cached)


def images(root: Path) -> Path:
    """Six JPEGs: two with an EXIF DateTimeOriginal, all with mtime MTIME."""
    folder = root / "imgs"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(3)
    for i in range(6):
        exif = Image.Exif()
        if i < 2:
            exif.get_ifd(0x8769)[0x9003] = "2021:06:15 10:20:30"
        pixels = rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)
        path = folder / f"p{i}.jpg"
        Image.fromarray(pixels).save(path, exif=exif.tobytes())
        os.utime(path, (MTIME, MTIME))
    return folder


def dates_of(cat: Path) -> dict[str, tuple]:
    con = sqlite3.connect(cat)
    rows = con.execute("select path, taken_at, taken_from from images").fetchall()
    con.close()
    return {os.path.basename(p): (t, f) for p, t, f in rows}


def search_ids(root: Path, *args) -> list[int]:
    out = ok(cli("search", "--id", 0, "--json", "-k", 10, *args, *opts(root)))
    return sorted(r["id"] for r in json.loads(out)["results"])


def test_indexing_records_dates(tmp_path):
    ok(cli("index", images(tmp_path), *opts(tmp_path)))
    got = dates_of(tmp_path / "c.db")
    assert got["p0.jpg"] == (WHEN, "exif") and got["p1.jpg"] == (WHEN, "exif")
    assert got["p5.jpg"] == (MTIME, "mtime")
    assert search_ids(tmp_path, "--since", "2021-06-15", "--until", "2021-06-15") == [0, 1]
    assert search_ids(tmp_path, "--until", "2019-03-01") == [2, 3, 4, 5]


def test_a_schema_5_catalog_is_read_then_migrated_and_dated(tmp_path):
    ok(cli("index", images(tmp_path), *opts(tmp_path)))
    cat = tmp_path / "c.db"
    before = ok(cli("search", "--id", 0, "--json", *opts(tmp_path)))
    fakes.as_schema_5(cat)
    assert "taken_at" not in dates_of_columns(cat)
    # A reader takes it as it is: rows checked over schema 5's columns, dates by mtime.
    assert ok(cli("search", "--id", 0, "--json", *opts(tmp_path))) == before
    assert search_ids(tmp_path, "--until", "2019-03-01") == [0, 1, 2, 3, 4, 5]
    ok(cli("verify", *opts(tmp_path)))
    # The next index upgrades it (one transaction) and dates the unchanged files.
    out = ok(cli("index", tmp_path / "imgs", *opts(tmp_path)))
    assert "unchanged 6" in out and "indexed 0" in out
    db = catalog.open_reader(cat)
    assert reads.get_meta_int(db, "schema_version") == schema.SCHEMA_VERSION == 6
    assert all(not seals.bad_rows(db, t) for t in schema.SEALED)
    db.conn.close()
    got = dates_of(cat)
    assert got["p0.jpg"] == (WHEN, "exif") and got["p4.jpg"] == (MTIME, "mtime")
    ok(cli("verify", *opts(tmp_path)))
    assert search_ids(tmp_path, "--since", "2021-06-15") == [0, 1]
    assert ok(cli("search", "--id", 0, "--json", *opts(tmp_path))) == before


def dates_of_columns(cat: Path) -> set[str]:
    con = sqlite3.connect(cat)
    cols = {r[1] for r in con.execute("pragma table_info(images)")}
    con.close()
    return cols


def test_the_migration_never_seals_a_damaged_row(tmp_path):
    ok(cli("index", images(tmp_path), *opts(tmp_path)))
    cat = tmp_path / "c.db"
    fakes.as_schema_5(cat)
    con = sqlite3.connect(cat)
    with con:  # a label changed behind cbir's back: the row fails its checksum
        con.execute("update images set label = 'forged' where id = 3")
    con.execute("pragma wal_checkpoint(truncate)")
    con.close()
    db = catalog.open_writer(cat)  # migrates to schema 6
    assert reads.get_meta_int(db, "schema_version") == 6
    assert seals.bad_rows(db, "images") == [3]
    db.conn.close()
    r = cli("verify", *opts(tmp_path))
    assert r.exit_code == 1 and "(ids [3])" in r.output, r.output


def test_a_schema_4_catalog_migrates_to_6(tmp_path):
    ok(cli("index", images(tmp_path), *opts(tmp_path)))
    cat = tmp_path / "c.db"
    fakes.as_schema_4(cat)
    ok(cli("index", tmp_path / "imgs", *opts(tmp_path)))
    db = catalog.open_reader(cat)
    assert reads.get_meta_int(db, "schema_version") == 6
    assert all(not seals.bad_rows(db, t) for t in schema.SEALED)
    db.conn.close()
    assert dates_of(cat)["p1.jpg"] == (WHEN, "exif")


@pytest.mark.slow
def test_a_crash_at_every_step_of_the_upgrade_and_dating_job(tmp_path):
    """A schema-5 catalog indexed again, killed after each write step (the migration's
    statements, its commit, each batch of dates): every interrupted state verifies, and
    the rerun ends with the clean run's catalog, every row dated."""
    from test_crash_points import crash_every_step

    base = tmp_path / "base"
    folder = images(base)
    ok(cli("index", folder, *opts(base)))
    fakes.as_schema_5(base / "c.db")

    def dated(state: Path) -> None:
        got = dates_of(state / "c.db")
        assert all(t is not None for t, _ in got.values()), got
        assert got["p0.jpg"] == (WHEN, "exif") and got["p3.jpg"] == (MTIME, "mtime")

    steps = crash_every_step(tmp_path, base, ["index", str(folder)], check=dated)
    assert steps >= 8


def test_a_reader_racing_the_upgrade_sees_no_false_damage(tmp_path):
    """A reader that chose schema 5's columns just before a writer upgraded (every row
    sealed anew over schema 6's) checks the rows that seem to fail once more, over the
    columns the table has now: they pass, and a really damaged one still fails."""
    ok(cli("index", images(tmp_path), *opts(tmp_path)))
    cat = tmp_path / "c.db"
    fakes.as_schema_5(cat)
    reader = catalog.open_reader(cat)
    assert not seals.bad_rows(reader, "images")  # its columns chosen: schema 5's
    stale = f"(row_crc is {schema.crc_sql('images', schema.IMAGE_COLUMNS_5)})"
    catalog.open_writer(cat).conn.close()  # the upgrade, between the choice and the query
    sql = f"select id, path, {stale} as intact from images order by id"
    assert [r["id"] for r in reads._checked(reader, sql)] == list(range(6))
    con = sqlite3.connect(cat)
    with con:
        con.execute("update images set label = 'forged' where id = 2")
    con.close()
    with pytest.raises(seals.DamagedRow, match=r"id 2 fails"):
        reads._checked(reader, sql)
    reader.conn.close()
