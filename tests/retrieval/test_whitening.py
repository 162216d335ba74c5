"""PCA-whitened indexes (fast tier: fake model, generated images).

The guard must refuse, in one line with both figures, a whitening that lowers
the validation mAP, measured for real (recomputed here independently); an
accepted one must search in its whitened space (unit vectors, scores in
[-1, 1], the exact top 10 of that space), round-trip through a file, and
every bad value is one line, exit 2.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import faiss
import numpy as np
import pytest
from PIL import Image

import fakes
from fakes import cli, ok, one_line_error, opts
from pipeline import api, faults
from pipeline.errors import CbirError
from pipeline.retrieval import factories, indexes, whitening, whitening_fit
from pipeline.store import collection, reads

CLASSES, PER_CLASS = 4, 30  # 120 images: 96 fit the whitening, 24 validate it


@pytest.fixture(autouse=True)
def fake_model(monkeypatch):
    monkeypatch.setattr(api.models, "cached_embedder", fakes.cached)


def make_classes(folder: Path, seed: int = 0, noise: float = 12.0) -> None:
    """CLASSES classes of PER_CLASS images: a class's 8x8 colour pattern plus per-image noise
    in the same 8x8 cells the fake model averages, saved lossless."""
    rng = np.random.default_rng(seed)
    means = rng.uniform(40, 215, (CLASSES, 8, 8, 3))
    for c in range(CLASSES):
        sub = folder / f"class{c}"
        sub.mkdir(parents=True, exist_ok=True)
        for i in range(PER_CLASS):
            cells = np.clip(means[c] + rng.normal(0, noise, (8, 8, 3)), 0, 255)
            pixels = np.kron(cells, np.ones((8, 8, 1))).astype(np.uint8)
            Image.fromarray(pixels).save(sub / f"c{c}_{i:03d}.png")


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("whiten-base")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(api.models, "cached_embedder", fakes.cached)
        make_classes(folder / "imgs")
        ok(cli("index", folder / "imgs", *opts(folder)), "index")
    return folder


@pytest.fixture
def state(base, tmp_path) -> Path:
    dest = tmp_path / "s"
    shutil.copytree(base, dest)
    return dest


record = fakes.index_record


def indexed_ids(state: Path) -> np.ndarray:
    coll = collection.reading(state / "c.db", state / "idx")
    try:
        return coll.indexed_ids()
    finally:
        coll.close()


def search_json(state: Path, index: str, ids) -> list[dict]:
    args = ["search", *[a for i in ids for a in ("--id", i)], "--index", index, "--json"]
    out = ok(cli(*args, *opts(state), "-k", 10), f"search {index}")
    return [json.loads(line) for line in out.splitlines()]


def independent_maps(state: Path, dim: int, shrinkage: float) -> tuple[float, float]:
    """The validation mAPs recomputed here: the guard's split and fit, then plain numpy
    rankings (no cbir ranking code) of the held-out queries over every vector."""
    coll = collection.reading(state / "c.db", state / "idx")
    try:
        hold = whitening_fit.holdout(coll, "labels")
        rows, ids = coll.rows(), coll.indexed_ids()
        labels = {i: r["label"] for i, r in reads.lookup(coll.db, ids).items()}
        pca = whitening_fit.learn(rows, hold.fit_ids, dim, shrinkage)
        raw = np.asarray(rows[ids], dtype=np.float32)
        white = pca.apply(raw)
        white /= np.linalg.norm(white, axis=1, keepdims=True)
        maps = []
        for space in (raw, white):
            aps = []
            for q in hold.queries:
                p = int(np.flatnonzero(ids == q)[0])
                others = np.delete(np.arange(len(ids)), p)
                s = space[others] @ space[p]
                order = others[np.lexsort((ids[others], -s))]
                rel = np.array([labels[int(ids[o])] == labels[int(q)] for o in order])
                hits = np.cumsum(rel)
                aps.append(float((hits[rel] / (np.flatnonzero(rel) + 1)).sum() / rel.sum()))
            maps.append(float(np.mean(aps)))
        return maps[0], maps[1]
    finally:
        coll.close()


# --- the guard -------------------------------------------------------------------------------


def test_guard_refuses_a_fit_that_lowers_the_validation_map(state):
    # Full whitening (shrinkage 0) of 64 dimensions learned from 96 vectors gives the
    # within-class noise the same weight as the 3 directions that separate the classes.
    raw, white = independent_maps(state, 64, 0.0)
    assert white < raw - 0.05, (raw, white)  # the fit really hurts
    line = one_line_error(
        cli("build-index", "w", "--whiten", "--whiten-dim", 64, "--shrinkage", 0, *opts(state)), 1
    )
    assert "refused" in line and "lowers the validation mAP" in line
    assert f"{raw:.4f}" in line and f"{white:.4f}" in line, (raw, white, line)
    assert "--whiten-dim" in line and "--shrinkage" in line and "--whitening FILE" in line
    assert record(state, "w") is None
    assert not list((state / "idx").glob("w+*"))


def test_the_same_dimension_with_shrinkage_is_accepted(state):
    raw, white = independent_maps(state, 64, 0.5)
    assert white >= raw
    out = ok(cli("build-index", "w", "--whiten", "--whiten-dim", 64, *opts(state)), "build")
    assert f"validation mAP {white:.4f} whitened vs {raw:.4f} unwhitened" in out
    note = json.loads(record(state, "w")["note"])["whitening"]
    assert (note["dim"], note["shrinkage"], note["source"]) == (64, 0.5, "learned")
    assert (note["map_whitened"], note["map_unwhitened"]) == (round(white, 4), round(raw, 4))
    assert (note["validation"], note["queries"], note["fit_vectors"]) == ("labels", 24, 96)


def test_too_few_vectors_for_the_dimension_is_refused(state):
    line = one_line_error(cli("build-index", "w", "--whiten", "--whiten-dim", 96, *opts(state)), 1)
    assert "too small" in line and "96" in line
    assert record(state, "w") is None


def test_learned_whitening_without_validation_data_is_refused(tmp_path):
    make_classes(tmp_path / "imgs")
    ok(cli("index", tmp_path / "imgs", "--labels", "none", *opts(tmp_path)), "index")
    line = one_line_error(
        cli("build-index", "w", "--whiten", "--whiten-dim", 8, *opts(tmp_path)), 1
    )
    assert "nothing to validate" in line and "--validate FILE.csv" in line
    line = one_line_error(
        cli("build-index", "w", "--whiten", "--validate", "labels", *opts(tmp_path)), 1
    )
    assert "labels cannot validate" in line
    coll = collection.reading(tmp_path / "c.db", tmp_path / "idx")
    try:
        pca = whitening_fit.learn(coll.rows(), coll.indexed_ids(), 8, 0.5)
    finally:
        coll.close()
    fitted = tmp_path / "w8.pca"
    whitening.write_transform(pca, str(fitted))
    out = ok(cli("build-index", "w", "--whitening", fitted, *opts(tmp_path)), "file")
    assert "not validated" in out  # a fitted file is the user's choice when nothing can check it
    assert json.loads(record(tmp_path, "w")["note"])["whitening"]["validation"] is None


# --- an accepted whitening ---------------------------------------------------------------------


def test_whitened_index_searches_in_its_whitened_space(state):
    out = ok(cli("build-index", "w", "--whiten", "--whiten-dim", 16, *opts(state)), "build")
    assert "whitening: PCA 2048->16, shrinkage 0.5" in out and "recall@10 1.0000" in out
    rec = record(state, "w")
    assert rec["factory"] == "Whiten16,Flat" and rec["recall_at_10"] == 1.0
    coll = collection.reading(state / "c.db", state / "idx")
    try:
        index, _, _ = indexes.load(coll, "w")
        space = whitening.transform_of(index)
        assert space is not None
        assert whitening.transform_of(indexes.loaded(coll, "exact")[0]) is None
        ids = coll.indexed_ids()
        raw = coll.vectors(ids)
        white = space(raw)
        assert white.shape == (len(ids), 16)
        np.testing.assert_allclose(np.linalg.norm(white, axis=1), 1.0, atol=1e-5)
        assert np.array_equal(factories.stored_ids(index), ids)
    finally:
        coll.close()
    queries = [int(ids[0]), int(ids[37]), int(ids[71]), int(ids[110])]
    answers = search_json(state, "w", queries)
    rescored_differently = False
    for q, answer in zip(queries, answers, strict=True):
        got = [r["id"] for r in answer["results"]]
        scores = np.array([r["score"] for r in answer["results"]])
        assert got[0] == q and scores[0] == pytest.approx(1.0, abs=1e-5)
        assert np.all(scores <= 1.0 + 1e-6) and np.all(scores >= -1.0 - 1e-6)
        p = int(np.flatnonzero(ids == q)[0])
        s = white @ white[p]
        want = ids[np.lexsort((ids, -s))][:10]
        assert got == want.tolist()  # the brute-force top 10 of the whitened space
        np.testing.assert_allclose(scores, np.sort(s)[::-1][:10], atol=1e-5)
        raw_scores = raw[np.searchsorted(ids, got)] @ raw[p]
        rescored_differently |= not np.allclose(raw_scores, scores, atol=1e-3)
    assert rescored_differently  # the raw cosines would have been other scores
    ok(cli("verify", *opts(state)), "verify")
    info = ok(cli("info", *opts(state)), "info")
    assert "Whiten16,Flat" in info and "map_whitened" in info


def test_whitened_hnsw_recall_is_measured_in_the_whitened_space(state):
    args = ["build-index", "w", "--whiten", "--whiten-dim", 16, "--factory", "HNSW16"]
    out = ok(cli(*args, "--target-recall", 0.9, *opts(state)), "build")
    rec = record(state, "w")
    assert rec["factory"] == "Whiten16,HNSW16" and rec["recall_at_10"] >= 0.9, out
    assert "efSearch" in rec["params"]


def test_rebuild_keeps_the_whitening_and_update_is_refused(state):
    ok(cli("build-index", "w", "--whiten", "--whiten-dim", 16, *opts(state)), "build")
    first = record(state, "w")
    out = ok(cli("build-index", "w", *opts(state)), "rebuild")
    again = record(state, "w")
    assert again["factory"] == "Whiten16,Flat" and "whitening: PCA 2048->16" in out
    assert json.loads(again["note"]) == json.loads(first["note"])
    line = one_line_error(cli("build-index", "w", "--update", *opts(state)), 2)
    assert "whitened" in line and "cannot grow" in line


# --- a fitted file -----------------------------------------------------------------------------


def test_whitening_file_round_trip(state, tmp_path):
    fitted = tmp_path / "w16.pca"
    args = ["build-index", "learned", "--whiten", "--whiten-dim", 16, "--shrinkage", 0.75]
    ok(cli(*args, "--save-whitening", fitted, *opts(state)), "build learned")
    assert fitted.exists()
    out = ok(cli("build-index", "loaded", "--whitening", fitted, *opts(state)), "build loaded")
    assert f"from {fitted}" in out
    learned = json.loads(record(state, "learned")["note"])["whitening"]
    loaded = json.loads(record(state, "loaded")["note"])["whitening"]
    assert loaded["source"] == "file" and loaded["file"] == str(fitted)
    assert (loaded["dim"], loaded["shrinkage"]) == (16, 0.75)
    assert loaded["map_whitened"] == learned["map_whitened"]  # validated the same way
    ids = indexed_ids(state)[[0, 13, 64, 99]].tolist()
    assert search_json(state, "learned", ids) == search_json(state, "loaded", ids)


def test_a_file_that_lowers_the_map_is_refused(state, tmp_path):
    coll = collection.reading(state / "c.db", state / "idx")
    try:
        pca = whitening_fit.learn(coll.rows(), coll.indexed_ids(), 64, 0.0)
    finally:
        coll.close()
    bad = tmp_path / "full.pca"
    whitening.write_transform(pca, str(bad))
    line = one_line_error(cli("build-index", "w", "--whitening", bad, *opts(state)), 1)
    assert f"the transform in {bad} refused" in line and "(whitened)" in line
    assert record(state, "w") is None


def test_validation_on_a_groundtruth_csv(state):
    gt = state / "imgs" / "gt.csv"
    with gt.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["query", "relevant"])
        for c in range(CLASSES):
            for i in range(1, PER_CLASS):
                w.writerow([f"class{c}/c{c}_000.png", f"class{c}/c{c}_{i:03d}.png"])
    args = ["build-index", "w", "--whiten", "--whiten-dim", 16, "--validate", gt]
    out = ok(cli(*args, *opts(state)), "build")
    note = json.loads(record(state, "w")["note"])["whitening"]
    assert note["validation"] == f"ground truth {gt}" and note["queries"] == CLASSES
    assert note["fit_vectors"] == CLASSES * PER_CLASS - CLASSES
    assert "4 queries" in out
    line = one_line_error(
        cli("build-index", "w", "--whiten", "--validate", state / "none.csv", *opts(state)), 2
    )
    assert "ground-truth file not found" in line


# --- bad values --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra",
    [
        ["--whiten-dim", "0"],
        ["--whiten-dim", "-1"],
        ["--whiten-dim", "99999"],
        ["--shrinkage", "1.5"],
        ["--shrinkage", "nan"],
        ["--shrinkage", "-0.1"],
    ],
)
def test_bad_values_are_one_line(state, extra):
    one_line_error(cli("build-index", "w", "--whiten", *extra, *opts(state)), 2)


def test_bad_files_and_combinations_are_one_line(state, tmp_path):
    junk = tmp_path / "junk.pca"
    junk.write_bytes(b"not a transform at all" * 10)
    line = one_line_error(cli("build-index", "w", "--whitening", junk, *opts(state)), 2)
    assert "is not a PCA whitening transform" in line
    an_index = tmp_path / "index.faiss"
    faiss.write_index(faiss.IndexFlatIP(2048), str(an_index))
    one_line_error(cli("build-index", "w", "--whitening", an_index, *opts(state)), 2)
    other = faiss.PCAMatrix(64, 8)
    other.train(np.random.default_rng(0).standard_normal((200, 64)).astype(np.float32))
    wrong = tmp_path / "wrong.pca"
    faiss.write_VectorTransform(other, str(wrong))
    line = one_line_error(cli("build-index", "w", "--whitening", wrong, *opts(state)), 2)
    assert "64-d" in line and "2048-d" in line
    line = one_line_error(cli("build-index", "w", "--whitening", tmp_path / "no", *opts(state)), 2)
    assert "not found" in line
    one_line_error(cli("build-index", "w", "--whiten-dim", 8, *opts(state)), 2)  # no --whiten
    one_line_error(
        cli("build-index", "w", "--whitening", wrong, "--whiten-dim", 8, *opts(state)), 2
    )
    one_line_error(cli("build-index", "exact", "--whiten", *opts(state)), 2)
    one_line_error(cli("build-index", "w", "--whiten", "--shards", 2, *opts(state)), 2)
    one_line_error(
        cli(
            "build-index", "w", "--whiten", "--factory", "NoSuch9", "--whiten-dim", 8, *opts(state)
        ),
        2,
    )
    assert record(state, "w") is None


def test_api_checks_the_same_values(state):
    o = {"catalog": str(state / "c.db"), "index_dir": str(state / "idx")}
    for bad in ({"whiten_dim": 0}, {"whiten_dim": 4096}, {"shrinkage": float("nan")}):
        with pytest.raises(CbirError) as e:
            api.build_index("w", whiten=True, **bad, **o)
        assert e.value.exit_code == 2
    record_ = api.build_index("w", whiten=True, whiten_dim=8, **o)
    assert record_["factory"] == "Whiten8,Flat"


# --- crash safety --------------------------------------------------------------------------------


@pytest.mark.slow  # a crash suite: a child process per write step
def test_crash_at_every_step_of_a_whitened_build(state, tmp_path):
    """A whitened rebuild (and its --save-whitening file) killed after each write step
    leaves the old index or the new one, both searchable and verified, and no temporaries."""
    ok(cli("build-index", "w", "--whiten", "--whiten-dim", 16, *opts(state)), "first build")

    def child(where: Path, env: dict[str, str]):
        args = ["build-index", "w", "--whiten", "--whiten-dim", 16, "--shrinkage", 0.75,
                "--save-whitening", where / "w.pca", *opts(where)]  # fmt: skip
        return fakes.run_child(args, env)

    log = tmp_path / "steps.log"
    clean = tmp_path / "clean"
    shutil.copytree(state, clean)
    assert child(clean, {faults.CRASH_LOG: str(log)}).returncode == 0
    steps = log.read_text().splitlines()
    assert len(steps) >= 5, steps
    for k in range(1, len(steps) + 1):
        where = tmp_path / f"k{k}"
        shutil.copytree(state, where)
        r = child(where, {faults.CRASH_AFTER: str(k)})
        assert r.returncode == faults.CRASH_EXIT, f"step {k}: {r.stderr}"
        ok(cli("search", "--id", 3, "--index", "w", *opts(where)), f"after step {k}")
        assert cli("verify", *opts(where)).exit_code == 0, f"after step {k}"
        assert child(where, {}).returncode == 0, f"rerun after step {k}"
        leftovers = [f.name for f in where.rglob("*.tmp")]
        assert not leftovers, f"after step {k}: {leftovers}"
        assert record(where, "w")["factory"] == "Whiten16,Flat"
        assert faiss.read_VectorTransform(str(where / "w.pca")).d_out == 16
        shutil.rmtree(where)
