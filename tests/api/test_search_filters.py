"""Filtered search and the score cut-off from the Python API and `cbir search`.

Fast tier, fake model: 48 small JPEGs in folders a/ (labels red, blue), ab/ (a
folder whose name starts like a/'s) and c/, some with EXIF dates; an exact, an IVF
and a PQ index. Each filtered answer is checked against the catalog itself.
"""

from __future__ import annotations

import json
import os
import sqlite3
from datetime import datetime
from pathlib import Path

import pytest
from PIL import Image

import fakes
import pipeline
from fakes import assert_refused, cli, ok, opts
from pipeline import api
from pipeline.retrieval import restricted

JUNE = datetime(2021, 6, 15, 10).timestamp()


@pytest.fixture(scope="module")
def coll(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("filters")
    fakes.make_images(root / "imgs" / "a", 24, seed=1)
    fakes.make_images(root / "imgs" / "ab", 12, seed=2)
    fakes.make_images(root / "imgs" / "c", 12, seed=3)
    for i, path in enumerate(sorted((root / "imgs" / "c").rglob("*.jpg"))):
        if i % 2:  # half of c/ carries an EXIF date in June 2021
            exif = Image.Exif()
            exif.get_ifd(0x8769)[0x9003] = "2021:06:15 10:00:00"
            Image.open(path).save(path, exif=exif.tobytes())
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(api.models, "cached_embedder", fakes.cached)
        ok(cli("index", root / "imgs", *opts(root)))
        ok(cli("build-index", "ivf", "--factory", "IVF4,Flat", *opts(root)))
        ok(cli("build-index", "pq", "--factory", "PQ8x4", *opts(root)))
    return root


def rows(root: Path) -> dict[int, dict]:
    con = sqlite3.connect(root / "c.db")
    con.row_factory = sqlite3.Row
    out = {r["id"]: dict(r) for r in con.execute("select * from images")}
    con.close()
    return out


def search(root: Path, query=0, **options) -> dict:
    return pipeline.search(
        query, catalog=str(root / "c.db"), index_dir=str(root / "idx"), **options
    )[0]


@pytest.mark.parametrize("index", ["exact", "ivf", "pq"])
def test_a_folder_filter_keeps_k_results(coll, index):
    """a/ holds 24 images (of 48), ab/ 12: k = 20 of a/ come back, none of ab/."""
    folder = str(coll / "imgs" / "a")
    answer = search(coll, 30, under=folder, k=20, index=index)  # a query from c/
    catalog = rows(coll)
    assert len(answer["results"]) == 20
    assert all(catalog[r["id"]]["path"].startswith(folder + os.sep) for r in answer["results"])
    assert answer["filter"] == {"under": [folder], "matching": 24}
    scores = [r["score"] for r in answer["results"]]
    assert scores == sorted(scores, reverse=True) and "notice" not in answer


def test_labels_and_dates_pass_as_the_catalog_says(coll):
    catalog = rows(coll)
    answer = search(coll, 0, label=["red"], k=100)
    want = {i for i, r in catalog.items() if r["label"] == "red"}
    assert {r["id"] for r in answer["results"]} == want and want
    answer = search(coll, 0, since="2021-06-15", until="2021-06-15", k=100)
    june = {i for i, r in catalog.items() if r["taken_from"] == "exif"}
    assert {r["id"] for r in answer["results"]} == june and len(june) == 6
    assert all(catalog[i]["taken_at"] == JUNE for i in june)
    answer = search(coll, 0, since="2021-06-16", k=100)  # the rest: today's mtimes
    assert {r["id"] for r in answer["results"]} == set(catalog) - june
    answer = search(coll, 0, under=[str(coll / "imgs" / "c")], until="2021-06-15", k=100)
    assert {r["id"] for r in answer["results"]} == june


def test_min_score_drops_results_below_it(coll):
    full = search(coll, 5, k=48)["results"]
    cut = sorted(r["score"] for r in full)[len(full) // 2]
    kept = search(coll, 5, k=48, min_score=cut)["results"]
    assert kept == [r for r in full if r["score"] >= cut] and 0 < len(kept) < len(full)
    assert search(coll, 5, min_score=1.0)["results"][0]["id"] == 5  # itself, cosine 1
    with_rerank = search(coll, 5, k=10, min_score=cut, rerank="aqe", shortlist=20)["results"]
    assert all(r["score"] >= cut for r in with_rerank)


def test_an_index_that_cannot_filter_says_when_it_runs_short(coll, monkeypatch, caplog):
    monkeypatch.setattr(restricted, "SCAN_MAX", 0)
    monkeypatch.setattr(restricted, "OVERFETCH_MAX", 8)
    monkeypatch.setattr(restricted, "GROWTH", 1)  # the nearest k, and no deeper
    answer = search(coll, 0, under=str(coll / "imgs" / "ab"), k=10, index="pq")
    assert len(answer["results"]) < 10
    assert "--index exact finds them all" in answer["notice"]
    assert any("--index exact" in r.getMessage() for r in caplog.records)
    exact = search(coll, 0, under=str(coll / "imgs" / "ab"), k=10)
    assert len(exact["results"]) == 10 and "notice" not in exact


def test_cli_filters_print_and_refuse(coll):
    out = ok(cli("search", "--id", 3, "--under", coll / "imgs" / "ab", "--label", "blue",
                 "--min-score", "-0.5", *opts(coll)))  # fmt: skip
    assert "filter: under" in out and "labels blue" in out and "images match" in out
    line = json.loads(ok(cli("search", "--id", 3, "--json", "--since", "2021-06-15T00:00Z",
                             *opts(coll))))  # fmt: skip
    assert "since" in line["filter"] and line["filter"]["matching"] > 0


@pytest.mark.parametrize(
    "args, words",
    [
        (["--since", "2021-6-1"], "since must be a date"),
        (["--until", "tomorrow"], "until must be a date"),
        (["--since", "2021-06-15T10:00+25:00"], "since must be a date"),
        (["--since", "2022-01-01", "--until", "2021-01-01"], "is after until"),
        (["--under", ""], "under must be a non-empty text"),
        (["--label", "x" * 5000], "label must be a non-empty text"),
        (["--min-score", "nan"], "--min-score"),
        (["--min-score", "1.5"], "--min-score"),
        (["--min-score", "1e999"], "--min-score"),
        (["--min-score", "abc"], "--min-score"),
    ],
)
def test_bad_filter_options_are_refused_in_one_line(coll, args, words):
    assert_refused(cli("search", "--id", 0, *args, *opts(coll)), words)


def test_min_score_in_a_config_file_is_checked(coll, tmp_path):
    config = tmp_path / "c.toml"
    config.write_text("min_score = 2\n")
    assert_refused(cli("search", "--id", 0, "--config", config, *opts(coll)), "min_score")
    config.write_text("min_score = 0.999\n")
    out = json.loads(ok(cli("search", "--id", 0, "--json", "--config", config, *opts(coll))))
    assert [r["id"] for r in out["results"]] == [0]
