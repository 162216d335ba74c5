"""The OpenVINO runtime: the model cache, CPU features, and vectors that match Keras'.

Fast tier: the cache (atomic builds, damaged entries, concurrent builders),
CPU flag parsing, calibration ids, and the loader's refusals; no TensorFlow.
Slow tier (real weights, TensorFlow, OpenVINO): fp32 equals Keras, bf16 and
int8 keep the neighbours, a damaged entry is rebuilt, two processes share one
entry, and a cache hit imports no TensorFlow.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import COREL, ROOT, corel_rows
from pipeline.embed import cpu
from pipeline.embed.modelcache import MANIFEST, ModelCache, default_root, make_key
from pipeline.errors import CbirError
from pipeline.retrieval import metrics

try:
    import openvino  # noqa: F401

    HAVE_OPENVINO = True
except ImportError:
    HAVE_OPENVINO = False

needs_openvino = pytest.mark.skipif(
    not HAVE_OPENVINO, reason="openvino is not installed (pip install -e '.[openvino]')"
)

PARTS = {"weights": "sha256:abc", "pooling": "avg", "precision": "fp32", "runtime": "test"}


def writer(calls: list[int] | None = None, payload: bytes = b"weights" * 1000):
    """A build function that writes two files (one in a subfolder) and counts its calls."""

    def build(folder: Path) -> dict:
        if calls is not None:
            calls.append(1)
        (folder / "model.bin").write_bytes(payload)
        (folder / "sub").mkdir()
        (folder / "sub" / "model.xml").write_text("<net/>")
        return {"fingerprint": {"pooling": "avg"}}

    return build


def leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith((".tmp-", ".trash-")))


# -- model cache (fast)


def test_entry_is_built_once_then_verified_and_reused(tmp_path):
    cache, calls = ModelCache(tmp_path), []
    entry = cache.get_or_build(PARTS, writer(calls))
    assert entry.path == tmp_path / make_key(PARTS)
    assert entry.meta == {"fingerprint": {"pooling": "avg"}}
    manifest = json.loads((entry.path / MANIFEST).read_text())
    assert manifest["parts"] == PARTS and sorted(manifest["files"]) == [
        "model.bin",
        "sub/model.xml",
    ]
    again = cache.get_or_build(PARTS, writer(calls))
    assert again == entry and calls == [1]
    assert cache.load(PARTS) == entry
    assert leftovers(tmp_path) == []


def test_key_depends_on_every_part():
    keys = {make_key(PARTS)} | {make_key({**PARTS, k: "other"}) for k in PARTS}
    assert len(keys) == len(PARTS) + 1
    assert make_key(dict(reversed(PARTS.items()))) == make_key(PARTS)  # order-free


def test_failed_build_leaves_no_entry_and_no_temporary_folder(tmp_path):
    cache = ModelCache(tmp_path)

    def broken(folder: Path) -> dict:
        (folder / "model.bin").write_bytes(b"half")
        raise RuntimeError("conversion failed")

    with pytest.raises(RuntimeError):
        cache.get_or_build(PARTS, broken)
    assert cache.load(PARTS) is None
    assert not (tmp_path / make_key(PARTS)).exists() and leftovers(tmp_path) == []


def _truncate(entry: Path) -> None:
    with open(entry / "model.bin", "r+b") as f:
        f.truncate(100)


def _flip(entry: Path, name: str = "model.bin") -> None:
    os.chmod(entry / name, 0o644)  # OpenVINO writes its blobs read-only
    data = bytearray((entry / name).read_bytes())
    data[len(data) // 2 :: 997] = bytes(b ^ 0x55 for b in data[len(data) // 2 :: 997])
    (entry / name).write_bytes(bytes(data))  # same size: only a checksum can tell


def _other_parts(entry: Path) -> None:
    manifest = json.loads((entry / MANIFEST).read_text())
    manifest["parts"]["precision"] = "int8"
    (entry / MANIFEST).write_text(json.dumps(manifest))


DAMAGE = {
    "truncated": _truncate,
    "flipped bytes": _flip,
    "missing file": lambda e: (e / "sub" / "model.xml").unlink(),
    "unexpected file": lambda e: (e / "extra.bin").write_bytes(b"?"),
    "no manifest": lambda e: (e / MANIFEST).unlink(),
    "garbled manifest": lambda e: (e / MANIFEST).write_text("{not json"),
    "manifest of other parts": _other_parts,
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_entry_is_rejected_then_rebuilt(tmp_path, damage):
    cache, calls = ModelCache(tmp_path), []
    entry = cache.get_or_build(PARTS, writer(calls))
    DAMAGE[damage](entry.path)
    assert cache.load(PARTS) is None  # never trusted
    rebuilt = cache.get_or_build(PARTS, writer(calls))
    assert calls == [1, 1]
    assert (rebuilt.path / "model.bin").read_bytes() == b"weights" * 1000
    assert not (rebuilt.path / "extra.bin").exists()
    assert cache.load(PARTS) == rebuilt and leftovers(tmp_path) == []


def test_leftovers_of_a_crashed_builder_are_swept(tmp_path):
    key = make_key(PARTS)
    (tmp_path / f".tmp-{key}-crashed").mkdir()
    (tmp_path / f".tmp-{key}-crashed" / "model.bin").write_bytes(b"partial")
    ModelCache(tmp_path).get_or_build(PARTS, writer())
    assert leftovers(tmp_path) == []


BUILDER = """
import sys, time
from pathlib import Path
from pipeline.embed.modelcache import ModelCache
def build(folder):
    with open(sys.argv[2], "a") as f:
        f.write("built\\n")
    time.sleep(1.0)  # long enough for the other process to arrive mid-build
    (folder / "model.bin").write_bytes(b"weights" * 1000)
    return {"by": sys.argv[3]}
entry = ModelCache(sys.argv[1]).get_or_build({"precision": "fp32"}, build)
print(entry.path, entry.meta["by"])
"""


def test_two_processes_building_at_once_leave_one_entry_built_once(tmp_path):
    log = tmp_path / "builds.log"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", BUILDER, str(tmp_path / "cache"), str(log), name],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
        )
        for name in ("a", "b")
    ]
    outputs = [p.communicate(timeout=60)[0].split() for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert outputs[0] == outputs[1]  # both use the same entry, made by one of them
    assert log.read_text() == "built\n"  # the second waited on the lock instead of building
    entries = [p for p in (tmp_path / "cache").iterdir() if p.is_dir()]
    assert len(entries) == 1 and leftovers(tmp_path / "cache") == []
    assert ModelCache(tmp_path / "cache").load({"precision": "fp32"}) is not None


def test_without_locks_the_rename_race_still_leaves_one_valid_entry(tmp_path, monkeypatch):
    from pipeline.embed import modelcache

    monkeypatch.setattr(modelcache, "fcntl", None)  # as on a platform without flock
    both_building = threading.Barrier(2)
    results, calls = [], []

    def build(folder: Path) -> dict:
        calls.append(1)
        both_building.wait(timeout=10)
        return writer()(folder)

    def worker() -> None:
        results.append(ModelCache(tmp_path).get_or_build(PARTS, build))

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert len(calls) == 2 and len(results) == 2 and results[0].path == results[1].path
    assert [p.name for p in tmp_path.iterdir()] == [make_key(PARTS)]  # loser's copy discarded
    assert ModelCache(tmp_path).load(PARTS) is not None


def test_cache_folder_from_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("CBIR_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_root() == tmp_path / "xdg" / "cbir"
    monkeypatch.setenv("CBIR_CACHE", str(tmp_path / "mine"))
    assert default_root() == tmp_path / "mine"
    assert ModelCache().root == tmp_path / "mine"


# -- CPU features (fast)

CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 9R14 96-Core Processor
flags\t\t: fpu sse2 avx2 avx512f avx512_vnni avx512_bf16 avx_vnni
bugs\t\t: sysret_ss_attrs

processor\t: 1
model name\t: AMD EPYC 9R14 96-Core Processor
flags\t\t: fpu sse2 avx2 avx512f avx512_vnni avx512_bf16 avx_vnni
"""


def features(flags: str) -> cpu.CpuFeatures:
    return cpu.CpuFeatures("test cpu", 2, frozenset(flags.split()))


def test_cpuinfo_is_parsed():
    model, flags = cpu.parse_cpuinfo(CPUINFO)
    assert model == "AMD EPYC 9R14 96-Core Processor"
    assert {"avx512_vnni", "avx512_bf16", "avx_vnni"} <= flags and "bugs" not in flags


def test_detect_reads_the_given_file(tmp_path):
    (tmp_path / "cpuinfo").write_text(CPUINFO)
    f = cpu.detect(tmp_path / "cpuinfo")
    assert f.int8 and f.bf16 and not f.amx and f.cores >= 1


@pytest.mark.parametrize(
    "flags, fast",
    [
        ("avx2 avx512f avx512_vnni avx512_bf16", ["int8", "bf16", "fp32"]),
        ("avx2 amx_bf16 amx_int8 amx_tile", ["int8", "bf16", "fp32"]),
        ("avx2 avx_vnni", ["int8", "fp32"]),
        ("avx2 avx512f", ["fp32"]),
        ("", ["fp32"]),
    ],
)
def test_fast_precisions(flags, fast):
    assert cpu.fast_precisions(features(flags)) == fast


def test_describe_is_one_line():
    line = cpu.describe(features("avx2 avx512f avx512_vnni sse2"))
    assert "\n" not in line
    assert line == "test cpu (2 cores; avx2 avx512f avx512_vnni; fast: int8, fp32)"


# -- the loader's refusals and calibration ids (fast: no TensorFlow)


def test_calibration_choice_is_deterministic_and_order_free():
    from pipeline.embed.calibration import choose_calibration

    paths = [f"/photos/{i:04d}.jpg" for i in range(1000)]
    chosen = choose_calibration(paths, 300)
    assert len(chosen) == 300 and chosen == sorted(chosen)
    assert choose_calibration(list(reversed(paths)), 300) == chosen
    assert choose_calibration(paths, 300, seed=1) != chosen
    assert choose_calibration(paths[:10], 300) == paths[:10]


def test_calibration_id_depends_on_contents_only(tmp_path):
    from pipeline.embed.calibration import calibration_id

    for name, data in (("a.jpg", b"one"), ("b.jpg", b"two"), ("c/b.jpg", b"two")):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(data)
    one = calibration_id([str(tmp_path / "a.jpg"), str(tmp_path / "b.jpg")])
    assert calibration_id([str(tmp_path / "c/b.jpg"), str(tmp_path / "a.jpg")]) == one
    (tmp_path / "b.jpg").write_bytes(b"changed")
    assert calibration_id([str(tmp_path / "a.jpg"), str(tmp_path / "b.jpg")]) != one
    with pytest.raises(CbirError, match="cannot read calibration image"):
        calibration_id([str(tmp_path / "missing.jpg")])


def test_missing_openvino_is_one_line_with_the_install_command(monkeypatch):
    from pipeline.embed import runtime_openvino as embed_openvino

    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino now raises ImportError
    with pytest.raises(CbirError, match=r"pip install -e '\.\[openvino\]'") as e:
        embed_openvino.load("imagenet")
    assert "\n" not in str(e.value)


@needs_openvino
def test_bf16_is_refused_on_a_cpu_without_it(monkeypatch, tmp_path):
    from pipeline.embed import runtime_openvino as embed_openvino

    monkeypatch.setattr(embed_openvino.cpu, "detect", lambda: features("avx2 avx512f"))
    with pytest.raises(CbirError, match="bf16 needs a CPU with AVX512-BF16 or AMX") as e:
        embed_openvino.load("imagenet", precision="bf16", cache_dir=str(tmp_path))
    assert "\n" not in str(e.value)


@needs_openvino
@pytest.mark.parametrize(
    "options, message",
    [
        ({"precision": "fp16"}, "unknown precision"),
        ({"pooling": "max"}, "unknown pooling"),
        ({"precision": "int8"}, "int8 needs calibration images"),
        ({"weights": "/nonexistent/w.weights.h5"}, "weights file not found"),
    ],
)
def test_bad_options_are_refused_before_any_conversion(tmp_path, options, message):
    from pipeline.embed import runtime_openvino as embed_openvino

    with pytest.raises(CbirError, match=message):
        embed_openvino.load(**{"weights": "imagenet", "cache_dir": str(tmp_path), **options})
    assert not any(tmp_path.iterdir())


# -- against Keras, on real Corel images (slow: TensorFlow, the real weights)


def corel_pixels(rows: list[dict[str, str]]) -> np.ndarray:
    from pipeline.config import Settings
    from pipeline.inputs.decode import decode_file

    return np.stack([decode_file(str(COREL / r["path"]), Settings.max_pixels).pixels for r in rows])


@pytest.fixture(scope="module")
def pixels16() -> np.ndarray:
    return corel_pixels(corel_rows("database", 2)[:16])


@pytest.fixture(scope="module")
def ov_cache(tmp_path_factory) -> str:
    """A model cache shared by the slow tests (each conversion is built once)."""
    return str(tmp_path_factory.mktemp("ov-cache"))


@pytest.fixture(scope="module")
def keras_avg(weights):
    from pipeline.embed import runtime_keras as embed_keras

    return embed_keras.load(weights, 32, "avg")


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=1)


@pytest.mark.slow
@needs_openvino
@pytest.mark.parametrize("pooling", ["avg", "gem"])
def test_fp32_vectors_equal_keras(weights, ov_cache, pixels16, keras_avg, pooling):
    from pipeline.embed import runtime_keras as embed_keras
    from pipeline.embed import runtime_openvino as embed_openvino

    keras = keras_avg if pooling == "avg" else embed_keras.load(weights, 32, pooling)
    ov = embed_openvino.load(weights, 8, pooling, "fp32", cache_dir=ov_cache)
    assert ov.fingerprint == keras.fingerprint  # the same family: vectors may be mixed
    assert ov.producer["runtime"] == "openvino" and ov.producer["precision"] == "fp32"
    assert ov.producer["calibration"] is None and ov.source == keras.source
    vectors = ov.embed(pixels16)  # batch 8: two full batches and the sub-batch split
    assert vectors.shape == (16, 2048) and vectors.dtype == np.float32
    assert cosines(vectors, keras.embed(pixels16)).min() >= 0.9999
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    odd = ov.embed(pixels16[:3])  # a short last batch needs no padding
    assert cosines(odd, vectors[:3]).min() >= 0.99999
    assert ov.embed(pixels16[:0]).shape == (0, 2048)
    single = embed_openvino.load(weights, 1, pooling, "fp32", cache_dir=ov_cache)  # the server's
    assert single.requests == 1  # LATENCY: every core on the one image
    assert cosines(single.embed(pixels16[:3]), vectors[:3]).min() >= 0.99999


def top10(vectors: np.ndarray) -> np.ndarray:
    """Each image's 10 nearest others (itself excluded)."""
    scores = vectors @ vectors.T
    np.fill_diagonal(scores, -np.inf)
    return np.argsort(-scores, axis=1, kind="stable")[:, :10]


@pytest.mark.slow
@needs_openvino
def test_bf16_and_int8_keep_the_neighbours(weights, ov_cache):
    from pipeline.embed import runtime_openvino as embed_openvino
    from pipeline.embed.calibration import choose_calibration

    rows = corel_rows("database", 10)  # 100 images querying each other
    pixels = corel_pixels(rows)
    used = {r["path"] for r in rows}
    others = [str(COREL / r["path"]) for r in corel_rows("database", 90) if r["path"] not in used]
    calibration = choose_calibration(others, 100)
    reference = top10(
        embed_openvino.load(weights, 32, "avg", "fp32", cache_dir=ov_cache).embed(pixels)
    )
    precisions = ["int8"] + (["bf16"] if cpu.detect().bf16 else [])
    for precision in precisions:
        cal = calibration if precision == "int8" else None
        e = embed_openvino.load(weights, 32, "avg", precision, cal, cache_dir=ov_cache)
        overlap = metrics.recall_at(top10(e.embed(pixels)), reference, 10)
        assert overlap >= 0.9, f"{precision}: top-10 overlap with fp32 {overlap:.3f}"
        assert e.producer["precision"] == precision
        assert (e.producer["calibration"] is not None) == (precision == "int8")


@pytest.mark.slow
@needs_openvino
def test_damaged_cache_entry_is_rebuilt_and_correct(
    weights, ov_cache, pixels16, keras_avg, tmp_path
):
    import shutil

    from pipeline.embed import openvino_convert
    from pipeline.embed import runtime_openvino as embed_openvino

    embed_openvino.load(weights, 32, "avg", "fp32", cache_dir=ov_cache)
    shutil.copytree(ov_cache, tmp_path / "cache")  # damage a copy, not the shared cache
    entry = ModelCache(tmp_path / "cache").path(
        make_key(openvino_convert.cache_parts(weights, "avg", "fp32", None))
    )
    with open(entry / "model.bin", "r+b") as f:
        f.truncate(f.seek(0, os.SEEK_END) // 2)
    e = embed_openvino.load(weights, 32, "avg", "fp32", cache_dir=str(tmp_path / "cache"))
    # No file outside the checksummed entry is loaded: OpenVINO's compiled-blob cache
    # (unchecked; a damaged blob gave wrong vectors with exit 0) is neither read nor made.
    assert not (tmp_path / "cache" / "openvino").exists()
    assert cosines(e.embed(pixels16), keras_avg.embed(pixels16)).min() >= 0.9999
    assert ModelCache(tmp_path / "cache").load(
        openvino_convert.cache_parts(weights, "avg", "fp32", None)
    )


EMBED_ONE = """
import sys, numpy as np
from pipeline.embed import runtime_openvino as embed_openvino
e = embed_openvino.load(sys.argv[1], 32, "avg", "fp32", cache_dir=sys.argv[2])
v = e.embed(np.full((1, 224, 224, 3), 128, np.uint8))
print(" ".join(f"{x:.6f}" for x in v[0, :8]), "tensorflow" in sys.modules, "keras" in sys.modules)
"""


def embed_one(weights: str, cache: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", EMBED_ONE, weights, cache],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.slow
@needs_openvino
def test_two_processes_filling_the_cache_leave_one_valid_entry(weights, tmp_path):
    from pipeline.embed import openvino_convert

    procs = [embed_one(weights, str(tmp_path)) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outs]
    assert outs[0][0].split()[:8] == outs[1][0].split()[:8]
    entries = [p.name for p in tmp_path.iterdir() if p.is_dir() and p.name != "openvino"]
    assert entries == [make_key(openvino_convert.cache_parts(weights, "avg", "fp32", None))]
    assert ModelCache(tmp_path).load(openvino_convert.cache_parts(weights, "avg", "fp32", None))


@pytest.mark.slow
@needs_openvino
def test_building_from_the_cache_imports_no_tensorflow(weights, ov_cache):
    from pipeline.embed import runtime_openvino as embed_openvino

    embed_openvino.load(weights, 32, "avg", "fp32", cache_dir=ov_cache)  # make sure it is there
    started = time.perf_counter()
    out, err = embed_one(weights, ov_cache).communicate(timeout=120)
    assert out.split()[-2:] == ["False", "False"], err[-2000:]  # neither tensorflow nor keras
    assert time.perf_counter() - started < 30
