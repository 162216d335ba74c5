"""A vector row that fails its CRC-32 is treated as missing by every search, refused by
`evaluate`, dropped by the next `cbir index`, and a 0-byte catalog never costs the vector
file (fast tier, fake model).

The reference for "missing" is the same collection with the damaged row dropped by
`cbir verify --repair`: every reader must rank the damaged collection exactly as that one.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest

import fakes
from fakes import assert_same, cli, ok, one_line_error, opts, snapshot
from pipeline import api
from pipeline.retrieval import indexes
from pipeline.store import vectors

N = 40
BAD = 7  # the damaged row
K = N - 1  # whole rankings: every image but the damaged one


@pytest.fixture(autouse=True)
def fake_model(monkeypatch):
    monkeypatch.setattr(api.models, "cached_embedder", fakes.cached)


def options(folder: Path) -> dict[str, str]:
    return {"catalog": str(folder / "c.db"), "index_dir": str(folder / "idx")}


def damage_row(folder: Path, row: int) -> None:
    """16 bytes of 0x7f at the start of a row: floats of 3.4e38, the size unchanged."""
    with open(vectors.vectors_path(folder / "c.db"), "r+b") as f:
        f.seek(row * 2048 * 4)
        f.write(b"\x7f" * 16)


def path_of(folder: Path, image_id: int) -> str:
    with sqlite3.connect(folder / "c.db") as con:
        return con.execute("select path from images where id = ?", [image_id]).fetchone()[0]


@pytest.fixture(scope="module")
def damaged(tmp_path_factory) -> dict[str, Path]:
    """40 images indexed (with approximate indexes 'flat2' and 'ivf'), row 7 damaged;
    'ref' is a copy whose row 7 `verify --repair` dropped: the answers to expect."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(api.models, "cached_embedder", fakes.cached)
        tmp = tmp_path_factory.mktemp("trust")
        fakes.make_images(tmp / "imgs", N)
        coll = tmp / "coll"
        ok(cli("index", tmp / "imgs", *opts(coll)), "index")
        ok(cli("build-index", "flat2", "--factory", "Flat", *opts(coll)), "flat2")
        ok(cli("build-index", "ivf", "--factory", "IVF2,Flat", "--param", "nprobe=2", *opts(coll)))
        damage_row(coll, BAD)
        ref = tmp / "ref"
        shutil.copytree(coll, ref)
        r = cli("verify", "--repair", *opts(ref))
        assert "dropped 1 images whose vectors fail their checksum" in r.output, r.output
        return {"coll": coll, "ref": ref, "imgs": tmp / "imgs"}


def ranking(answer: dict) -> tuple[list[int], list[float]]:
    ids = [r["id"] for r in answer["results"]]
    scores = [r["score"] for r in answer["results"]]
    assert all(math.isfinite(s) and -1.001 <= s <= 1.001 for s in scores), scores
    return ids, scores


def assert_same_ranking(got: dict, want: dict) -> None:
    got_ids, got_scores = ranking(got)
    want_ids, want_scores = ranking(want)
    assert BAD not in got_ids
    assert got_ids == want_ids
    np.testing.assert_allclose(got_scores, want_scores, atol=1e-5)


def test_search_by_id_of_a_damaged_row_is_one_line(damaged):
    line = one_line_error(cli("search", "--id", BAD, *opts(damaged["coll"])), 1)
    assert f"id {BAD} fails its checksum" in line and "cbir verify --repair" in line
    r = cli("search", "--id", 3, "--relevant", BAD, *opts(damaged["coll"]))
    assert f"id {BAD} fails its checksum" in one_line_error(r, 1)


@pytest.mark.parametrize(
    "how",
    [
        {},
        {"rerank": "dba+aqe"},
        {"rerank": "dba"},
        {"index": "flat2"},
        {"index": "ivf", "rerank": "dba+aqe"},
        {"relevant": [8, 9]},
    ],
    ids=["exact", "dba+aqe", "dba", "flat2", "ivf+rerank", "relevant"],
)
def test_image_query_ranks_as_without_the_damaged_row(damaged, how):
    # Every fake vector is positive, so the damaged row (3.4e38) tops every query today.
    query = path_of(damaged["coll"], BAD)  # the damaged image's own file
    got = api.search(query, k=K, **how, **options(damaged["coll"]))[0]
    # The reference is the repaired copy; its approximate indexes are stale, so it ranks exactly.
    want = api.search(query, k=K, **{**how, "index": "exact"}, **options(damaged["ref"]))[0]
    assert_same_ranking(got, want)
    got = api.search(3, k=K, **how, **options(damaged["coll"]))[0]
    want = api.search(3, k=K, **{**how, "index": "exact"}, **options(damaged["ref"]))[0]
    assert_same_ranking(got, want)


@pytest.mark.parametrize("exact", ["vector file", "rebuilt in memory"])
def test_exact_search_without_the_saved_exact_index(damaged, exact, tmp_path, monkeypatch):
    coll = tmp_path / "coll"
    shutil.copytree(damaged["coll"], coll)
    if exact == "vector file":  # what large collections search (no FAISS copy of the vectors)
        monkeypatch.setattr(indexes, "EXACT_FROM_FILE_BYTES", 0)
    else:  # a missing exact index is rebuilt by the reader from the vector file
        for f in (coll / "idx").glob("exact*.faiss"):
            f.unlink()
    query = path_of(coll, BAD)
    for how in ({}, {"rerank": "dba+aqe"}):
        got = api.search(query, k=K, **how, **options(coll))[0]
        want = api.search(query, k=K, **how, **options(damaged["ref"]))[0]
        assert_same_ranking(got, want)


def test_cli_search_gives_one_notice_and_no_damaged_row(damaged):
    r = cli("search", path_of(damaged["coll"], BAD), "--json", "-k", K, *opts(damaged["coll"]))
    assert r.exit_code == 0, r.output
    notices = r.stderr.strip().splitlines()
    assert len(notices) == 1 and "left out of results" in notices[0], r.stderr
    assert f"id {BAD} fails its checksum" in notices[0] and "verify --repair" in notices[0]
    want = api.search(path_of(damaged["coll"], BAD), k=K, **options(damaged["ref"]))[0]
    assert_same_ranking(json.loads(r.stdout), want)


def _queries_csv(folder: Path, out: Path) -> Path:
    """A query manifest (path,label) of the catalog's own images but the damaged one."""
    with sqlite3.connect(folder / "c.db") as con:
        rows = con.execute("select path, label from images where id != ? order by id", [BAD])
        with open(out, "w", newline="") as f:
            csv.writer(f).writerows([("path", "label"), *rows.fetchall()[:8]])
    return out


def _groundtruth_csv(folder: Path, out: Path) -> Path:
    """query,relevant pairs that do not name the damaged image."""
    with sqlite3.connect(folder / "c.db") as con:
        sql = "select path from images where id != ? order by id"
        paths = [p for (p,) in con.execute(sql, [BAD])]
    with open(out, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["query", "relevant"])
        w.writerows(zip(paths[0:20:2], paths[1:20:2], strict=True))
    return out


@pytest.mark.parametrize("form", ["leave-one-out", "queries", "groundtruth", "index"])
def test_evaluate_refuses_a_damaged_row(damaged, tmp_path, form):
    """A figure over fewer images than indexed is a wrong answer: every form of evaluate
    refuses in one line naming the row and `verify --repair` (not the CSV), and answers
    once `verify --repair` dropped it. (Before: exit 0 over 39 of the 40 images.)"""
    args = {
        "leave-one-out": ["--leave-one-out"],
        "queries": [_queries_csv(damaged["coll"], tmp_path / "q.csv")],
        "groundtruth": ["--groundtruth", _groundtruth_csv(damaged["coll"], tmp_path / "gt.csv")],
        "index": ["--leave-one-out", "--index", "ivf"],
    }[form]
    line = one_line_error(cli("evaluate", *args, "--json", *opts(damaged["coll"])), 1)
    assert f"id {BAD} fails its checksum" in line and "verify --repair" in line, line
    assert ".csv" not in line, line  # the damage is the vector file's, not the CSV's
    if form != "index":  # the repaired copy's 'ivf' is stale until rebuilt
        r = cli("evaluate", *args, "--json", *opts(damaged["ref"]))
        assert r.exit_code == 0 and json.loads(r.stdout)["database"] == N - 1, r.output


def test_web_search_leaves_the_damaged_row_out(damaged):
    pytest.importorskip("flask")
    from pipeline.web import server as serve

    app = serve.open_app(
        api.settings_for(**options(damaged["coll"])), thumbs_dir=damaged["coll"] / "thumbs"
    )
    client = app.test_client()
    r = client.post("/api/search", json={"id": 3, "k": K, "rerank": "dba+aqe"})
    assert r.status_code == 200, r.data
    want = api.search(3, k=K, rerank="dba+aqe", **options(damaged["ref"]))[0]
    assert_same_ranking(r.get_json(), want)
    r = client.post("/api/search", json={"id": BAD})
    assert r.status_code == 500 and "fails its checksum" in r.get_json()["error"]


def test_next_index_job_drops_and_embeds_the_damaged_row_again(damaged, tmp_path):
    coll = tmp_path / "coll"
    shutil.copytree(damaged["coll"], coll)
    before = snapshot(damaged["ref"] / "c.db")  # 39 images, as they were before the damage
    r = cli("verify", *opts(coll))
    assert r.exit_code == 1 and "(or the next 'cbir index') drops them" in r.output, r.output
    r = cli("index", damaged["imgs"], *opts(coll))
    assert r.exit_code == 0, r.output
    assert "model 1" in r.stdout, r.stdout  # only the damaged image is embedded again
    assert "dropped 1 images whose vectors fail their checksum" in r.stderr, r.stderr
    after = snapshot(coll / "c.db")
    assert_same({p: v for p, v in after.items() if p in before}, before, "the 39 others")
    # The damaged image's vector is the one it had before: equal to a fresh embedding.
    fresh = tmp_path / "fresh"
    ok(cli("index", damaged["imgs"], *opts(fresh)))
    bad_path = path_of(damaged["coll"], BAD)
    want = snapshot(fresh / "c.db")[bad_path][6]
    np.testing.assert_allclose(after[bad_path][6], want, atol=1e-5)
    r = cli("verify", *opts(coll))
    assert r.exit_code == 0, r.output
    r = cli("index", damaged["imgs"], *opts(coll))  # and the job after that has nothing to do
    assert r.exit_code == 0 and "model 0" in r.stdout and not r.stderr, r.output


def test_zero_byte_catalog_beside_vectors_is_refused_untouched(tmp_path):
    imgs = tmp_path / "imgs"
    fakes.make_images(imgs, 5)
    ok(cli("index", imgs, *opts(tmp_path)))
    vec = vectors.vectors_path(tmp_path / "c.db")
    digest = hashlib.sha256(vec.read_bytes()).hexdigest()
    assert vec.stat().st_size == 5 * 2048 * 4
    (tmp_path / "c.db").write_bytes(b"")  # a failed copy, a full disk, '> c.db'
    for leftover in ("c.db-wal", "c.db-shm"):
        (tmp_path / leftover).unlink(missing_ok=True)
    line = one_line_error(cli("index", imgs, *opts(tmp_path)), 2)
    assert "is empty (0 bytes)" in line and "restore it from a backup" in line.lower()
    assert "move c.vectors away" in line
    assert hashlib.sha256(vec.read_bytes()).hexdigest() == digest
    assert (tmp_path / "c.db").stat().st_size == 0
    # Moving the vector file away, as told, starts a new catalog.
    vec.rename(tmp_path / "old.vectors")
    ok(cli("index", imgs, *opts(tmp_path)))
    assert cli("verify", *opts(tmp_path)).exit_code == 0
