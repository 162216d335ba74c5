"""Retrieval quality: evaluation, baselines, re-ranking and relevance feedback."""

from __future__ import annotations

import json

import faiss
import numpy as np
import pytest
from click.testing import CliRunner

import pipeline
from conftest import write_manifest
from pipeline.cli import main
from pipeline.retrieval.ranking import Rerank, ranked


def test_ties_are_broken_by_id_and_scores_are_exact():
    vecs = np.eye(4, dtype=np.float32)[[0, 1, 1, 2]]  # ids 10..13; 11 and 12 identical
    index = faiss.IndexIDMap2(faiss.IndexFlatIP(4))
    index.add_with_ids(vecs, np.arange(10, 14))
    ids, scores = ranked(index, lambda i: vecs[np.asarray(i) - 10], vecs[[1]], 3)
    assert ids[0].tolist() == [11, 12, 10] and scores[0].tolist() == [1.0, 1.0, 0.0]


def test_dba_and_aqe_pull_in_the_neighbours_of_neighbours():
    # A chain a - b - c: c is far from a, near b. Expanding a's query with b brings c up
    # over d, which is equally far from a but unrelated to b.
    a = np.array([1.0, 0.0, 0.0, 0.0])
    b = np.array([0.8, 0.6, 0.0, 0.0])
    c = np.array([0.3, 0.95, 0.0, 0.0])
    d = np.array([0.3, 0.0, 0.95, 0.0])
    vecs = np.stack([a, b, c, d]).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    index = faiss.IndexIDMap2(faiss.IndexFlatIP(4))
    index.add_with_ids(vecs, np.arange(4))
    lookup = lambda i: vecs[np.asarray(i)]  # noqa: E731
    plain, _ = ranked(index, lookup, vecs[[0]], 4)
    assert set(plain[0][2:].tolist()) == {2, 3}
    for methods in (("aqe",), ("dba",), ("dba", "aqe")):
        ids, _ = ranked(index, lookup, vecs[[0]], 4, Rerank(methods=methods, n=2, alpha=1.0))
        assert ids[0].tolist()[:3] == [0, 1, 2], methods


@pytest.fixture(scope="module")
def queries_csv(tmp_path_factory, corel_query_rows):
    return write_manifest(tmp_path_factory.mktemp("q") / "queries.csv", corel_query_rows)


@pytest.mark.slow
def test_evaluate_held_out_queries_and_baseline(corel_collection, queries_csv):
    o = {k: corel_collection[k] for k in ("catalog", "index_dir", "weights")}
    deep = pipeline.evaluate(str(queries_csv), **o)
    assert deep["queries"] == 30 and deep["database"] == 200
    assert set(deep["per_class"]) == {r for r in deep["per_class"]} and len(deep["per_class"]) == 10
    assert deep["map"] > 0.75 and deep["p_at_10"] > 0.85 and deep["p_at_1"] > 0.85
    # No held-out query is in the database, so none can find itself.
    assert all(q["query"] not in {t["path"] for t in q["top10"]} for q in deep["per_query"])
    colour = pipeline.evaluate(str(queries_csv), method="color", **o)
    assert colour["map"] < deep["map"] - 0.2
    reranked = pipeline.evaluate(str(queries_csv), rerank="dba+aqe", rerank_n=5, **o)
    assert reranked["map"] >= deep["map"]
    hybrid = pipeline.evaluate(str(queries_csv), method="hybrid", hybrid_weight=1.0, **o)
    assert hybrid["map"] == pytest.approx(deep["map"], abs=1e-9)


@pytest.mark.slow
def test_leave_one_out_never_returns_the_query(corel_collection):
    o = {k: corel_collection[k] for k in ("catalog", "index_dir")}
    r = pipeline.evaluate(leave_one_out=True, **o)
    assert r["queries"] == 200
    assert all(q["query"] not in {t["path"] for t in q["top10"]} for q in r["per_query"])
    assert r["map"] > 0.7


@pytest.mark.slow
def test_evaluate_cli_json_and_index_recall(corel_collection, queries_csv, tmp_path):
    c = corel_collection
    args = [
        "evaluate",
        str(queries_csv),
        "--catalog",
        c["catalog"],
        "--index-dir",
        c["index_dir"],
        "--weights",
        c["weights"],
        "--json",
    ]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert {"map", "p_at_1", "p_at_10", "per_class"} <= set(out)


@pytest.mark.slow
def test_relevance_feedback_moves_marked_class_up(corel_collection):
    o = {k: corel_collection[k] for k in ("catalog", "index_dir")}
    before = pipeline.search([0], k=10, **o)[0]["results"]
    query_label = before[0]["label"]
    # Mark three images of another class as relevant, and the query's runner-up as not.
    other = [
        r for r in pipeline.search([100], k=40, **o)[0]["results"] if r["label"] != query_label
    ]
    target = other[0]["label"]
    marked = [r["id"] for r in other if r["label"] == target][:3]
    after = pipeline.search([0], k=10, relevant=marked, not_relevant=[before[1]["id"]], **o)[0][
        "results"
    ]
    count = lambda rs: sum(r["label"] == target for r in rs)  # noqa: E731
    assert count(after) > count(before)
    assert before[1]["id"] not in [r["id"] for r in after[:2]]
