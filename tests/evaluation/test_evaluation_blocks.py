"""Leave-one-out evaluation works in query blocks with bounded memory and equal results."""

from __future__ import annotations

import tracemalloc

import pytest

import fakes
import pipeline
from pipeline import api
from pipeline.evaluation import common


@pytest.fixture
def labelled(tmp_path, monkeypatch):
    monkeypatch.setattr(api.models, "cached_embedder", fakes.cached)
    fakes.make_images(tmp_path / "imgs", 60)
    o = {"catalog": str(tmp_path / "c.db"), "index_dir": str(tmp_path / "idx")}
    pipeline.index([tmp_path / "imgs"], **o)
    return o


def test_blocks_give_the_same_figures(labelled, monkeypatch):
    whole = pipeline.evaluate(leave_one_out=True, **labelled)
    monkeypatch.setattr(common, "BLOCK_ENTRIES", 7 * 60)  # 7 queries per block
    blocked = pipeline.evaluate(leave_one_out=True, **labelled)
    assert blocked["queries"] == whole["queries"] == 60
    assert blocked["per_query"] == whole["per_query"]
    assert blocked["map"] == whole["map"]
    blocked = pipeline.evaluate(leave_one_out=True, rerank="dba+aqe", **labelled)
    monkeypatch.setattr(common, "BLOCK_ENTRIES", 10**9)
    assert blocked["per_query"] == pipeline.evaluate(leave_one_out=True, rerank="dba+aqe", **labelled)["per_query"]  # fmt: skip


def test_memory_grows_with_the_block_not_the_square(labelled, monkeypatch):
    def peak(entries: int) -> int:
        monkeypatch.setattr(common, "BLOCK_ENTRIES", entries)
        tracemalloc.start()
        pipeline.evaluate(leave_one_out=True, **labelled)
        used = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return used

    # One block of 60x60 against blocks of one query: the ranking arrays shrink.
    assert peak(60) < peak(10**9)
