"""`cbir evaluate --groundtruth`: instance benchmarks (Holidays mAP, UKBench N-S score).

Fast tier: the fake model, and rankings fixed by hand whose figures are worked
out below as fractions. One slow test runs the real model on part of holidays150.
"""

from __future__ import annotations

import csv
import json
import shutil
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

import fakes
import pipeline
from fakes import assert_refused, cli, opts
from pipeline import api
from pipeline.evaluation import common
from pipeline.evaluation import instances as instance_eval
from pipeline.store import catalog, reads, vectors

N = 14  # catalog images img0_0000.jpg ... img0_0013.jpg (fakes.make_images, seed 0)


def name(i: int) -> str:
    return f"img0_{i:04d}.jpg"


@pytest.fixture(autouse=True)
def fake_model(request, monkeypatch):
    if not request.node.get_closest_marker("slow"):  # the slow test runs the real model
        monkeypatch.setattr(api.models, "cached_embedder", fakes.cached)


@pytest.fixture(scope="module")
def coll(tmp_path_factory) -> Path:
    """14 fake images in imgs/red and imgs/blue, indexed once; tests only read it."""
    root = tmp_path_factory.mktemp("groundtruth")
    fakes.make_images(root / "imgs", N)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(api.models, "cached_embedder", fakes.cached)
        assert cli("index", root / "imgs", *opts(root)).exit_code == 0
    return root


def write_csv(path: Path, pairs: list[tuple[str, str]], header=("query", "relevant")) -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(pairs)
    return path


def ids_by_number(folder: Path) -> dict[int, int]:
    """Image number (the 0013 in img0_0013.jpg) -> catalog id."""
    db = catalog.open_reader(folder / "c.db")
    try:
        return {int(Path(r["path"]).stem[-4:]): r["id"] for r in db.query("select id, path from images")}  # fmt: skip
    finally:
        db.conn.close()


# Ground truth and full rankings (query included), by image number.
PAIRS = [(0, 1), (0, 2), (3, 4), (5, 0), (5, 1), (5, 13)]
RANKINGS = {
    0: [0, 3, 1, 4, 2, 5, 6, 7, 8, 9, 10, 11, 12, 13],
    3: [4, 3, 0, 1, 2, 5, 6, 7, 8, 9, 10, 11, 12, 13],  # the query itself second
    5: [5, 0, 6, 1, 7, 8, 9, 10, 11, 12, 2, 3, 13, 4],
}
# Query excluded (Holidays): q0 -> [3, 1, 4, 2, ...]: 1 at rank 2, 2 at rank 4.
#   q3 -> [4, 0, ...]: 4 at rank 1.  q5 -> [0, 6, 1, 7, 8, 9, 10, 11, 12, 2, 3, 13, 4]:
#   0 at rank 1, 1 at rank 3, 13 at rank 12.
AP = {
    0: (Fraction(1, 2) + Fraction(2, 4)) / 2,  # = 1/2
    3: Fraction(1, 1),
    5: (Fraction(1, 1) + Fraction(2, 3) + Fraction(3, 12)) / 3,  # = 23/36
}
RANKS = {0: [2, 4], 3: [1], 5: [1, 3, 12]}
# Query included (UKBench), top 4 against the group {query} + relevant:
#   q0 [0, 3, 1, 4] & {0, 1, 2} = 2;  q3 [4, 3, 0, 1] & {3, 4} = 2;  q5 [5, 0, 6, 1] & {5, 0, 1, 13} = 3.
NS = {0: 2, 3: 2, 5: 3}
NS_BEST = Fraction(3 + 2 + 4, 3)  # min(4, group size) per query


@pytest.fixture
def fixed(coll, monkeypatch) -> Path:
    """The ground truth above, and `ranked` replaced by the hand-made RANKINGS."""
    id_of = ids_by_number(coll)
    number_of = {i: n for n, i in id_of.items()}
    all_ids = np.array(sorted(id_of.values()))

    def fixed_ranked(index, lookup, queries, k, how, refine=1, damaged=None):
        assert k == N and index.ntotal == N  # the whole catalog is ranked
        stored = lookup(all_ids)
        ids = np.full((len(queries), k), -1, np.int64)
        for row, q in enumerate(queries):
            query = number_of[int(all_ids[np.argmax(stored @ q)])]  # which image asks
            ids[row] = [id_of[n] for n in RANKINGS[query]]
        return ids, np.tile(np.linspace(1.0, 0.5, k, dtype=np.float32), (len(queries), 1))

    monkeypatch.setattr(instance_eval, "ranked", fixed_ranked)
    return write_csv(coll / "gt.csv", [(name(q), name(r)) for q, r in PAIRS])


def test_figures_of_a_hand_made_ranking(coll, fixed):
    r = cli("evaluate", "--groundtruth", fixed, "--json", *opts(coll))
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["queries"] == 3 and out["database"] == N and out["pairs"] == 6
    assert out["map"] == pytest.approx(float(sum(AP.values()) / 3))  # = 77/108
    assert out["map"] == pytest.approx(77 / 108)
    assert out["ns_score"] == pytest.approx(float(Fraction(sum(NS.values()), 3)))  # = 7/3
    assert out["ns_best"] == pytest.approx(float(NS_BEST))
    assert "Holidays" in out["map_protocol"] and "excluded" in out["map_protocol"]
    assert "UKBench" in out["ns_protocol"] and "included" in out["ns_protocol"]
    # Per query, in CSV order: path, AP, N-S count, the rank of each relevant image.
    per = out["per_query"]
    assert [Path(q["query"]).name for q in per] == [name(0), name(3), name(5)]
    for q, number in zip(per, (0, 3, 5), strict=True):
        assert set(q) == {"query", "id", "ap", "ns", "relevant"}  # no top 10 in the JSON
        assert q["ap"] == pytest.approx(float(AP[number]))
        assert q["ns"] == NS[number]
        assert [x["rank"] for x in q["relevant"]] == RANKS[number]
        wanted = [name(rel) for qq, rel in PAIRS if qq == number]
        assert [Path(x["path"]).name for x in q["relevant"]] == wanted


def test_summary_lines_name_each_protocol(coll, fixed):
    r = cli("evaluate", "--groundtruth", fixed, *opts(coll))
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert "3 queries" in lines[0] and f"{N} images ranked" in lines[0]
    assert lines[1].startswith(f"mAP {77 / 108:.4f}") and "Holidays" in lines[1]
    assert lines[2].startswith(f"N-S {7 / 3:.3f} of 4") and "UKBench" in lines[2]


def test_blocks_give_the_same_figures(coll, fixed, monkeypatch):
    whole = pipeline.evaluate(groundtruth=str(fixed), catalog=str(coll / "c.db"), index_dir=str(coll / "idx"))  # fmt: skip
    monkeypatch.setattr(common, "BLOCK_ENTRIES", N)  # one query per block
    blocked = pipeline.evaluate(groundtruth=str(fixed), catalog=str(coll / "c.db"), index_dir=str(coll / "idx"))  # fmt: skip
    assert blocked["per_query"] == whole["per_query"]
    assert whole["map"] == pytest.approx(77 / 108)


def test_report_shows_the_missed_relevant_images(coll, fixed, tmp_path):
    r = cli("evaluate", "--groundtruth", fixed, "--report", tmp_path / "rep", *opts(coll))
    assert r.exit_code == 0, r.output
    text = (tmp_path / "rep" / "index.html").read_text(encoding="utf-8")
    assert "worst queries by AP" in text and "Holidays" in text and "UKBench" in text
    # q5's relevant img0_0013 is at rank 12, out of its top 10: shown as missed, with its rank.
    assert text.count('class="missed"') == 1
    assert f'alt="missed: {name(13)}"' in text and "rank 12" in text
    # Every query shown, with its top 10 (query left out) marked: 2 + 1 + 2 relevant in them.
    assert text.count('class="query"') == 3
    assert text.count('class="result rel"') == 5 and text.count('class="result irr"') == 25
    for img in (tmp_path / "rep" / "thumbs").iterdir():
        assert img.stat().st_size > 0


def test_query_excluded_from_its_own_ranking_real_search(coll, tmp_path):
    """No fixed ranking: a byte copy of the query is relevant and comes first, the query never."""
    extra = tmp_path / "extra"
    extra.mkdir()
    original = next((coll / "imgs").rglob(name(0)))
    shutil.copy(original, extra / "copy.jpg")
    o = ["--catalog", str(tmp_path / "c.db"), "--index-dir", str(tmp_path / "idx")]
    assert cli("index", coll / "imgs", extra, *o).exit_code == 0
    gt = write_csv(tmp_path / "gt.csv", [(name(0), "copy.jpg"), (name(1), name(3)), (name(1), name(5))])  # fmt: skip
    result = pipeline.evaluate(groundtruth=str(gt), catalog=o[1], index_dir=o[3])
    q0, q1 = result["per_query"]
    assert q0["ap"] == 1.0 and q0["relevant"][0]["rank"] == 1 and q0["ns"] >= 2
    for q in (q0, q1):
        assert q["id"] not in [t["id"] for t in q["top10"]]
    # AP straight from the stored vectors: cosine order over the other 14 images, ties by id.
    db = catalog.open_reader(o[1])
    rows = {r["path"]: r["id"] for r in db.query("select id, path from images")}
    ids = np.array(sorted(rows.values()))
    vecs = vectors.open_rows(vectors.vectors_path(o[1]), reads.dimension(db), reads.next_id(db))
    db.conn.close()
    q_id = q1["id"]
    others = ids[ids != q_id]
    s = np.asarray(vecs[others]) @ np.asarray(vecs[q_id])
    order = others[np.lexsort((others, -s))]
    rel = np.isin(order, [x["id"] for x in q1["relevant"]])
    hits = np.flatnonzero(rel) + 1
    assert q1["ap"] == pytest.approx(float(np.mean(np.arange(1, 3) / hits)))
    assert sorted(x["rank"] for x in q1["relevant"]) == hits.tolist()
    assert result["database"] == N + 1


def test_names_relative_to_the_csv_folder_and_a_bom(coll):
    # Paths under the CSV's folder (imgs/red/...), a byte-order mark, spaces after commas.
    red = sorted(p.name for p in (coll / "imgs" / "red").iterdir())
    gt = coll / "bom.csv"
    gt.write_text(
        f"\ufeffquery, relevant\nimgs/red/{red[0]}, {red[1]}\n./imgs/red/{red[1]},imgs/red/{red[0]}\n",
        encoding="utf-8",
    )
    r = cli("evaluate", "--groundtruth", gt, "--json", *opts(coll))
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["queries"] == 2 and out["pairs"] == 2


def test_unknown_names_one_line(coll):
    gt = write_csv(coll / "unknown.csv", [(name(0), "nope.jpg"), ("gone.jpg", name(1))])
    r = cli("evaluate", "--groundtruth", gt, *opts(coll))
    assert_refused(r, "2 of 4 file names match no indexed catalog image", "'nope.jpg'")


def test_ambiguous_names_one_line(coll, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for folder in (a, b):
        folder.mkdir()
        shutil.copy(next((coll / "imgs").rglob(name(0))), folder / "same.jpg")
    shutil.copy(next((coll / "imgs").rglob(name(1))), a / "other.jpg")
    o = ["--catalog", str(tmp_path / "c.db"), "--index-dir", str(tmp_path / "idx")]
    assert cli("index", a, b, *o).exit_code == 0
    gt = write_csv(tmp_path / "gt.csv", [("same.jpg", "other.jpg")])
    assert_refused(cli("evaluate", "--groundtruth", gt, *o), "1 of 2", "several", "'same.jpg'")
    # Named relative to the CSV's folder, it is one image.
    gt = write_csv(tmp_path / "gt.csv", [("a/same.jpg", "other.jpg"), ("b/same.jpg", "a/same.jpg")])  # fmt: skip
    assert cli("evaluate", "--groundtruth", gt, *o).exit_code == 0


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (b"query,relevant\n\xff\xfeimg.jpg,x.jpg\n", ["not UTF-8"]),
        (b"\xff\xfeq\x00u\x00e\x00r\x00y\x00", ["not UTF-8"]),  # UTF-16
        (b"query,match\na.jpg,b.jpg\n", ["query,relevant", "missing: relevant"]),
        (b"path,label\na.jpg,b\n", ["missing: query, relevant"]),
        (b"", ["missing: query, relevant"]),
        (b"query,relevant\n", ["no query,relevant rows"]),
        (b"query,relevant\nimg0_0000.jpg\n", ["data row 1"]),
        (b"query,relevant\nimg0_0000.jpg,img0_0001.jpg\n,img0_0001.jpg\n", ["data row 2"]),
    ],
)
def test_bad_csv_one_line(coll, tmp_path, content, words):
    gt = tmp_path / "gt.csv"
    gt.write_bytes(content)
    assert_refused(cli("evaluate", "--groundtruth", gt, *opts(coll)), *words)


def test_other_refusals_one_line(coll, tmp_path):
    assert_refused(cli("evaluate", "--groundtruth", tmp_path / "none.csv", *opts(coll)), "not found")  # fmt: skip
    gt = write_csv(tmp_path / "gt.csv", [(name(0), name(1))])
    assert_refused(cli("evaluate", "--leave-one-out", "--groundtruth", gt, *opts(coll)), "not several")  # fmt: skip
    assert_refused(cli("evaluate", "--groundtruth", gt, "--index", "hnsw", *opts(coll)), "--index")
    selfish = write_csv(tmp_path / "self.csv", [(name(0), name(0))])
    assert_refused(cli("evaluate", "--groundtruth", selfish, *opts(coll)), "other than themselves")


# --- slow tier: the real model on part of INRIA Holidays ---------------------------------

HOLIDAYS = Path(__file__).resolve().parents[3] / "shared" / "datasets" / "holidays150"


@pytest.mark.slow
def test_holidays_subset_real_model(tmp_path, weights):
    """20 query groups of holidays150 through the real model: sane mAP, equal to numpy's."""
    if not (HOLIDAYS / "groundtruth.csv").exists():
        pytest.fail(f"the holidays150 benchmark is missing at {HOLIDAYS}")
    with (HOLIDAYS / "groundtruth.csv").open(newline="") as f:
        pairs = [(r["query"], r["relevant"]) for r in csv.DictReader(f)]
    queries = list(dict.fromkeys(q for q, _ in pairs))[:20]
    pairs = [p for p in pairs if p[0] in queries]
    files = sorted({HOLIDAYS / "images" / n for p in pairs for n in p})
    gt = write_csv(tmp_path / "gt.csv", pairs)  # in tmp: names matched by file name
    o = ["--catalog", str(tmp_path / "h.db"), "--index-dir", str(tmp_path / "idx")]
    start = time.monotonic()
    assert cli("index", *files, "--weights", weights, *o).exit_code == 0
    r = cli("evaluate", "--groundtruth", gt, "--json", *o)
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["queries"] == 20 and out["database"] == len(files)
    assert 0.5 <= out["map"] <= 1.0 and 1.5 <= out["ns_score"] <= out["ns_best"] <= 4.0

    # The same mAP straight from the stored vectors, by numpy.
    db = catalog.open_reader(o[1])
    id_of = {Path(r["path"]).name: r["id"] for r in db.query("select id, path from images")}
    vecs = np.asarray(vectors.open_rows(vectors.vectors_path(o[1]), reads.dimension(db), reads.next_id(db)))  # fmt: skip
    db.conn.close()
    ids = np.array(sorted(id_of.values()))
    aps = []
    for q in queries:
        rel = [id_of[r] for qq, r in pairs if qq == q]
        others = ids[ids != id_of[q]]
        s = vecs[others] @ vecs[id_of[q]]
        order = others[np.lexsort((others, -s))]
        hits = np.flatnonzero(np.isin(order, rel)) + 1
        aps.append(np.mean(np.arange(1, len(hits) + 1) / hits))
    assert out["map"] == pytest.approx(float(np.mean(aps)), abs=1e-6)
    assert time.monotonic() - start < 120
