"""Values in the catalog are checked, not only its pages (issue 17, corruption matrix).

SQLite notices a damaged page structure, but a flipped bit inside a value (a path, a
label, `next_id`, `generation`, an index record's parameters) reads back as another
valid value. Every row of `images`, `meta` and `indexes` carries a checksum; these
tests damage one value in the file itself, keeping its size, and ask every reader:
each must give the undamaged answer, or one `cbir: error:` line and a non-zero exit,
never the changed value. Fast tier, fake model.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import fakes
from fakes import cli, ok, one_line_error, opts
from pipeline import api
from pipeline.errors import CbirError
from pipeline.store import catalog, reads, schema, seals
from pipeline.web import server as serve

Q = 5  # the image whose row is damaged, and the query


@pytest.fixture(autouse=True)
def fake_model(monkeypatch):
    monkeypatch.setattr(api.models, "cached_embedder", fakes.cached)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Any]:
    """16 images in two labels: 12 indexed, index 'ivf' (nprobe=1) built, 4 more indexed
    (index 'old' is left stale at generation 1), 'ivf' rebuilt. The state folder is kept
    as the snapshot each test copies; the images stay where they are (absolute paths)."""
    base = tmp_path_factory.mktemp("trust-catalog")
    made = fakes.make_images(base / "imgs", 16)
    first, state = base / "first", base / "state"
    for p in made[12:]:  # indexed later, by the second job
        (first / p.parent.name).mkdir(parents=True, exist_ok=True)
        p.rename(first / p.parent.name / p.name)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(api.models, "cached_embedder", fakes.cached)
        # Keras fp32: no int8 calibration, which would read every row to choose its images
        keras = ["--runtime", "keras", "--labels", "folder"]
        ok(cli("index", base / "imgs", *keras, *opts(state)), "index")
        ok(cli("build-index", "old", "--factory", "IVF2,Flat", *opts(state)), "old")
        for p in sorted(first.rglob("*.jpg")):
            p.rename(base / "imgs" / p.parent.name / p.name)
        ok(cli("index", base / "imgs", *keras, *opts(state)), "index again")
        ivf = ["--factory", "IVF2,Flat", "--param", "nprobe=1"]
        ok(cli("build-index", "ivf", *ivf, *opts(state)), "ivf")
    checkpoint(state / "c.db")
    with sqlite3.connect(state / "c.db") as con:
        path, label = con.execute("select path, label from images where id = ?", [Q]).fetchone()
        meta = dict(con.execute("select key, value from meta"))
    assert (meta["next_id"], meta["generation"]) == ("16", "2"), meta
    return {"state": state, "path": path, "label": label}


def checkpoint(db: Path) -> None:
    """Everything in the catalog file itself (no WAL to miss)."""
    con = sqlite3.connect(db)
    con.execute("pragma wal_checkpoint(truncate)")
    con.close()


@pytest.fixture
def coll(built, tmp_path) -> Path:
    """A fresh copy of the built state, to damage."""
    shutil.copytree(built["state"], tmp_path / "s")
    return tmp_path / "s"


# --- damage: find a value's bytes in its table's pages, change them, keep the size ------------


def table_offsets(db: Path, table: str, needle: bytes) -> list[int]:
    """Offsets of `needle` in the leaf pages of `table` (not of its SQLite indexes)."""
    con = sqlite3.connect(db)
    size = con.execute("pragma page_size").fetchone()[0]
    pages = {p for (p,) in con.execute("select pageno from dbstat where name = ?", [table])}
    con.close()
    data = Path(db).read_bytes()
    found, at = [], data.find(needle)
    while at >= 0:
        if at // size + 1 in pages:
            found.append(at)
        at = data.find(needle, at + 1)
    return found


def change(db: Path, at: int, new: bytes) -> None:
    with open(db, "r+b") as f:
        f.seek(at)
        f.write(new)


def flip(db: Path, at: int, mask: int) -> None:
    data = bytearray(Path(db).read_bytes())
    data[at] ^= mask
    Path(db).write_bytes(bytes(data))


def damage(built: dict[str, Any], state: Path, what: str) -> None:
    db = state / "c.db"
    if what in ("path-bitflip", "path-random", "label-bitflip"):
        path = built["path"].encode()
        (at,) = table_offsets(db, "images", path)
        if what == "path-bitflip":  # the file name's last digit: another image's name
            flip(db, at + len(path) - len(".jpg") - 1, 0x01)
        elif what == "path-random":  # the file name, as many random bytes
            name = len(Path(built["path"]).name)
            change(db, at + len(path) - name, np.random.default_rng(1).bytes(name))
        else:  # the label follows the path in the row: 'blue' -> 'blud', 'red' -> 'ref'
            label = built["label"].encode()
            at = Path(db).read_bytes().index(label, at + len(path))
            flip(db, at + len(label) - 1, 0x01)
    elif what == "next_id":  # '16' -> '14': ids 14 and 15 would vanish
        (at,) = table_offsets(db, "meta", b"next_id16")
        flip(db, at + len("next_id1"), 0x02)
    elif what == "generation":  # '2' -> '1': the stale index 'old' would pass as fresh
        (at,) = table_offsets(db, "meta", b"generation2")
        change(db, at + len("generation"), b"1")
    elif what == "params":  # ivf's nprobe 1.0 -> 3.0
        (at,) = table_offsets(db, "indexes", b'{"nprobe": 1.0}')
        flip(db, at + len('{"nprobe": '), 0x02)
    else:
        raise ValueError(what)
    assert (state / "c.db").stat().st_size == (built["state"] / "c.db").stat().st_size


# --- the readers ----------------------------------------------------------------------------

COMMANDS = ("search-id", "search-image", "search-ivf", "search-old", "eval-loo", "info", "web")


def run(built: dict[str, Any], state: Path, command: str) -> tuple[int, str, str]:
    """(exit, stdout, stderr) of one reader; the web route's status and JSON error."""
    if command == "web":
        try:
            app = serve.open_app(api.settings_for(catalog=state / "c.db", index_dir=state / "idx"))
        except CbirError as e:  # the server refuses to start: one line
            return e.exit_code, "", f"cbir: error: {e}\n"
        r = app.test_client().post("/api/search", json={"id": Q})
        if r.status_code == 200:
            return 0, r.get_data(as_text=True), ""
        return r.status_code, "", "cbir: error: " + r.get_json()["error"] + "\n"
    args = {
        "search-id": ["search", "--id", Q, "--json"],
        "search-image": ["search", built["path"], "--json"],
        "search-ivf": ["search", "--id", Q, "--index", "ivf", "--json"],
        "search-old": ["search", "--id", Q, "--index", "old", "--json"],
        "eval-loo": ["evaluate", "--leave-one-out", "--json"],
        "info": ["info", "--json"],
    }[command]
    r = cli(*args, *opts(state))
    return r.exit_code, r.stdout, r.stderr


def answer(command: str, out: str) -> Any:
    """What a reader answered, without what changes from run to run."""
    got = json.loads(out) if out.strip() else None
    if command == "info" and got:
        for rec in got["indexes"]:
            rec.pop("file", None)
        got.pop("catalog"), got.pop("vectors_file")
    return got


@pytest.fixture(scope="module")
def reference(built, tmp_path_factory) -> dict[str, tuple[int, Any]]:
    """Each reader's exit and answer on the undamaged copy."""
    state = tmp_path_factory.mktemp("ref") / "s"
    shutil.copytree(built["state"], state)
    out = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(api.models, "cached_embedder", fakes.cached)
        for c in COMMANDS:
            code, stdout, _ = run(built, state, c)
            out[c] = (code, answer(c, stdout))
    assert all(code == 0 for c, (code, _) in out.items() if c != "search-old"), out
    assert out["search-old"][0] == 2  # stale: refused until rebuilt
    return out


DAMAGES = ("path-bitflip", "path-random", "label-bitflip", "next_id", "generation", "params")


@pytest.mark.parametrize("what", DAMAGES)
@pytest.mark.parametrize("command", COMMANDS)
def test_a_damaged_value_is_never_served(built, reference, coll, what, command):
    damage(built, coll, what)
    code, stdout, stderr = run(built, coll, command)
    if command == "web" and what not in ("next_id", "generation"):
        assert code in (0, 500), (code, stderr)  # it starts; only a route needing the row fails
    if code == 0:
        assert reference[command] == (0, answer(command, stdout)), f"{what}: a different answer"
        assert built["path"] in stdout or command in ("eval-loo", "info", "search-old")
        return
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cbir: error: "), stderr
    assert "Traceback" not in stderr and "(a bug" not in stderr
    if reference[command][0] == 0 or what == "generation":  # not the stale refusal itself
        assert "checksum" in lines[0], lines[0]


@pytest.mark.parametrize("what", ["path-bitflip", "label-bitflip", "params"])
def test_the_exact_search_is_unhurt_by_a_damaged_row_outside_its_answer(built, coll, what):
    """A search whose answer holds no damaged row answers as before (the exact index is
    rebuilt in memory if its own record is damaged)."""
    far = [r for r in range(16) if r != Q]
    want = ok(cli("search", "--id", far[0], "-k", 1, "--json", *opts(built["state"])))
    damage(built, coll, what)
    assert ok(cli("search", "--id", far[0], "-k", 1, "--json", *opts(coll))) == want


def test_verify_names_every_damaged_row_and_repair_drops_image_rows(built, coll):
    damage(built, coll, "path-bitflip")
    damage(built, coll, "params")
    r = cli("verify", *opts(coll))
    assert r.exit_code == 1, r.output
    assert f"1 catalog rows fail their checksum (ids [{Q}])" in r.output
    assert "record of index 'ivf' fails its checksum" in r.output
    # Repair drops the image row (its file is indexed again by the next job) but cannot
    # invent an index record: that one is rebuilt from options.
    r = cli("verify", "--repair", *opts(coll))
    assert f"dropped 1 images whose catalog rows fail their checksum (ids [{Q}])" in r.output
    one_line_error(cli("search", "--id", Q, "--index", "ivf", *opts(coll)), 1)
    ok(cli("build-index", "ivf", "--factory", "IVF2,Flat", *opts(coll)), "rebuild ivf")
    r = ok(cli("index", Path(built["path"]).parent.parent, "--labels", "folder", *opts(coll)))
    assert "model 1" in r, r
    assert "verify: ok" in ok(cli("verify", *opts(coll)))
    found = json.loads(ok(cli("search", built["path"], "-k", 1, "--json", *opts(coll))))
    assert found["results"][0]["path"] == built["path"]


def test_damaged_meta_is_one_line_for_writers_too(built, coll):
    damage(built, coll, "next_id")
    before = (coll / "c.vectors").read_bytes()
    imgs = Path(built["path"]).parent.parent
    for args in (["index", imgs], ["build-index", "ivf"], ["verify", "--repair"]):
        line = one_line_error(cli(*args, *opts(coll)), 1)
        assert "'next_id' fails its checksum" in line and "backup" in line, line
    assert (coll / "c.vectors").read_bytes() == before
    r = cli("verify", *opts(coll))
    assert r.exit_code == 1 and "'next_id' fails its checksum" in r.output


def test_schema_4_catalog_is_read_unchecked_and_sealed_by_the_first_writer(built, coll):
    want = ok(cli("search", "--id", Q, "--json", *opts(coll)))
    fakes.as_schema_4(coll / "c.db")
    assert ok(cli("search", "--id", Q, "--json", *opts(coll))) == want
    assert "carry no checksums yet" in ok(cli("verify", *opts(coll)))
    r = ok(cli("verify", "--repair", *opts(coll)))  # a writer: upgrades in one transaction
    assert "no checksums" not in r, r
    db = catalog.open_reader(coll / "c.db")
    assert reads.get_meta_int(db, "schema_version") == schema.SCHEMA_VERSION
    assert all(not seals.bad_rows(db, t) for t in schema.SEALED)
    db.conn.close()
    checkpoint(coll / "c.db")
    damage(built, coll, "path-bitflip")  # now protected
    one_line_error(cli("search", "--id", Q, *opts(coll)), 1)


def test_row_checksum_encoding_tells_values_apart():
    crc = seals.row_crc
    assert crc("images", 1, b"ab", None) != crc("images", 1, b"a", b"b")
    assert crc("images", 1, None) != crc("images", 1, b"")
    assert crc("images", 1, 2.0) != crc("images", 1, 2)
    assert crc("meta", b"next_id", b"16") != crc("meta", b"next_id", b"14")
    assert crc("images", 1, b"a'b", b"") != crc("images", 1, b"a", b"b")
