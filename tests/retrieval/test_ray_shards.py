"""Sharded IVF builds on a real multi-node Ray cluster on this machine (slow tier).

A head and two worker nodes (one CPU and a 100 MB object store each) run the
shard tasks; `build-index --engine ray --shards 3` must give the top 10s of a
single-shot build of the same factory, and an on-disk index must grow there too.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import fakes
from pipeline import api
from pipeline.cli import main
from pipeline.retrieval import factories, indexes
from pipeline.store import catalog, collection, reads

pytestmark = pytest.mark.slow
ray = pytest.importorskip("ray")

STORE = 100 * 2**20


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": STORE})
    for _ in range(2):
        c.add_node(num_cpus=1, object_store_memory=STORE)
    try:
        c.wait_for_nodes()
        ray.init(address=c.address, logging_level=logging.WARNING, log_to_driver=False)
        yield c
    finally:
        ray.shutdown()
        c.shutdown()


@pytest.fixture(autouse=True)
def fake_model(monkeypatch):
    monkeypatch.setattr(api.models, "cached_embedder", fakes.cached)


def cli(*args) -> str:
    r = CliRunner().invoke(main, [str(a) for a in args])
    assert r.exit_code == 0, r.output
    return r.output


def test_ray_sharded_build_returns_the_single_shot_top10(cluster, tmp_path):
    assert len([n for n in ray.nodes() if n["Alive"]]) == 3
    o = ["--catalog", tmp_path / "c.db", "--index-dir", tmp_path / "idx"]
    fakes.make_images(tmp_path / "imgs", 90)
    cli("index", tmp_path / "imgs", *o)
    cli("build-index", "one", "--factory", "IVF8,Flat", "--nprobe", "2", *o)
    out = cli(
        "build-index", "sh", "--factory", "IVF8,Flat", "--nprobe", "2",
        "--engine", "ray", "--shards", "3", *o,
    )  # fmt: skip
    assert "3 shards added" in out and "(ray)" in out, out
    record = api.build_index(
        "sh2", factory="IVF8,Flat", engine="ray", shards=3, catalog=o[1], index_dir=o[3]
    )
    assert os.getpid() not in record["timings"]["pids"]  # the shards ran in Ray workers

    coll = collection.reading(tmp_path / "c.db", tmp_path / "idx")
    try:
        single, _, _ = indexes.load(coll, "one")
        merged, rec, _ = indexes.load(coll, "sh")
        assert rec["data_bytes"] > 0
        rows = np.asarray(coll.rows()[coll.indexed_ids()])
        d1, i1 = single.search(rows, 10)
        d2, i2 = merged.search(rows, 10)
        np.testing.assert_array_equal(i1, i2)
        np.testing.assert_allclose(d1, d2, atol=1e-5)
    finally:
        coll.close()
    a = cli("search", "--id", "7", "--index", "one", "--json", *o)
    b = cli("search", "--id", "7", "--index", "sh", "--json", *o)
    assert json.loads(a)["results"] == json.loads(b)["results"]

    # Growing it on the cluster: the added ids go to Ray tasks, the merge stays here.
    fakes.make_images(tmp_path / "more", 15, seed=5)
    cli("index", tmp_path / "more", *o)
    out = cli("build-index", "sh", "--update", "--engine", "ray", "--shards", "2", *o)
    assert "added 15, removed 0" in out, out
    coll = collection.reading(tmp_path / "c.db", tmp_path / "idx")
    try:
        index, _, _ = indexes.load(coll, "sh")
        np.testing.assert_array_equal(factories.stored_ids(index), coll.indexed_ids())
    finally:
        coll.close()
    assert "verify: ok" in cli("verify", *o)
    db = catalog.open_reader(Path(o[1]))
    assert reads.index_record(db, "sh")["generation"] == reads.generation(db)
    db.conn.close()
