"""Micro-batching in the web server: concurrent embeds share forward passes, results stay exact."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

import fakes
from pipeline.api.batcher import MicroBatcher


class SlowFake(fakes.FakeEmbedder):
    """The fake model, 20 ms per forward pass whatever its size, counting its calls."""

    def __init__(self):
        super().__init__(batch_size=8)
        self.calls = 0

    def embed(self, pixels):
        self.calls += 1
        time.sleep(0.02)
        return super().embed(pixels)


def test_concurrent_embeds_are_batched_and_exact():
    inner = SlowFake()
    batcher = MicroBatcher(inner, max_batch=8, wait_s=0.01)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (16, 224, 224, 3), dtype=np.uint8)
    want = fakes.FakeEmbedder().embed(images)
    got: list[np.ndarray | None] = [None] * 16

    def one(i: int) -> None:
        got[i] = batcher.embed(images[i : i + 1])[0]

    threads = [threading.Thread(target=one, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    np.testing.assert_allclose(np.stack(got), want, atol=1e-6)
    assert inner.calls < 16 and max(batcher.batches) > 1, batcher.batches
    assert sum(batcher.batches) == 16 and max(batcher.batches) <= 8


def test_an_error_reaches_every_caller_and_the_worker_lives_on():
    class Broken(fakes.FakeEmbedder):
        fail = True

        def embed(self, pixels):
            if self.fail:
                raise ValueError("model failed")
            return super().embed(pixels)

    inner = Broken()
    batcher = MicroBatcher(inner, max_batch=4, wait_s=0.001)
    with pytest.raises(ValueError, match="model failed"):
        batcher.embed(np.zeros((1, 224, 224, 3), np.uint8))
    inner.fail = False
    assert batcher.embed(np.zeros((2, 224, 224, 3), np.uint8)).shape == (2, 2048)
    assert batcher.fingerprint == inner.fingerprint  # the model's own attributes show through


def test_whole_images_of_different_shapes_share_a_pass():
    """Whole-image descriptors: uploads of other aspect ratios meet in one forward pass."""
    inner = SlowFake()
    batcher = MicroBatcher(inner, max_batch=8, wait_s=0.05)
    rng = np.random.default_rng(3)
    shapes = [(224, 298, 3), (298, 224, 3), (224, 224, 3), (224, 400, 3)]
    images = [rng.integers(0, 255, s, dtype=np.uint8) for s in shapes]
    got: dict[int, np.ndarray] = {}

    def call(i: int) -> None:
        got[i] = batcher.embed([images[i]])

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(images))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, im in enumerate(images):
        np.testing.assert_allclose(got[i], fakes.FakeEmbedder().embed([im]), atol=1e-6)
    assert sum(batcher.batches) == 4 and len(batcher.batches) < 4  # some passes were shared
