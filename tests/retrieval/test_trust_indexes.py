"""Index files and whitening files are trusted only as far as their recorded digests (issue 17).

An index file damaged without a size change (zeroed, random bytes, one flipped
bit) must never answer: `search --index`, `verify`, `build-index --update` and
`evaluate --index` each give one line naming `cbir build-index NAME` and exit
non-zero; the exact index is rebuilt in memory and answers as if undamaged. A
whitening file with non-finite or absurd values is refused, and a rebuild never
silently takes up a changed one. Factory strings that kill FAISS (an assertion,
SIGFPE, a segfault) or hang it are one line, exit 2, before any work. Catalogs
written before digests were recorded are still served, and `verify` says so.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import faiss
import numpy as np
import pytest

import fakes
from fakes import cli, ok, one_line_error, opts
from pipeline import api
from pipeline.retrieval import factories, index_files, indexes, whitening, whitening_fit
from pipeline.store import catalog, collection, reads, schema


@pytest.fixture(autouse=True)
def fake_model(monkeypatch):
    monkeypatch.setattr(api.models, "cached_embedder", fakes.cached)
    # Each test damages fresh copies: no verdict of an earlier test may stand for them.
    monkeypatch.setattr(index_files, "_CHECKED", {})


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """40 labelled images (fake model) with an IVF index in one file, an on-disk IVF index
    and an HNSW index; tests work on copies."""
    folder = tmp_path_factory.mktemp("trust-indexes")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(api.models, "cached_embedder", fakes.cached)
        fakes.make_images(folder / "imgs", 40)
        ok(cli("index", folder / "imgs", *opts(folder)), "index")
        ok(cli("build-index", "ivf", "--factory", "IVF4,Flat", "--nprobe", "4", *opts(folder)))
        ok(cli("build-index", "od", "--factory", "IVF4,Flat", "--shards", "2", *opts(folder)))
        ok(cli("build-index", "hnsw", "--factory", "HNSW8", *opts(folder)))
    return folder


@pytest.fixture
def state(base, tmp_path) -> Path:
    dest = tmp_path / "s"
    shutil.copytree(base, dest)
    return dest


record = fakes.index_record


def files_of(state: Path, name: str) -> tuple[Path, Path]:
    path = index_files.index_path(state / "idx", name, record(state, name))
    return path, index_files.data_path(path)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def damage(path: Path, how: str) -> None:
    """Damage that keeps the file's size."""
    data = bytearray(path.read_bytes())
    n = len(data)
    if how == "zero":
        data[:] = bytes(n)
    elif how == "zero-second-half":
        data[n // 2 :] = bytes(n - n // 2)
    elif how == "random":
        data[n // 3 : n // 3 + 4096] = np.random.default_rng(7).bytes(
            len(data[n // 3 : n // 3 + 4096])
        )
    elif how == "bitflip":
        data[n // 2] ^= 0x40  # an exponent bit of a float in the middle of the lists
    path.write_bytes(bytes(data))
    assert path.stat().st_size == n


# --- damaged index files ---------------------------------------------------------------------

CASES = [
    ("od", "data", "zero"),
    ("od", "data", "random"),
    ("od", "data", "bitflip"),
    ("ivf", "faiss", "zero-second-half"),
    ("ivf", "faiss", "bitflip"),
    ("hnsw", "faiss", "random"),
]


@pytest.mark.parametrize("name,which,how", CASES)
def test_index_damaged_without_a_size_change_never_answers(state, name, which, how):
    faiss_file, data_file = files_of(state, name)
    damage(data_file if which == "data" else faiss_file, how)
    rebuild = f"cbir build-index {name}"
    for args in (
        ["search", "--id", 3, "--index", name],
        ["build-index", name, "--update"],
        ["evaluate", "--leave-one-out", "--index", name],
    ):
        line = one_line_error(cli(*args, *opts(state)), 1)
        assert rebuild in line and "damaged" in line, (args, line)
    r = cli("verify", *opts(state))
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert [p for p in r.output.splitlines() if p.startswith("PROBLEM") and rebuild in p]
    # The record still names the damaged files (nothing was laundered into new ones), and
    # the rebuild the line names brings the index back.
    assert files_of(state, name)[0] == faiss_file
    ok(cli("build-index", name, *opts(state)), "rebuild")
    ok(cli("search", "--id", 3, "--index", name, *opts(state)), "search after rebuild")


def test_damaged_exact_index_file_answers_as_undamaged(state):
    want = ok(cli("search", "--id", 3, "-k", 5, "--json", *opts(state)))
    exact, _ = files_of(state, "exact")
    damage(exact, "zero-second-half")  # the vectors of half the ids: zeros, same size
    assert ok(cli("search", "--id", 3, "-k", 5, "--json", *opts(state))) == want
    r = cli("verify", *opts(state))
    assert r.exit_code == 1 and "cbir build-index exact" in r.output, r.output


def test_mapped_lists_are_hashed_once_per_process_and_again_when_changed(state, monkeypatch):
    hashed: list[str] = []
    real = index_files.file_digest
    monkeypatch.setattr(
        index_files, "file_digest", lambda p: hashed.append(Path(p).suffix) or real(p)
    )
    coll = collection.reading(state / "c.db", state / "idx")
    try:
        for _ in range(3):
            indexes.load(coll, "od")
        # The small .faiss at every load, the mapped .ivfdata at the first only.
        assert hashed == [".faiss", ".ivfdata", ".faiss", ".faiss"]
        damage(files_of(state, "od")[1], "bitflip")  # written anew: another identity
        with pytest.raises(index_files.DamagedIndex, match="cbir build-index od"):
            indexes.load(coll, "od")
    finally:
        coll.close()


# --- catalogs from before digests ------------------------------------------------------------


def test_catalog_written_before_digests_is_served_and_verify_says_so(state):
    want = ok(cli("search", "--id", 3, "--index", "od", "--json", *opts(state)))
    fakes.as_schema_4(state / "c.db")  # the catalog as schema 4 wrote it: no digest columns
    assert ok(cli("search", "--id", 3, "--index", "od", "--json", *opts(state))) == want
    out = ok(cli("verify", *opts(state)), "verify")
    assert "index od: no digest recorded" in out and "'cbir build-index od'" in out
    # A writer upgrades the schema; the old records stay without digests and still serve.
    ok(cli("build-index", "ivf", *opts(state)), "rebuild ivf")
    db = catalog.open_reader(state / "c.db")
    assert reads.get_meta_int(db, "schema_version") == schema.SCHEMA_VERSION
    db.conn.close()
    assert record(state, "od")["digest"] is None and record(state, "ivf")["digest"]
    assert ok(cli("search", "--id", 3, "--index", "od", "--json", *opts(state))) == want


# --- whitening files -------------------------------------------------------------------------


@pytest.fixture
def unlabelled(tmp_path) -> Path:
    """40 images without labels: a --whitening FILE cannot be validated, so only the checks
    of the file itself stand between a bad transform and the index."""
    fakes.make_images(tmp_path / "imgs", 40)
    ok(cli("index", tmp_path / "imgs", "--labels", "none", *opts(tmp_path)), "index")
    return tmp_path


def fitted(state: Path, dim: int = 8, shrinkage: float = 0.5) -> faiss.PCAMatrix:
    coll = collection.reading(state / "c.db", state / "idx")
    try:
        return whitening_fit.learn(coll.rows(), coll.indexed_ids(), dim, shrinkage)
    finally:
        coll.close()


@pytest.mark.parametrize("array,value", [("b", np.nan), ("A", 3e38), ("mean", np.inf)])
def test_whitening_file_with_bad_values_is_refused(unlabelled, array, value):
    pca = fitted(unlabelled)
    values = faiss.vector_to_array(getattr(pca, array)).copy()
    values[len(values) // 2] = value
    faiss.copy_array_to_vector(values, getattr(pca, array))
    bad = unlabelled / "bad.pca"
    faiss.write_VectorTransform(pca, str(bad))
    line = one_line_error(cli("build-index", "w", "--whitening", bad, *opts(unlabelled)), 2)
    assert str(bad) in line and "not a usable whitening transform" in line
    assert record(unlabelled, "w") is None


def test_rebuild_refuses_a_changed_whitening_file(unlabelled):
    path = unlabelled / "w.pca"
    whitening.write_transform(fitted(unlabelled, 8, 0.5), str(path))
    ok(cli("build-index", "w", "--whitening", path, *opts(unlabelled)), "build")
    before = record(unlabelled, "w")
    assert json.loads(before["note"])["whitening"]["file_sha256"] == sha256(path)
    whitening.write_transform(fitted(unlabelled, 8, 1.0), str(path))  # valid, but another one
    line = one_line_error(cli("build-index", "w", *opts(unlabelled)), 2)
    assert str(path) in line and "has changed" in line
    assert record(unlabelled, "w") == before
    r = cli("verify", *opts(unlabelled))
    assert r.exit_code == 1 and "whitening file it was built from" in r.output, r.output
    # Given again, explicitly, the new file is the user's choice: checked, used, recorded.
    ok(cli("build-index", "w", "--whitening", path, *opts(unlabelled)), "explicit")
    assert json.loads(record(unlabelled, "w")["note"])["whitening"]["file_sha256"] == sha256(path)
    ok(cli("verify", *opts(unlabelled)), "verify")


def test_saved_whitening_file_digest_is_recorded(state):
    saved = state / "saved.pca"
    args = ["--whiten", "--whiten-dim", 16, "--shrinkage", 1, "--save-whitening", saved]
    ok(cli("build-index", "w", *args, *opts(state)), "learned and saved")
    note = json.loads(record(state, "w")["note"])["whitening"]
    assert note["saved_file"] == str(saved) and note["saved_sha256"] == sha256(saved)


# --- factory strings that kill FAISS -----------------------------------------------------------


def _build(state: Path, factory: str) -> tuple[int, str]:
    r = fakes.cli("build-index", "z", "--factory", factory, *fakes.opts(state))
    return r.exit_code, r.output


# Measured with FAISS 1.15 on 1,000 vectors: each killed the process (HNSW0: an assertion;
# HNSW1, IVF4_HNSW1, RR0, RQ4x0, PRQ2x2x0: a segfault; PQ..x0, OPQ16_0, Refine(PQ16x0),
# PQ16x4fs_0: SIGFPE), hung (NSG4), failed as "unexpected RuntimeError ... (a bug)" (IVF0),
# built a useless index (PCA0, SQ0: recall 0.24 on 40 vectors), allocated without bound
# (HNSW100000: 800 KB a vector) or failed only after training (PCA4096 on 2048-d).
CRASHERS = [
    "HNSW0",
    "HNSW1",
    "IVF4_HNSW1,Flat",
    "IVF0,Flat",
    "PQ64x0",
    "IVF4,PQ64x0",
    "OPQ16_0,IVF4,Flat",
    "IVF4,Flat,Refine(PQ16x0)",
    "RR0,Flat",
    "RQ4x0",
    "PRQ2x2x0",
    "NSG4",
    "PCA0,Flat",
    "SQ0",
    "IVF4,PQ16x4fs_0",
    "HNSW100000",
    "PCA4096,Flat",
]
FINE = [
    "Flat",
    "HNSW32",
    "HNSW32_SQ8",
    "NSG32",
    "IVF1024,Flat",
    "IVF1024_HNSW32,Flat",
    "IVF256,PQ512x4fs",
    "IVF4,PQ16x4fsr_32",
    "OPQ64,IVF256,PQ64",
    "PCA256,IVF256,Flat",
    "PCAR64,Flat",
    "IVF4,SQ8",
    "IVF4,SQfp16",
    "IVF4,PQ16x8",
]


@pytest.mark.parametrize("factory", CRASHERS)
def test_factory_strings_that_crash_faiss_are_one_line(state, factory):
    before = sorted(p.name for p in (state / "idx").iterdir())
    value, code, timed_out = fakes.in_fresh_process(_build, state, factory, timeout=60)
    assert not timed_out and value is not None, f"{factory}: exit {code} (killed by FAISS)"
    assert value[0] == "ok", value[1]
    exit_code, output = value[1]
    lines = output.strip().splitlines()
    assert exit_code == 2 and len(lines) == 1, output
    assert lines[0].startswith("cbir: error: invalid FAISS factory string") and factory in lines[0]
    assert sorted(p.name for p in (state / "idx").iterdir()) == before
    assert record(state, "z") is None
    # No over-reach: factory strings FAISS builds are not refused.
    for good in FINE:
        factories.make_index(good, 2048)
