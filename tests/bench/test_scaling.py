"""Index choice, recall measurement, memory-mapped search, synthetic vectors, bench scale."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from PIL import Image

import pipeline
from conftest import copy_collection
from pipeline.bench import synth
from pipeline.bench.extract import bench_scale
from pipeline.embed.interface import l2_normalize
from pipeline.errors import CbirError
from pipeline.retrieval import autoindex, exact, factories, index_files, indexes
from pipeline.store import collection


def clustered(n: int, dim: int = 64, centres: int = 20, seed: int = 0) -> np.ndarray:
    """Unit vectors in tight clusters, like features of a few visual concepts."""
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centres, dim))
    return l2_normalize(c[rng.integers(0, centres, n)] + 0.3 * rng.standard_normal((n, dim)))


def test_parse_size():
    assert autoindex.parse_size("2GB") == 2 << 30
    assert autoindex.parse_size("512 MiB") == 512 << 20
    assert autoindex.parse_size("1.5g") == int(1.5 * (1 << 30))
    with pytest.raises(CbirError, match="memory size"):
        autoindex.parse_size("lots")


@pytest.mark.parametrize(
    "n,budget,kind",
    [
        (500, "2GB", "Flat"),
        (50_000, "2GB", "HNSW32"),
        (1_000_000, "32GB", "IVF1024,Flat"),
        (1_000_000, "2GB", "IVF1024,PQ"),
        (10_000_000, "8GB", "IVF4096,PQ"),
    ],
)
def test_auto_choice_is_a_valid_index_for_tiny_and_large_collections(n, budget, kind):
    choice = autoindex.choose(n, 2048, autoindex.parse_size(budget))
    assert choice.factory.startswith(kind)
    assert choice.bytes_estimate <= autoindex.parse_size(budget)
    index = factories.make_index(choice.factory, 2048)  # FAISS accepts the string
    factories.apply_params(index, choice.params)  # and every parameter
    if "PQ" in choice.factory:
        assert choice.params["refine"] >= 1 and choice.bytes_estimate < n * 2048 * 4 / 8
    with pytest.raises(CbirError, match="raise --max-memory"):
        autoindex.choose(n, 2048, 1 << 10)


def test_recall_on_a_toy_case():
    x = clustered(2000)
    ids = np.arange(2000)
    probe = autoindex.make_probe(x, ids, n_queries=50)
    # exact_top_k agrees with a plain full sort
    full = np.argsort(-(probe.queries @ x.T), axis=1, kind="stable")[:, :10]
    assert (np.sort(probe.truth, axis=1) == np.sort(full, axis=1)).all()
    ivf = factories.make_index("IVF32,Flat", 64)
    indexes.fill(ivf, x, ids)
    assert autoindex.measure_recall(ivf, probe, {"nprobe": 32}) == 1.0
    low = autoindex.measure_recall(ivf, probe, {"nprobe": 1})
    assert 0.0 < low < 1.0
    tuned = autoindex.tune(ivf, probe, 0.99, {})
    assert autoindex.measure_recall(ivf, probe, tuned) >= 0.99 and tuned["nprobe"] <= 32


@pytest.mark.parametrize("factory", ["Flat", "IVF16,Flat", "IVF16,PQ8", "HNSW16"])
def test_memory_mapped_search_equals_in_memory(tmp_path, factory):
    x = clustered(3000)
    index = factories.make_index(factory, 64)
    indexes.fill(index, x, np.arange(3000))
    path = tmp_path / "i.faiss"
    index_files.write_atomic(index, path)
    in_mem, mapped = index_files.read(path, mmap=False), index_files.read(path, mmap=True)
    q = x[:25]
    d1, i1 = in_mem.search(q, 10)
    d2, i2 = mapped.search(q, 10)
    assert (i1 == i2).all() and np.allclose(d1, d2)


def test_synthetic_vectors_look_like_the_real_ones():
    real = clustered(300, dim=128)
    fake = np.concatenate(list(synth.generate(real, 3000, chunk=1000)))
    assert fake.shape == (3000, 128)
    assert np.allclose(np.linalg.norm(fake, axis=1), 1, atol=1e-5)

    def nn_cos(v, ref):
        s = v @ ref.T
        s[s > 0.99999] = -1  # ignore self
        return np.median(s.max(axis=1))

    # As close to the real collection as real vectors are to each other, and far from uniform.
    assert abs(nn_cos(fake[:300], real) - nn_cos(real, real)) < 0.1
    uniform = l2_normalize(np.random.default_rng(0).standard_normal((300, 128)))
    assert nn_cos(uniform, real) < nn_cos(fake[:300], real) - 0.2


def test_bench_scale_writes_csv_and_plots(tmp_path):
    real = clustered(200, dim=64)
    rows = bench_scale(
        real, [200, 600], ["flat", "ivf", "hnsw"], tmp_path, n_queries=20, log=lambda _: None
    )
    with open(tmp_path / "scale.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(rows)
    assert {r["source"] for r in table} == {"real", "synthetic"}
    assert {"build_s", "bytes_per_vector", "single_qps", "batch_qps", "recall_at_10"} <= set(
        table[0]
    )
    assert all(float(r["recall_at_10"]) == 1.0 for r in table if r["factory"] == "Flat")
    for size in (200, 600):
        with Image.open(tmp_path / f"recall-qps-{size}.png") as im:
            assert im.size[0] > 300
    assert not list(tmp_path.glob("*.f32")) and not list(tmp_path.glob("*.faiss"))


@pytest.mark.slow
def test_build_index_reports_recall_and_auto_records_its_choice(tmp_path, corel_collection):
    c = copy_collection(corel_collection, tmp_path / "copy")
    o = {"catalog": c["catalog"], "index_dir": c["index_dir"]}
    rec = pipeline.build_index("auto", auto=True, **o)
    assert rec["factory"] == "Flat" and rec["recall_at_10"] == 1.0 and rec["note"]
    rec = pipeline.build_index("ivf", "IVF8,Flat", ["nprobe=1"], **o)
    assert 0 < rec["recall_at_10"] <= 1.0
    rec = pipeline.build_index("ivf-tuned", "IVF8,Flat", target_recall=0.99, **o)
    assert rec["recall_at_10"] >= 0.99
    shown = {i["name"]: i for i in pipeline.info(**o)["indexes"]}
    assert shown["auto"]["note"] and shown["ivf-tuned"]["recall_at_10"] >= 0.99


@pytest.mark.slow
def test_exact_search_from_the_vector_file_equals_the_flat_index(
    tmp_path, corel_collection, monkeypatch
):
    c = copy_collection(corel_collection, tmp_path / "copy")
    o = {"catalog": c["catalog"], "index_dir": c["index_dir"]}
    ids = list(range(0, 200, 9))
    flat = pipeline.search(ids, **o)
    monkeypatch.setattr(indexes, "EXACT_FROM_FILE_BYTES", 1)  # as for a large collection
    coll = collection.reading(o["catalog"], o["index_dir"])
    index, record, _ = indexes.load(coll, "exact")
    assert isinstance(index, exact.VectorFileExact) and record["factory"] == "vector file"
    from_file = pipeline.search(ids, **o)
    assert from_file == flat
    with pytest.raises(CbirError, match="no search parameter"):
        pipeline.search(ids, params=["nprobe=4"], **o)
