"""Synthetic vectors that behave like real ResNet50 features, for scaling experiments.

Uniform random vectors are a poor stand-in: in 2048 dimensions they are all
nearly orthogonal, have no clusters, and make every index look either perfect
or hopeless. Instead each synthetic vector is made from the real features:

    v = normalise((1 - lam) * a + lam * b + sigma * z)

where a is a random real vector, b one of a's 10 nearest real neighbours,
lam ~ U(0, 0.5), and z Gaussian noise shaped like the real features' spread
per dimension. sigma is calibrated so that a synthetic vector sits as close to
its anchor as real vectors sit to their nearest neighbour (median cosine), so
local density and cluster structure follow the real collection. `cbir bench
scale` checks the result by comparing index recall on real and generated
vectors at the real collection's size.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from pipeline.embed.interface import l2_normalize


def _neighbours(real: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    sims = real @ real.T
    np.fill_diagonal(sims, -np.inf)
    nb = np.argsort(-sims, axis=1)[:, :n]
    return nb, np.take_along_axis(sims, nb[:, :1], axis=1)[:, 0]


def _mix(real, nb, std, sigma, n, rng) -> np.ndarray:
    a = rng.integers(0, len(real), n)
    b = nb[a, rng.integers(0, nb.shape[1], n)]
    lam = rng.uniform(0.0, 0.5, (n, 1)).astype(np.float32)
    noise = rng.standard_normal((n, real.shape[1]), dtype=np.float32) * std
    return l2_normalize((1 - lam) * real[a] + lam * real[b] + sigma * noise)


def calibrate(real: np.ndarray, seed: int = 0) -> float:
    """sigma such that median cos(v, anchor) matches the real median nearest-neighbour cosine."""
    nb, nn_cos = _neighbours(real, 10)
    target = float(np.median(nn_cos))
    std = real.std(axis=0)
    lo, hi = 0.0, 10.0
    for _ in range(25):
        sigma = (lo + hi) / 2
        rng = np.random.default_rng(seed)
        n = min(2000, 4 * len(real))
        a = rng.integers(0, len(real), n)
        noisy = l2_normalize(real[a] + sigma * rng.standard_normal((n, real.shape[1])) * std)
        cos = np.median(np.sum(noisy * real[a], axis=1))
        lo, hi = (sigma, hi) if cos > target else (lo, sigma)
    return (lo + hi) / 2


def generate(real: np.ndarray, n: int, seed: int = 0, chunk: int = 50_000) -> Iterator[np.ndarray]:
    """Yield n synthetic unit vectors in chunks (so a million never sit in memory twice)."""
    real = l2_normalize(real)
    nb, _ = _neighbours(real, 10)
    std = real.std(axis=0).astype(np.float32)
    sigma = calibrate(real, seed)
    rng = np.random.default_rng(seed + 1)
    for start in range(0, n, chunk):
        yield _mix(real, nb, std, sigma, min(chunk, n - start), rng)
