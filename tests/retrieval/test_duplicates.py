"""The near-duplicate core (pipeline/retrieval/duplicates.py), fast tier: no model, no catalog.

Pairs from the exact range search must be exactly the pairs a brute-force numpy
reference finds (pairs at the threshold and identical vectors included); an
approximate index may miss pairs but never invent one or misstate a score, and
`pair_recall` must say how many it missed; groups are cut around centres (no
chaining), hold each image once, and do not depend on the order of the pairs;
`find_groups` tags each group with its kind and reports only the kinds asked for.
"""

from __future__ import annotations

import itertools
import math

import faiss
import numpy as np
import pytest

from pipeline.retrieval import duplicates as dups
from pipeline.retrieval import factories

D = 64


def unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def clustered(n_centres: int, per: int, spread: float, seed: int) -> np.ndarray:
    """Unit vectors in tight clusters (so there are pairs at every threshold tested)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_centres, D))
    noise = rng.standard_normal((n_centres, per, D)) * spread * rng.random((n_centres, per, 1))
    return unit((centres[:, None, :] + noise).reshape(-1, D))


@pytest.fixture(scope="module")
def table() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids, vectors by id, the rows they live in): ids are not row numbers, some rows
    are unused (as damaged rows would be), and 20 vectors appear twice (same bytes)."""
    x = clustered(30, 8, 0.6, seed=1)
    x = np.vstack([x, x[:20]])  # identical vectors
    ids = np.arange(len(x), dtype=np.int64) * 3 + 5
    rows = np.zeros((ids.max() + 1, D), dtype=np.float32)
    rows[ids] = x
    return ids, x, rows


def reference(ids: np.ndarray, x: np.ndarray, threshold: float) -> dict[tuple[int, int], float]:
    """Brute force: every pair (a < b) whose cosine (in float64) is at least threshold."""
    gram = x.astype(np.float64) @ x.astype(np.float64).T
    gram = np.where(gram >= dups.ONE, 1.0, gram)
    i, j = np.nonzero(np.triu(gram >= threshold, k=1))
    return {(int(ids[a]), int(ids[b])): float(gram[a, b]) for a, b in zip(i, j, strict=True)}


def as_dict(p: dups.Pairs) -> dict[tuple[int, int], float]:
    assert p.a.dtype == np.int64 and p.b.dtype == np.int64 and p.score.dtype == np.float32
    assert np.all(p.a < p.b), "each pair once, a < b"
    got = {(int(a), int(b)): float(s) for a, b, s in zip(p.a, p.b, p.score, strict=True)}
    assert len(got) == len(p.a), "a pair listed twice"
    return got


def same_pairs(got: dict, want: dict, threshold: float) -> None:
    """Equal, but for pairs within float32 rounding of the threshold; scores to 1e-5."""
    close = {k for k, s in {**got, **want}.items() if abs(s - threshold) < 1e-6}
    assert set(got) - close == set(want) - close
    for k in set(got) & set(want):
        assert got[k] == pytest.approx(want[k], abs=1e-5), k
    assert all(s >= threshold for s in got.values())


# --- exact pairs ------------------------------------------------------------------------------


@pytest.mark.parametrize("threshold", [0.3, 0.8, 0.9, 0.97, 1.0])
def test_exact_pairs_are_the_brute_force_pairs(table, monkeypatch, threshold):
    monkeypatch.setattr(dups, "QUERY_BLOCK", 37)  # several blocks, the last one short
    ids, x, rows = table
    seen = []
    got = dups.exact_pairs(lambda i: rows[i], ids, threshold, progress=seen.append)
    assert got.threshold == threshold
    assert sum(seen) == len(ids)
    want = reference(ids, x, threshold)
    same_pairs(as_dict(got), want, threshold)
    if threshold == 1.0:  # only the identical vectors: each pair, with a score of exactly 1
        assert len(want) == 20 and set(as_dict(got)) == set(want)
        assert np.all(got.score == 1.0)
    # Sorted by (a, b): the answer does not depend on how the queries were split.
    assert np.array_equal(np.lexsort((got.b, got.a)), np.arange(len(got.a)))


def test_identical_vectors_pair_at_one():
    """Identical unit vectors score a hair under 1 in float32: a threshold of 1 (allowed
    by --near) must still find every pair of them, each scored 1."""
    x = unit(np.random.default_rng(0).standard_normal((50, 2048)))
    assert np.einsum("ij,ij->i", x, x).min() < 1.0  # the rounding this is about
    both = np.vstack([x, x])
    got = dups.exact_pairs(lambda i: both[i], np.arange(100), 1.0)
    assert as_dict(got) == {(i, i + 50): 1.0 for i in range(50)}


def test_pairs_exactly_at_the_threshold_count():
    """Cosines that are exact in float32 (one shared axis): at the threshold is in."""
    x = np.zeros((4, 8), dtype=np.float32)
    x[0, 0] = 1.0
    for row, c in ((1, 0.75), (2, 0.5), (3, 0.875)):
        x[row, 0], x[row, row] = c, math.sqrt(1 - c * c)
    rows = lambda i: x[i]  # noqa: E731
    assert as_dict(dups.exact_pairs(rows, np.arange(4), 0.75)) == {(0, 1): 0.75, (0, 3): 0.875}
    assert as_dict(dups.exact_pairs(rows, np.arange(4), 0.875)) == {(0, 3): 0.875}
    assert as_dict(dups.exact_pairs(rows, np.arange(4), 0.5)) == {
        (0, 1): 0.75, (0, 2): 0.5, (0, 3): 0.875, (1, 3): pytest.approx(0.65625),
    }  # fmt: skip
    assert as_dict(dups.exact_pairs(rows, np.arange(4), 0.876)) == {}


def test_exact_pairs_of_fewer_than_two_ids():
    for ids in (np.arange(0), np.arange(1)):
        got = dups.exact_pairs(lambda i: np.ones((len(i), D), np.float32), ids, 0.5)
        assert len(got.a) == len(got.b) == len(got.score) == 0 and got.threshold == 0.5


def test_pairs_at_least_and_without():
    p = dups.Pairs(
        np.array([1, 1, 2], np.int64), np.array([2, 3, 3], np.int64),
        np.array([0.95, 0.85, 0.91], np.float32), 0.8,
    )  # fmt: skip
    assert as_dict(p.at_least(0.9)) == {(1, 2): pytest.approx(0.95), (2, 3): pytest.approx(0.91)}
    assert p.at_least(0.9).threshold == 0.9
    assert as_dict(p.without(np.array([3]))) == {(1, 2): pytest.approx(0.95)}
    assert as_dict(p.without(np.array([], np.int64))) == as_dict(p)


# --- pairs from an index ------------------------------------------------------------------------


def ivf(ids: np.ndarray, x: np.ndarray, nlist: int, nprobe: int) -> faiss.Index:
    """An IVF index as `cbir build-index` makes it (factories.make_index), holding `ids`."""
    index = factories.make_index(f"IVF{nlist},Flat", D)
    index.train(x)
    index.add_with_ids(x, ids)
    factories.apply_params(index, {"nprobe": nprobe})
    return index


def from_either_end(index, ids, rows, threshold, lower_only: bool = False) -> dict:
    """What index_pairs must give: each candidate pair the index's range search finds from
    either of its ends (both among ids), kept when its exact cosine reaches the threshold
    (`lower_only`: only those found from their lower id)."""
    lims, _, found = index.range_search(rows[ids], threshold - dups.CANDIDATE_MARGIN)
    out, usable = {}, set(ids.tolist())
    for q, i in enumerate(ids.tolist()):
        for j in found[lims[q] : lims[q + 1]].tolist():
            if j != i and j in usable and not (lower_only and j < i):
                a, b = min(i, j), max(i, j)
                s = float(dups.snapped(np.dot(rows[a], rows[b])))
                if s >= threshold:
                    out[a, b] = s
    return out


@pytest.fixture(scope="module")
def spread() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids, vectors, rows) spread evenly over a 4-d subspace (no clusters for the IVF lists
    to follow): many close pairs lie across two lists."""
    rng = np.random.default_rng(2)
    x = unit(rng.standard_normal((400, 4)) @ rng.standard_normal((4, D)))
    x = unit(x + 0.02 * rng.standard_normal(x.shape))
    ids = np.arange(len(x), dtype=np.int64) * 2 + 1
    rows = np.zeros((ids.max() + 1, D), dtype=np.float32)
    rows[ids] = x
    return ids, x, rows


@pytest.mark.parametrize("threshold", [0.8, 0.95])
def test_ivf_pairs_are_exact_pairs_with_exact_scores(spread, monkeypatch, threshold):
    monkeypatch.setattr(dups, "QUERY_BLOCK", 50)
    ids, x, rows = spread
    index = ivf(ids, x, nlist=16, nprobe=2)
    exact = as_dict(dups.exact_pairs(lambda i: rows[i], ids, threshold))
    got = as_dict(dups.index_pairs(index, lambda i: rows[i], ids, threshold))
    assert set(got) <= set(exact), "an index may miss pairs, never invent one"
    for k, s in got.items():
        assert s == pytest.approx(exact[k], abs=1e-6)
    # Every pair the index finds from either end is kept (an IVF probes the lists near the
    # query, so b may be found from a but not a from b).
    assert got == pytest.approx(from_either_end(index, ids, rows, threshold), abs=1e-6)
    assert len(from_either_end(index, ids, rows, threshold, lower_only=True)) < len(got)
    assert len(got) < len(exact), "nprobe 2 of 16 lists should miss some pairs here"
    # pair_recall: the share of the exact pairs touching the sample that were found.
    p_got = dups.index_pairs(index, lambda i: rows[i], ids, threshold)
    p_exact = dups.exact_pairs(lambda i: rows[i], ids, threshold)
    assert dups.pair_recall(p_got, p_exact, ids) == pytest.approx(len(got) / len(exact))
    sample = ids[::7]
    touching = {k for k in exact if k[0] in set(sample) or k[1] in set(sample)}
    want = len(touching & set(got)) / len(touching)
    assert dups.pair_recall(p_got, p_exact, sample) == pytest.approx(want)
    # Probing every list finds every pair.
    factories.apply_params(index, {"nprobe": 16})
    every = dups.index_pairs(index, lambda i: rows[i], ids, threshold)
    assert as_dict(every) == pytest.approx(exact, abs=1e-6)
    assert dups.pair_recall(every, p_exact, ids) == 1.0


def test_index_pairs_only_among_the_given_ids(table):
    """Ids the index holds but the caller left out (damaged rows) never appear."""
    ids, x, rows = table
    index = factories.make_index("Flat", D)  # IndexIDMap2 around a flat index
    index.add_with_ids(x, ids)
    some = ids[ids % 2 == 1]
    got = as_dict(dups.index_pairs(index, lambda i: rows[i], some, 0.8))
    assert got == pytest.approx(reference(some, rows[some], 0.8), abs=1e-5)
    assert all(a in set(some) and b in set(some) for a, b in got)


def test_pair_recall_without_pairs_is_none():
    empty = dups.Pairs(*(np.empty(0, t) for t in (np.int64, np.int64, np.float32)), 0.9)
    assert dups.pair_recall(empty, empty, np.arange(5)) is None


# --- groups cut around centres ----------------------------------------------------------------


def pairs_of(edges: dict[tuple[int, int], float], threshold: float = 0.0) -> dups.Pairs:
    keys = sorted(edges)
    return dups.Pairs(
        np.array([k[0] for k in keys], np.int64),
        np.array([k[1] for k in keys], np.int64),
        np.array([edges[k] for k in keys], np.float32),
        threshold,
    )


def shuffled(p: dups.Pairs, seed: int) -> dups.Pairs:
    order = np.random.default_rng(seed).permutation(len(p.a))
    return dups.Pairs(p.a[order], p.b[order], p.score[order], p.threshold)


def check_groups(groups, p: dups.Pairs) -> None:
    """Every member within the threshold of its centre (its pair's score given), the centre
    first with 1.0, each id in at most one group."""
    edges = as_dict(p)
    seen: set[int] = set()
    for members, scores in groups:
        assert len(members) >= 2 and scores[0] == 1.0
        assert not seen & set(members), "an id in two groups"
        seen |= set(members)
        centre = members[0]
        for m, s in zip(members[1:], scores[1:], strict=True):
            pair = (min(centre, m), max(centre, m))
            assert pair in edges, f"{m} is not a neighbour of its centre {centre}"
            assert s == pytest.approx(edges[pair]) and s >= p.threshold
        # members by cosine to the centre, highest first, then id
        follow = list(zip(scores[1:], members[1:], strict=True))
        assert follow == sorted(follow, key=lambda t: (-t[0], t[1]))


def test_a_chain_is_not_one_group():
    """A-B-C-D where only neighbours are close: A and D never share a group."""
    a, b, c, d = 10, 11, 12, 13
    p = pairs_of({(a, b): 0.95, (b, c): 0.95, (c, d): 0.95}, 0.9)
    groups = dups.centred_groups(p)
    check_groups(groups, p)
    assert not any(a in m and d in m for m, _ in groups)
    # B and C tie (two neighbours, the same cosines): the lower id is the centre.
    assert [m for m, _ in groups] == [(b, a, c)]
    # A long chain: no group spans more than one step from its centre.
    long = pairs_of({(i, i + 1): 0.93 for i in range(50)}, 0.9)
    groups = dups.centred_groups(long)
    check_groups(groups, long)
    assert all(max(m) - min(m) <= 2 for m, _ in groups)


def test_groups_of_random_vectors(table):
    ids, x, rows = table
    for threshold in (0.8, 0.9, 0.99):
        p = dups.exact_pairs(lambda i: rows[i], ids, threshold)
        groups = dups.centred_groups(p)
        check_groups(groups, p)
        assert groups, threshold
        for seed in range(5):
            assert dups.centred_groups(shuffled(p, seed)) == groups


def test_ties_do_not_depend_on_the_order_of_the_pairs():
    """Two centres with the same number of neighbours and the same cosines in another order
    tie (float32 cosines add exactly in float64, in any order): the lower id is taken
    first, whatever the order of the pairs."""
    s = np.random.default_rng(0).uniform(0.9, 1.0, 3).astype(np.float32).tolist()
    edges = {(5, 6): s[0], (5, 7): s[1], (5, 8): s[2], (9, 10): s[2], (9, 11): s[1], (9, 12): s[0]}
    p = pairs_of(edges, 0.9)
    firsts = set()
    for perm in itertools.permutations(range(len(edges))):
        q = dups.Pairs(p.a[list(perm)], p.b[list(perm)], p.score[list(perm)], 0.9)
        firsts.add(dups.centred_groups(q)[0][0][0])
    assert firsts == {5}


# --- kinds ------------------------------------------------------------------------------------


def angled(block: int, cos: float, side: int = 1) -> np.ndarray:
    """A unit vector in the plane of axes 2*block and 2*block+1, at `cos` to its first axis
    (on the `side` of it given by the sign of its second coordinate)."""
    v = np.zeros(32, dtype=np.float32)
    v[2 * block], v[2 * block + 1] = cos, side * math.sqrt(1 - cos * cos)
    return v


@pytest.fixture(scope="module")
def kinds_world():
    """ids 0,1: same bytes; 2,3 same bytes and 4 an edited copy (0.95); 5,6 an edited pair
    (0.95, different bytes); 7,8 similar shots (0.85); 9 alone (0.7 to 7, 0.22 to 8)."""
    vecs = {
        0: angled(0, 1.0), 1: angled(0, 1.0),
        2: angled(1, 1.0), 3: angled(1, 1.0), 4: angled(1, 0.95),
        5: angled(2, 1.0), 6: angled(2, 0.95),
        7: angled(3, 1.0), 8: angled(3, 0.85), 9: angled(3, 0.7, side=-1),
    }  # fmt: skip
    sha = {0: "s0", 1: "s0", 2: "s2", 3: "s2", 4: "s4", 5: "s5", 6: "s6", 7: "s7", 8: "s8"}
    sha[9] = ""  # a row without a recorded hash never matches another
    ids = np.arange(10, dtype=np.int64)
    x = np.stack([vecs[i] for i in range(10)])
    return ids, sha, dups.exact_pairs(lambda i: x[i], ids, 0.8)


def summary(groups: list[dups.Group]) -> list[tuple[str, set[int]]]:
    seen: set[int] = set()
    for g in groups:
        assert not seen & set(g.ids), "an id in two groups"
        seen |= set(g.ids)
        assert g.centre == g.ids[0] and g.scores[0] == 1.0
    return [(g.kind, set(g.ids)) for g in groups]


EXACT, NEAR_234, NEAR_56, SIMILAR = (
    ("exact", {0, 1}), ("near", {2, 3, 4}), ("near", {5, 6}), ("similar", {7, 8}),
)  # fmt: skip


@pytest.mark.parametrize(
    "include,want",
    [
        (("exact", "near"), [EXACT, NEAR_234, NEAR_56]),
        (("exact", "near", "similar"), [EXACT, NEAR_234, NEAR_56, SIMILAR]),
        (("near",), [NEAR_234, NEAR_56]),  # same bytes is asked for with exact only
        # The same-bytes group was found, though not asked for: its images are not then
        # "similar shots".
        (("near", "similar"), [NEAR_234, NEAR_56, SIMILAR]),
        (("exact", "similar"), [EXACT, ("exact", {2, 3}), ("similar", {5, 6}), SIMILAR]),
        (("similar",), [("similar", {0, 1}), ("similar", {2, 3, 4}), ("similar", {5, 6}), SIMILAR]),
    ],
)
def test_find_groups_kinds(kinds_world, include, want):
    ids, sha, pairs = kinds_world
    got = dups.find_groups(ids, sha, pairs, include, near=0.9, similar=0.8)
    assert sorted(summary(got), key=lambda g: min(g[1])) == sorted(want, key=lambda g: min(g[1]))
    assert {g.kind for g in got} <= set(include)
    # the same groups whatever the order of the pairs
    again = dups.find_groups(ids, sha, shuffled(pairs, 3), include, near=0.9, similar=0.8)
    assert again == got


def test_exact_only_needs_no_pairs(kinds_world):
    ids, sha, _ = kinds_world
    got = dups.find_groups(ids, sha, None, ("exact",), near=0.9, similar=0.8)
    assert [(g.kind, g.ids, g.scores) for g in got] == [
        ("exact", (0, 1), (1.0, 1.0)), ("exact", (2, 3), (1.0, 1.0)),
    ]  # fmt: skip


def test_find_groups_thresholds(kinds_world):
    """A higher near threshold leaves the edited copies out (or to similar shots)."""
    ids, sha, pairs = kinds_world
    got = dups.find_groups(ids, sha, pairs, ("exact", "near"), near=0.99, similar=0.8)
    assert summary(got) == [("exact", {0, 1}), ("exact", {2, 3})]
    got = dups.find_groups(ids, sha, pairs, ("exact", "near", "similar"), near=0.99, similar=0.8)
    assert sorted(summary(got), key=lambda g: min(g[1])) == [
        ("exact", {0, 1}), ("exact", {2, 3}), ("similar", {5, 6}), SIMILAR,
    ]  # fmt: skip
    got = dups.find_groups(ids, sha, pairs, ("exact", "near", "similar"), near=0.9, similar=0.86)
    assert ("similar", {7, 8}) not in summary(got)
