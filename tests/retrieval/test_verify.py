"""Local-feature verification (`retrieval.verify`): geometry recovered on a synthetic pair
with a known homography, the re-ranking on hand-made cases, the cache's bound, and a file
changed since indexing left unverified."""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from pipeline.retrieval import local_features, verify

W, H = 400, 300
# A known homography: 8 degrees of rotation, 0.9x scale, a shift and a little perspective.
ANGLE = np.deg2rad(8)
TRUE_H = np.array(
    [
        [0.9 * np.cos(ANGLE), -0.9 * np.sin(ANGLE), 40.0],
        [0.9 * np.sin(ANGLE), 0.9 * np.cos(ANGLE), 10.0],
        [2e-4, 1e-4, 1.0],
    ]
)


def textured(seed: int) -> np.ndarray:
    """An RGB image full of corners and blobs at many scales (SIFT finds hundreds)."""
    rng = np.random.default_rng(seed)
    img = np.full((H, W, 3), 128, np.uint8)
    for _ in range(140):
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        x, y = int(rng.integers(0, W)), int(rng.integers(0, H))
        r = int(rng.integers(3, 25))
        if rng.random() < 0.5:
            cv2.circle(img, (x, y), r, colour, -1)
        else:
            cv2.rectangle(img, (x, y), (x + r, y + int(rng.integers(3, 25))), colour, -1)
    return cv2.GaussianBlur(img, (3, 3), 0)


@pytest.fixture(scope="module")
def pair():
    base = textured(1)
    warped = cv2.warpPerspective(base, TRUE_H, (W, H))
    return (
        local_features.extract(base),
        local_features.extract(warped),
        local_features.extract(textured(2)),
    )


def test_known_homography_is_recovered(pair):
    base, warped, _ = pair
    v = verify.match(base, warped)
    assert v.geometry == "homography" and v.model is not None
    assert v.inliers >= 50
    assert v.inlier_mask.sum() == v.inliers and len(v.query_points) == len(v.inlier_mask)
    # Points of the central part of the image land within 2 px of where the true H puts them.
    grid = np.float32([[x, y] for x in range(80, 330, 50) for y in range(60, 250, 45)])
    got = cv2.perspectiveTransform(grid[None], v.model)[0]
    want = cv2.perspectiveTransform(grid[None], TRUE_H)[0]
    assert np.abs(got - want).max() < 2.0
    # The inliers themselves obey the true H; the rejected matches mostly do not.
    mapped = cv2.perspectiveTransform(v.query_points[None], TRUE_H)[0]
    err = np.linalg.norm(mapped - v.candidate_points, axis=1)
    assert np.median(err[v.inlier_mask]) < 1.5
    corners = v.region((W, H))
    assert corners.shape == (4, 2)
    assert np.abs(corners[0] - TRUE_H[:2, 2]).max() < 3  # (0, 0) goes to the shift


def test_unrelated_images_get_a_few_chance_inliers_at_most(pair):
    base, warped, other = pair
    # Random matches of look-alike blobs fit a homography by chance a few at a time (on
    # Holidays, 0.6% of unrelated pairs pass 6 inliers, 0.09% pass 7): a small bonus at most.
    chance = verify.match(base, other).inliers
    assert chance <= 8 and verify.score(0.5, chance) < 0.5 + verify.DEFAULT.weight / 4
    assert verify.match(base, warped).inliers > 10 * max(chance, 1)


def test_fundamental_matrix_is_an_alternative(pair):
    base, warped, _ = pair
    v = verify.match(base, warped, verify.Params(geometry="fundamental", reproj_px=1.0))
    assert v.model.shape == (3, 3) and v.inliers >= 50 and v.region((W, H)) is None


def test_rerank_moves_a_verified_candidate_up_and_keeps_the_tail(pair):
    base, warped, other = pair
    feats = {1: other, 2: warped, 3: None, 4: warped}
    ids, cosines = [1, 3, 2, 4], [0.90, 0.85, 0.80, 0.70]
    r = verify.verify_rerank(base, ids, cosines, feats.get, top_n=3)
    # 2 (the warped copy, many inliers) passes 1 (unrelated: a few chance inliers at
    # most) and 3 (no features: skipped, keeps its cosine); 4 is past N and stays last
    # even though it would verify.
    assert r.ids.tolist() == [2, 1, 3, 4]
    assert r.skipped == [3] and set(r.checks) == {1, 2}
    assert r.scores[0] == pytest.approx(0.80 + verify.DEFAULT.weight)
    assert 0.90 <= r.scores[1] < 0.90 + verify.DEFAULT.weight / 4
    assert r.scores[2:].tolist() == pytest.approx([0.85, 0.70])
    threaded = verify.verify_rerank(base, ids, cosines, feats.get, top_n=3, workers=2)
    assert threaded.ids.tolist() == r.ids.tolist()


def test_reordered_hand_made_inliers():
    p = verify.Params(floor=8, cap=20, weight=0.5)
    ids, cos = [10, 11, 12, 13, 14], [0.9, 0.8, 0.7, 0.6, 0.5]
    # 12: 18 inliers = 10 above the floor, half the bonus; 11: at the floor, no bonus;
    # 14 past N with many inliers: not re-ranked.
    got, scores = verify.reordered(ids, cos, {11: 8, 12: 18, 14: 100}, top_n=4, params=p)
    assert got.tolist() == [12, 10, 11, 13, 14]
    assert scores.tolist() == pytest.approx([0.95, 0.9, 0.8, 0.6, 0.5])
    # equal scores keep the first-pass order
    got, _ = verify.reordered([5, 6, 7], [0.5, 0.5, 0.5], {}, top_n=3, params=p)
    assert got.tolist() == [5, 6, 7]


def _row(path) -> dict:
    st = os.stat(path)
    sha = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    return {"path": str(path), "size": st.st_size, "mtime": st.st_mtime, "sha256": sha}


def test_cache_is_bounded_and_least_recently_used_goes(tmp_path, monkeypatch):
    rows = {}
    for i in range(3):
        Image.fromarray(textured(10 + i)).save(tmp_path / f"{i}.png")
        rows[i] = _row(tmp_path / f"{i}.png")
    calls = []
    real = local_features.file_features
    monkeypatch.setattr(
        local_features, "file_features", lambda p, *a: calls.append(p) or real(p, *a)
    )
    cache = local_features.FeatureCache(max_items=2)
    get = cache.source(rows)
    assert get(0) is not None and get(1) is not None and get(0) is not None
    assert len(calls) == 2  # 0 again came from the cache
    get(2)  # evicts 1, the least recently used
    assert len(cache) == 2
    get(0)
    assert len(calls) == 3
    get(1)
    assert len(calls) == 4 and len(cache) == 2
    assert get(99) is None  # not in the rows: nothing to verify
    assert not cache.notices


def test_a_file_changed_since_indexing_is_not_verified(tmp_path):
    path = tmp_path / "a.png"
    Image.fromarray(textured(5)).save(path)
    row = _row(path)
    cache = local_features.FeatureCache()
    assert cache.features(7, row) is not None
    # Touched but the same bytes: still the indexed image.
    os.utime(path, (1, 1))
    assert cache.features(7, row) is not None and not cache.notices
    # New bytes under the old name: skipped with a notice, even though cached before.
    Image.fromarray(textured(6)).save(path)
    assert cache.features(7, row) is None
    assert len(cache.notices) == 1 and "changed since it was indexed" in cache.notices[0]
    path.write_bytes(b"not an image")
    mine: list[str] = []
    assert cache.source({7: row}, mine)(7) is None
    assert len(cache.notices) == 1 and len(mine) == 1 and "not verified" in mine[0]


def test_query_features_from_a_path_bytes_or_pixels_are_bounded(tmp_path):
    big = cv2.resize(textured(3), (960, 720))
    Image.fromarray(big).save(tmp_path / "big.png")
    data = io.BytesIO()
    Image.fromarray(big).save(data, "PNG")
    params = local_features.Extraction(max_side=640)
    for query in (str(tmp_path / "big.png"), data.getvalue(), big):
        feats = local_features.query_features(query, 10**8, params)
        assert feats.size == (640, 480) and 50 < len(feats.points) <= params.max_features
        assert feats.descriptors.dtype == np.uint8 and feats.descriptors.shape[1] == 128
    # the picture the points are in, for drawing them: the same bounded decode
    drawn = local_features.feature_image(str(tmp_path / "big.png"), 10**8, params)
    assert drawn.pixels.shape == (480, 640, 3)
    with pytest.raises(local_features.DecodeError):
        local_features.query_features(b"not an image", 10**8, params)


def test_hostile_parameters_are_refused_in_one_line():
    from pipeline.errors import CbirError

    for bad in ({"detector": "surf"}, {"geometry": "affine"}, {"ratio": float("nan")},
                {"max_side": 10**9}, {"cap": 0}, {"weight": float("inf")}):  # fmt: skip
        with pytest.raises(CbirError):
            verify.DEFAULT.replace(**bad)
    assert verify.DEFAULT.replace(floor=None) == verify.DEFAULT
