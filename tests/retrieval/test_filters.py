"""Search filters inside the search (`retrieval.restricted`, `retrieval.filters`).

Fast tier, no model: seeded clustered vectors, every index type cbir builds, and a
brute-force reference (numpy over the stored vectors of the matching ids only).
"""

from __future__ import annotations

import os
from datetime import datetime

import faiss
import numpy as np
import pytest

from pipeline.errors import CbirError
from pipeline.retrieval import exact, filters, ranking, restricted, whitening
from pipeline.store import collection, writes

N, D, K = 3000, 32, 10


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """FAISS on one thread: on a busy machine its OpenMP threads spin (PQ training 5x slower)."""
    with ranking.single_thread():
        yield


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(7)
    centres = rng.standard_normal((40, D)).astype(np.float32)
    x = centres[rng.integers(0, 40, N)] + 0.6 * rng.standard_normal((N, D)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    q = x[rng.integers(0, N, 8)] + 0.2 * rng.standard_normal((8, D)).astype(np.float32)
    return x, q / np.linalg.norm(q, axis=1, keepdims=True)


def _indexes(x: np.ndarray) -> dict:
    ids = np.arange(N, dtype=np.int64)
    made = {"vectorfile": exact.VectorFileExact(x, ids)}
    for name, factory in [
        ("flat", "Flat"),
        ("hnsw", "HNSW16"),
        ("pq", "PQ8x4"),
        ("refine", "Flat,RFlat"),
    ]:
        idx = faiss.IndexIDMap2(faiss.index_factory(D, factory, faiss.METRIC_INNER_PRODUCT))
        idx.train(x)
        idx.add_with_ids(x, ids)
        made[name] = idx
    ivf = faiss.index_factory(D, "IVF16,Flat", faiss.METRIC_INNER_PRODUCT)
    ivf.train(x)
    ivf.add_with_ids(x, ids)
    made["ivf"] = ivf
    return made


@pytest.fixture(scope="module")
def built(data):
    return _indexes(data[0])


def reference(x, q, allowed, k, damaged=()):
    """The exact top k among `allowed` (minus `damaged`): ids by score, then id."""
    allowed = np.setdiff1d(allowed, np.asarray(damaged, dtype=np.int64))
    s = q @ x[allowed].T
    order = np.lexsort((np.broadcast_to(allowed, s.shape), -s), axis=1)[:, :k]
    return allowed[order]


def search(index, x, q, allowed, k=K, damaged=None, how=None):
    lookup = lambda ids: x[np.asarray(ids, dtype=np.int64)]  # noqa: E731
    within = restricted.Restricted(index, allowed, lookup)
    how = how or ranking.Rerank()
    ids, scores = ranking.ranked(index, lookup, q, k, how, damaged=damaged, within=within)
    return ids, scores, within


def random_filters(seed: int, count: int):
    """Seeded random filters: allowed sets of 1 to N ids, dense and sparse."""
    rng = np.random.default_rng(seed)
    for _ in range(count):
        size = int(np.exp(rng.uniform(0, np.log(N))))
        yield np.sort(rng.choice(N, size, replace=False))


@pytest.mark.parametrize("name", ["vectorfile", "flat", "hnsw", "pq", "refine", "ivf"])
def test_few_matching_ids_rank_exactly_with_any_index(data, built, name):
    x, q = data
    for allowed in random_filters(1, 6):
        if len(allowed) > restricted.SCAN_MAX:
            continue
        got, _, _ = search(built[name], x, q, allowed)
        want = reference(x, q, allowed, min(K, len(allowed)))
        np.testing.assert_array_equal(got[:, : want.shape[1]], want, err_msg=name)


@pytest.mark.parametrize("name", ["vectorfile", "flat", "ivf", "refine"])
def test_selector_and_overfetch_equal_brute_force(data, built, name, monkeypatch):
    """Flat and the vector file filter exactly; IVF with every list probed is exact; an
    index that refuses a selector (a refine wrapper over Flat) over-fetches exactly."""
    monkeypatch.setattr(restricted, "SCAN_MAX", 0)
    x, q = data
    index = built[name]
    if name == "ivf":
        index.nprobe = index.nlist
    for allowed in random_filters(2, 8):
        got, scores, within = search(index, x, q, allowed)
        want = reference(x, q, allowed, min(K, len(allowed)))
        np.testing.assert_array_equal(got[:, : want.shape[1]], want, err_msg=name)
        assert np.isin(got[got >= 0], allowed).all()
        if name != "vectorfile":
            assert within.how == ("over-fetch" if name == "refine" else "selector")


@pytest.mark.parametrize("name", ["flat", "hnsw", "pq", "ivf"])
def test_k_results_when_the_matches_are_far_down_the_ranking(data, built, name, monkeypatch):
    """The 30 images ranked last for a query are the filter: k of them come back, the
    right ones, though an unfiltered search would reach them last."""
    monkeypatch.setattr(restricted, "SCAN_MAX", 0)
    x, q = data
    index = built[name]
    if name == "ivf":
        index.nprobe = 1  # grown until k matches are found
    last = np.argsort(q[:1] @ x.T, axis=1)[0][:30]
    got, _, within = search(index, x, q[:1], np.sort(last))
    assert (got >= 0).sum() == K, (name, within.how)
    assert np.isin(got, last).all()
    if name in ("flat", "ivf"):
        np.testing.assert_array_equal(got, reference(x, q[:1], np.sort(last), K))


def test_hnsw_with_a_selector_finds_k_and_nearly_the_true_ones(data, built, monkeypatch):
    monkeypatch.setattr(restricted, "SCAN_MAX", 0)
    x, q = data
    hits = []
    for allowed in random_filters(3, 6):
        got, _, within = search(built["hnsw"], x, q, allowed)
        want = reference(x, q, allowed, min(K, len(allowed)))
        assert ((got >= 0).sum(axis=1) == want.shape[1]).all()
        assert np.isin(got[got >= 0], allowed).all() and within.how == "selector"
        hits.append(
            np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(got, want, strict=True)])
        )
    assert np.mean(hits) >= 0.9, hits


def test_overfetch_that_runs_out_says_so(data, built, monkeypatch):
    """PQ cannot filter in its search: when its nearest OVERFETCH_MAX candidates hold
    fewer than k matches, the answer is short and `short` is set (the notice)."""
    monkeypatch.setattr(restricted, "SCAN_MAX", 0)
    monkeypatch.setattr(restricted, "OVERFETCH_MAX", 64)
    x, q = data
    last = np.argsort(q[:1] @ x.T, axis=1)[0][:30]
    got, _, within = search(built["pq"], x, q[:1], np.sort(last))
    assert within.how == "over-fetch" and within.short
    assert (got >= 0).sum() < K and np.isin(got[got >= 0], last).all()


@pytest.mark.parametrize("scan_max", [restricted.SCAN_MAX, 0])
def test_damaged_matching_rows_are_skipped(data, built, scan_max, monkeypatch):
    monkeypatch.setattr(restricted, "SCAN_MAX", scan_max)
    x, q = data
    allowed = next(random_filters(4, 1)) if scan_max else np.arange(0, N, 2)
    best = reference(x, q[:1], allowed, 3)[0]
    bad = best[:2]  # the two best matches' vectors fail their checksums
    damaged = lambda ids: np.intersect1d(ids, bad)  # noqa: E731
    got, _, _ = search(built["flat"], x, q[:1], allowed, damaged=damaged)
    np.testing.assert_array_equal(got, reference(x, q[:1], allowed, K, damaged=bad))


def test_reranking_with_a_filter(data, built, monkeypatch):
    """Query expansion over a filter equals it over an index of the matching images alone;
    DBA (the collection's neighbours) keeps every result inside the filter."""
    monkeypatch.setattr(restricted, "SCAN_MAX", 0)
    x, q = data
    allowed = np.arange(1, N, 3)
    alone = faiss.IndexIDMap2(faiss.IndexFlatIP(D))
    alone.add_with_ids(x[allowed], allowed)
    lookup = lambda ids: x[np.asarray(ids, dtype=np.int64)]  # noqa: E731
    aqe = ranking.Rerank(methods=("aqe",), shortlist=50)
    got, _, _ = search(built["flat"], x, q, allowed, how=aqe)
    want, _ = ranking.ranked(alone, lookup, q, K, aqe)
    np.testing.assert_array_equal(got, want)
    dba = ranking.Rerank(methods=("dba", "aqe"), shortlist=50)
    got, scores, _ = search(built["ivf"], x, q, allowed, how=dba)
    assert np.isin(got, allowed).all() and (np.diff(scores, axis=1) <= 1e-6).all()


def test_a_filter_matching_nothing_returns_nothing(data, built):
    x, q = data
    got, scores, _ = search(built["flat"], x, q, np.zeros(0, dtype=np.int64))
    assert got.shape[1] == 0 or (got < 0).all()


# --- the filter itself: values, and the ids it resolves to ----------------------------------


def test_dates_are_local_days_and_times():
    f = filters.make_filter(since="2024-05-01", until="2024-05-01")
    assert f.since == datetime(2024, 5, 1).timestamp()
    assert f.until == datetime(2024, 5, 1, 23, 59, 59, 999999).timestamp()
    g = filters.make_filter(since="2024-05-01T10:00Z", until="2024-05-01 12:30:15+02:00")
    assert g.since == datetime.fromisoformat("2024-05-01T10:00:00+00:00").timestamp()
    assert g.until == datetime.fromisoformat("2024-05-01T10:30:15+00:00").timestamp()
    assert not filters.Filter().active and g.active
    assert set(g.describe()) == {"since", "until"}


@pytest.mark.parametrize(
    "options, words",
    [
        ({"since": "2024-13-01"}, "since must be a date"),
        ({"until": "2024-02-30"}, "until must be a date"),
        ({"since": "yesterday"}, "since must be a date"),
        ({"since": "20240501"}, "since must be a date"),
        ({"since": "2024-05-01T25:00"}, "since must be a date"),
        ({"since": "9" * 500}, "since must be a date"),
        ({"since": 1714521600}, "since must be a date"),
        ({"since": "2024-05-02", "until": "2024-05-01"}, "is after until"),
        ({"under": ""}, "under must be a non-empty text"),
        ({"under": "a\0b"}, "under must be a non-empty text"),
        ({"under": ["x"] * 65}, "at most 64"),
        ({"labels": [3]}, "label must be a non-empty text"),
        ({"labels": {"a": 1}}, "label must be a string or a list"),
    ],
)
def test_bad_filter_values_are_one_line(options, words):
    with pytest.raises(CbirError) as e:
        filters.make_filter(**options)
    assert words in str(e.value) and "\n" not in str(e.value)


@pytest.fixture
def cat(tmp_path):
    """A catalog of rows only (no vectors needed to resolve a filter)."""
    rows = []
    paths = ["/p/a/b/1.jpg", "/p/a/b/sub/2.jpg", "/p/a/bc/3.jpg", "/p/a/b", "/p/x/4.jpg"]
    labels = ["cat", "dog", "cat", None, "dog"]
    taken = [datetime(2024, 5, 1, 8).timestamp(), datetime(2024, 5, 1, 23, 59).timestamp(),
             datetime(2024, 5, 2, 0, 0, 1).timestamp(), None, datetime(2023, 1, 1).timestamp()]  # fmt: skip
    for i, (p, lab, t) in enumerate(zip(paths, labels, taken, strict=True)):
        rows.append({"id": i, "path": p, "label": lab, "status": "indexed", "size": 1,
                     "mtime": datetime(2020, 1, 1).timestamp(), "taken_at": t,
                     "taken_from": "exif" if t else None})  # fmt: skip
    with collection.writing(tmp_path / "c.db", tmp_path / "idx") as coll:
        writes.commit_batch(coll.db, rows, [], len(rows))
    coll = collection.reading(tmp_path / "c.db", tmp_path / "idx", check=False)
    yield coll
    coll.close()


def ids_of(coll, **options) -> list[int]:
    return filters.matching(coll, filters.make_filter(**options)).tolist()


def test_matching_ids_by_folder_label_and_date(cat):
    assert ids_of(cat, under="/p/a/b") == [0, 1]  # not /p/a/bc, not the file named /p/a/b
    assert ids_of(cat, under="/p/a/b/") == [0, 1]
    assert ids_of(cat, under=["/p/a/bc", "/p/x"]) == [2, 4]
    assert ids_of(cat, under="/p") == [0, 1, 2, 3, 4]
    assert ids_of(cat, labels="cat") == [0, 2]
    assert ids_of(cat, labels=["cat", "dog"], under="/p/a") == [0, 1, 2]
    assert ids_of(cat, since="2024-05-01", until="2024-05-01") == [0, 1]
    assert ids_of(cat, since="2024-05-02") == [2]
    # A row without a date (catalogued before schema 6) is dated by its mtime (2020).
    assert ids_of(cat, until="2020-01-01") == [3]
    assert filters.make_filter(under="rel").under == (os.path.abspath("rel"),)


def test_the_folder_picker_lists_the_fullest_folders(cat):
    found = filters.folders(cat, limit=2)
    assert [f["images"] for f in found] == [1, 1] and len(found) == 2
    want = {"/p/a", "/p/a/b", "/p/a/b/sub", "/p/a/bc", "/p/x"}  # "/p/a/b" is also an image
    assert {f["folder"] for f in filters.folders(cat)} == want


@pytest.mark.parametrize("inner", ["Flat", "HNSW16"])
@pytest.mark.parametrize("scan_max", [restricted.SCAN_MAX, 0])
def test_a_whitened_index_filters_in_its_own_space(data, inner, scan_max, monkeypatch):
    """Whitening (IndexPreTransform over IndexIDMap2): the filtered ranking is the
    brute-force one in the whitened space, by a scan or by the selector through both
    wrappers."""
    monkeypatch.setattr(restricted, "SCAN_MAX", scan_max)
    x, q = data
    pca = faiss.PCAMatrix(D, 16, -0.25)
    pca.train(x)
    index = whitening.wrap(pca, faiss.index_factory(16, inner, faiss.METRIC_INNER_PRODUCT))
    index.add_with_ids(x, np.arange(N, dtype=np.int64))
    space = whitening.transform_of(index)
    wx, wq = space(x), space(q)
    for allowed in random_filters(5, 4):
        got, _, within = search(index, x, q, allowed)
        want = reference(wx, wq, allowed, min(K, len(allowed)))
        if inner == "Flat" or within.how == "scan":
            np.testing.assert_array_equal(got[:, : want.shape[1]], want)
        else:
            assert np.isin(got[got >= 0], allowed).all()
            assert ((got >= 0).sum(axis=1) == want.shape[1]).all()


@pytest.mark.parametrize("chunk", [4, 5, 64])
def test_the_mask_of_a_dense_filter_holds_in_every_chunk(chunk, monkeypatch):
    """The vector-file scan masks a dense filter chunk by chunk (65,536 rows each): the
    mask must hold past the first chunk too (it was overwritten by the merge's order)."""
    monkeypatch.setattr(exact, "CHUNK", chunk)
    rng = np.random.default_rng(5)
    rows = rng.standard_normal((40, 8)).astype(np.float32)
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    ids = np.arange(40)
    keep = rng.random(40) < 0.5
    for q in rows:  # each row as the query: masked-out rows score 1.0 with themselves
        scores, got = exact.top_k(rows, ids, q[None], 10, keep=keep)
        allowed = ids[keep]
        want = allowed[np.argsort(-(rows[allowed] @ q), kind="stable")][:10]
        assert set(got[0][got[0] >= 0]) <= set(allowed)
        assert list(got[0][: len(want)]) == list(want)


@pytest.mark.parametrize(
    "given",
    [
        {"until": "9999-12-31"},
        {"until": "9999-12-31T23:59-14:00"},
        {"since": "0001-01-01T00:00+14:00"},
    ],
)
def test_dates_at_the_ends_of_the_calendar_are_described_not_raised(given):
    """An answer shows its filter: a date past what local time can show (no upper bound
    given as 9999-12-31) must not turn a search into a traceback."""
    shown = filters.make_filter(**given).describe()
    assert set(shown) == set(given)
