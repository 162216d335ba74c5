"""Bad input, fast tier (fake model): every bad option or config value is refused where it
enters, in one line on stderr (`cbir: error: ...`), exit 2, before any work; never a traceback."""

from __future__ import annotations

import contextlib
import json
import math
import sqlite3
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fakes
import pipeline
from fakes import assert_refused, cli, opts
from pipeline import api, specs
from pipeline.config import DEFAULTS, load_settings
from pipeline.errors import CbirError
from pipeline.inputs import scan
from pipeline.retrieval import factories
from pipeline.specs import SPEC

N_IMAGES = 40


@pytest.fixture(autouse=True)
def fake_model(monkeypatch):
    monkeypatch.setattr(api.models, "cached_embedder", fakes.cached)


@pytest.fixture(scope="module")
def coll(tmp_path_factory) -> Path:
    """40 indexed images with an HNSW and an IVF index, made once; tests only read it."""
    root = tmp_path_factory.mktemp("bad-input")
    fakes.make_images(root / "imgs", N_IMAGES)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(api.models, "cached_embedder", fakes.cached)
        assert cli("index", root / "imgs", *opts(root)).exit_code == 0
        assert cli("build-index", "hnsw", "--factory", "HNSW32", *opts(root)).exit_code == 0
        assert cli("build-index", "ivf", "--factory", "IVF4,Flat", *opts(root)).exit_code == 0
    return root


# (arguments after the command, words the one error line must hold)
BAD_SEARCH = [
    (["--id", 2**63], ["--id", "9223372036854775807"]),
    (["--id", -1], ["--id"]),
    (["--id", 0, "--relevant", 2**63], ["--relevant"]),
    (["--id", 0, "--not-relevant", 2**64], ["--not-relevant"]),
    (["--id", 0, "--not-relevant", -3], ["--not-relevant"]),
    (["--id", 0, "--index", "ivf", "--nprobe", 0], ["--nprobe", "1<=x"]),
    (["--id", 0, "--index", "ivf", "--nprobe", -1], ["--nprobe"]),
    (["--id", 0, "--index", "ivf", "--nprobe", 99999999999], ["--nprobe"]),
    (["--id", 0, "--index", "hnsw", "--ef-search", 0], ["--ef-search", "1<=x"]),
    (["--id", 0, "--index", "hnsw", "--ef-search", -1], ["--ef-search"]),
    (["--id", 0, "--index", "ivf", "--param", "nprobe=nan"], ["nprobe", "nan"]),
    (["--id", 0, "--index", "ivf", "--param", "nprobe=inf"], ["nprobe"]),
    (["--id", 0, "--index", "ivf", "--param", "nprobe=-inf"], ["nprobe"]),
    (["--id", 0, "--index", "ivf", "--param", "nprobe=2.5"], ["nprobe", "integer"]),
    (["--id", 0, "--index", "ivf", "--param", "refine=nan"], ["refine"]),
    (["--id", 0, "--index", "ivf", "--param", "refine=0"], ["refine"]),
    (["--id", 0, "--index", "hnsw", "--param", "efSearch=1e12"], ["efSearch"]),
    (["--id", 0, "--index", "ivf", "--param", "max_codes=inf"], ["max_codes"]),
    (["--id", 0, "--index", "ivf", "--param", "nprobe"], ["name=number"]),
    (["--id", 0, "--index", "ivf", "--param", "=4"], ["name=number"]),
    (["--id", 0, "-k", -1, "--rerank", "dba"], ["-k"]),
    (["--id", 0, "-k", 0], ["-k", "1<=x"]),
    (["--id", 0, "-k", -1], ["-k"]),
    (["--id", 0, "-k", "5.5"], ["-k"]),
    (["--id", 0, "--shortlist", 0], ["--shortlist"]),
    (["--id", 0, "--rerank", "dbx"], ["dbx"]),
    (["--id", 0, "-k", 20, "--rerank", "dba", "--shortlist", 10], ["shortlist", "k"]),
    (["--id", 0, "--catalog", ""], ["catalog"]),
    (["--id", 0, "--bogus"], ["--bogus"]),
    ([], ["query"]),
]


@pytest.mark.parametrize(
    "args,words", BAD_SEARCH, ids=[" ".join(map(str, a)) for a, _ in BAD_SEARCH]
)
def test_bad_search_options_are_one_line(coll, args, words):
    # The bad arguments come last, so that they override opts (e.g. --catalog '').
    assert_refused(cli("search", *opts(coll), *args), *words)


BAD_BUILD = [
    (["--factory", "IVF4,Flat", "--nprobe", 0], ["--nprobe"]),
    (["--factory", "IVF4,Flat", "--nprobe", 99999999999], ["--nprobe"]),
    (["--factory", "HNSW32", "--ef-search", 0], ["--ef-search"]),
    (["--factory", "IVF4,Flat", "--param", "nprobe=nan"], ["nprobe"]),
    (["--auto", "--max-memory", "1.2.3GB"], ["--max-memory", "1.2.3GB"]),
    (["--auto", "--max-memory", "0"], ["--max-memory"]),
    (["--auto", "--max-memory", "9" * 400], ["--max-memory"]),
    (["--auto", "--target-recall", "nan"], ["--target-recall"]),
    (["--auto", "--target-recall", "1.5"], ["--target-recall"]),
    (["--factory", "IDMap,Flat"], ["IDMap"]),
    (["--factory", "IDMap2,Flat"], ["IDMap"]),
    (["--factory", "NSG32,Flat"], ["NSG32,Flat", f"{N_IMAGES} vectors"]),
    (["--factory", "IVF1000000000,Flat"], ["inverted lists"]),
    (["--factory", "IVF64,Flat"], ["inverted lists", f"{N_IMAGES} vectors"]),
    (["--factory", "Bogus12"], ["invalid FAISS factory"]),
]


@pytest.mark.parametrize(
    "args,words", BAD_BUILD, ids=[" ".join(map(str, a))[:40] for a, _ in BAD_BUILD]
)
def test_bad_build_index_options_are_one_line(coll, args, words):
    assert_refused(cli("build-index", "bad", *args, *opts(coll)), *words)
    db = sqlite3.connect(coll / "c.db")
    assert not db.execute("select 1 from indexes where name = 'bad'").fetchall()
    db.close()


BAD_OTHER = [
    (["index", "{imgs}", "--batch-size", -1], ["--batch-size", "1<=x<=1024"]),
    (["index", "{imgs}", "--batch-size", 0], ["--batch-size"]),
    (["index", "{imgs}", "--batch-size", 100000], ["--batch-size"]),
    (["index", "{imgs}", "--workers", 0], ["--workers"]),
    (["index", "{imgs}", "--workers", 65], ["--workers"]),
    (["index", "{imgs}", "--max-pixels", 0], ["--max-pixels"]),
    (["index", "{imgs}", "--pooling", "max"], ["--pooling"]),
    (["evaluate", "--leave-one-out", "--hybrid-weight", "nan"], ["--hybrid-weight"]),
    (["train", "--out", "x.weights.h5", "--epochs", 0], ["--epochs"]),
    (["train", "--out", "x.weights.h5", "--val-fraction", "nan"], ["--val-fraction"]),
    (["train", "--out", "x.weights.h5", "--seed", -1], ["--seed"]),
    (["bench", "scale", "--sizes", "1e3,abc"], ["--sizes"]),
    (["bench", "scale", "--indexes", "flat,foo"], ["--indexes"]),
    (["bench", "extract", "{imgs}", "--repeats", 0], ["--repeats"]),
    (["serve", "--port", 70000], ["--port"]),
    (["serve", "--max-upload-mb", "inf"], ["--max-upload-mb"]),
    (["no-such-command"], ["no-such-command"]),
]


@pytest.mark.parametrize("args,words", BAD_OTHER, ids=[" ".join(map(str, a)) for a, _ in BAD_OTHER])
def test_bad_options_of_other_commands_are_one_line(tmp_path, coll, args, words):
    args = [str(a).replace("{imgs}", str(coll / "imgs")) for a in args]
    assert_refused(cli(*args, *opts(tmp_path)), *words)
    assert not (tmp_path / "c.db").exists()  # refused before any work


def test_help_and_version_still_exit_0():
    for args in (["--help"], ["--version"], ["search", "--help"], ["bench", "scale", "-h"]):
        r = cli(*args)
        assert r.exit_code == 0 and r.output, args


# A config file with each key of the wrong type or out of range.
BAD_CONFIG = [
    "k = -3", "k = 0", "k = 5.5", 'k = "5"', "k = true", "k = 100000",
    'shortlist = "x"', "shortlist = 0", 'rerank_alpha = "3"', "rerank_alpha = nan",
    "rerank_alpha = -1", "rerank_alpha = inf", "rerank = 3", 'rerank = "dbx"', "rerank = [1]",
    "rerank_n = 0", "index = 1", 'index = ""', "catalog = 1", 'catalog = ""',
    'catalog = "a\\u0000b"', "index_dir = []", "labels = 2", "weights = 1.5",
    'pooling = "max"', "workers = 0", "workers = 65", 'workers = "2"', "batch_size = -1",
    "batch_size = 0", "batch_size = 100000", "max_pixels = 0", 'max_pixels = "big"',
    "split = 1", 'prune = "yes"', "strict = 1", "retry_failed = 0", "roots = 1",
    'roots = ["a", 2]', "k = {a = 1}", "nonsense = 1", "k = = 3",
]  # fmt: skip


@pytest.mark.parametrize("text", BAD_CONFIG)
def test_bad_config_values_are_one_line(tmp_path, coll, text):
    cfg = tmp_path / "c.toml"
    cfg.write_text(text + "\n")
    assert_refused(cli("search", "--id", 0, "--config", cfg, *opts(coll)), "config file")
    with pytest.raises(CbirError, match="config file"):
        load_settings(cfg)


def test_spec_covers_every_setting():
    assert set(DEFAULTS) | {"roots"} <= set(SPEC)
    for key, value in DEFAULTS.items():
        assert specs.check(key, value) == value, key


def test_config_that_is_not_utf8_is_one_line(tmp_path, coll):
    cfg = tmp_path / "c.toml"
    cfg.write_bytes(b"k = 3  # caf\xe9\n")
    assert_refused(cli("search", "--id", 0, "--config", cfg, *opts(coll)), "not UTF-8")
    cfg.write_bytes("\ufeffk = 3\n".encode())  # a byte-order mark is fine
    r = cli("search", "--id", 0, "--json", "--config", cfg, *opts(coll))
    assert r.exit_code == 0 and len(json.loads(r.stdout)["results"]) == 3


def test_batch_size_minus_one_in_a_config_indexes_nothing(tmp_path, coll):
    """D1: a negative batch stored uninitialised memory as vectors and reported success."""
    cfg = tmp_path / "c.toml"
    cfg.write_text("batch_size = -1\n")
    assert_refused(cli("index", coll / "imgs", "--config", cfg, *opts(tmp_path)), "batch_size")
    assert not (tmp_path / "c.db").exists()
    with pytest.raises(CbirError, match="batch_size"):
        pipeline.index([coll / "imgs"], batch_size=-1, catalog=str(tmp_path / "c.db"))
    assert not (tmp_path / "c.db").exists()


def test_roots_as_one_string(tmp_path, coll):
    cfg = tmp_path / "c.toml"
    cfg.write_text(f"roots = {json.dumps(str(coll / 'imgs'))}\n")
    r = cli("index", "--config", cfg, *opts(tmp_path))
    assert r.exit_code == 0 and f"scanned {N_IMAGES}," in r.stdout, r.output


def test_python_api_is_checked_too(coll):
    o = {"catalog": str(coll / "c.db"), "index_dir": str(coll / "idx")}
    bad = [
        {"k": 0}, {"k": -1, "rerank": "dba"}, {"k": 5.5}, {"shortlist": 0}, {"rerank_n": 0},
        {"rerank_alpha": math.nan}, {"relevant": [2**63]}, {"not_relevant": [-1]},
        {"index": "ivf", "params": ["nprobe=nan"]}, {"index": "ivf", "params": {"nprobe": 0}},
        {"index": "hnsw", "params": {"efSearch": math.inf}}, {"index": "ivf", "params": [3]},
        {"catalog": ""},
    ]  # fmt: skip
    for options in bad:
        with pytest.raises(CbirError):
            pipeline.search([0], **{**o, **options})
    with pytest.raises(CbirError, match="memory size"):
        pipeline.build_index("x", auto=True, max_memory="1.2.3GB", **o)
    assert len(pipeline.search([0], k=3, **o)[0]["results"]) == 3  # valid values unchanged


def test_parse_params_and_apply_params_check_ranges():
    assert factories.parse_params(["nprobe=16", " efSearch = 64 ", "refine=40"]) == {
        "nprobe": 16.0,
        "efSearch": 64.0,
        "refine": 40.0,
    }
    assert factories.parse_params("nprobe=4") == {"nprobe": 4.0}
    for bad in (["nprobe=nan"], ["nprobe=0"], ["efSearch=-1"], {"refine": None}, ["x=inf"]):
        with pytest.raises(CbirError):
            factories.parse_params(bad)
    index = factories.make_index("HNSW32", 8)
    with pytest.raises(CbirError, match="efSearch"):
        factories.apply_params(index, {"efSearch": 0.0})


# -- label CSVs ---------------------------------------------------------------


def label_csv(folder: Path, imgs: Path, header: str, encoding: str = "utf-8") -> Path:
    rows = [header] + [
        f"{p.relative_to(folder)},tag{i % 3}" for i, p in enumerate(sorted(imgs.rglob("*.jpg")))
    ]
    path = folder / "labels.csv"
    path.write_text("\n".join(rows) + "\n", encoding=encoding)
    return path


@pytest.mark.parametrize(
    "header,encoding",
    [("path,label", "utf-8-sig"), ("path, label", "utf-8"), (" path ,label", "utf-8")],
)
def test_label_csv_from_a_spreadsheet(tmp_path, coll, header, encoding):
    imgs = tmp_path / "imgs"
    fakes.make_images(imgs, 6)
    csv_path = label_csv(tmp_path, imgs, header, encoding)
    labels = scan.read_label_csv(csv_path)
    assert sorted(set(labels.values())) == ["tag0", "tag1", "tag2"]
    r = cli("index", imgs, "--labels", csv_path, *opts(tmp_path))
    assert r.exit_code == 0, r.output
    info = json.loads(cli("info", "--json", *opts(tmp_path)).stdout)
    assert info["labels"] == {"tag0": 2, "tag1": 2, "tag2": 2}


def test_label_csv_that_is_not_utf8_or_has_no_path(tmp_path, coll):
    bad = tmp_path / "labels.csv"
    bad.write_bytes(b"path,label\nimgs/a.jpg,caf\xe9\n")
    assert_refused(cli("index", coll / "imgs", "--labels", bad, *opts(tmp_path)), "UTF-8")
    bad.write_text("label,path\nred\n")
    assert_refused(cli("index", coll / "imgs", "--labels", bad, *opts(tmp_path)), "no path")


def test_missing_manifest_rows_are_counted_and_said(tmp_path, coll):
    manifest = tmp_path / "m.csv"
    present = sorted((coll / "imgs").rglob("*.jpg"))[:3]
    rows = ["path,label"] + [f"{p},x" for p in present] + ["gone1.jpg,x", "gone2.jpg,x"]
    manifest.write_text("\n".join(rows) + "\n")
    missing: list[str] = []
    found = list(scan.scan([manifest], missing=missing))
    assert len(found) == 3 and [Path(m).name for m in missing] == ["gone1.jpg", "gone2.jpg"]
    r = cli("index", manifest, *opts(tmp_path))
    assert r.exit_code == 0 and "scanned 3," in r.stdout, r.output
    assert "2 files listed in" in r.stderr and "gone1.jpg" in r.stderr


# -- property-based fuzzing ---------------------------------------------------

NUMBERS = st.one_of(
    st.integers(-(2**70), 2**70),
    st.integers(-3, 70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["nan", "inf", "-inf", "1e3", "", "abc", "0x10", " 5", "5 ", "1_000", "٣"]),
    st.text(max_size=6),
)
SEARCH_FLAGS = ["-k", "--nprobe", "--ef-search", "--shortlist", "--id", "--relevant"]
INDEX_FLAGS = ["--batch-size", "--workers", "--max-pixels"]
PARAM_NAMES = ["nprobe", "efSearch", "refine", "max_codes", "bogus"]
FUZZ = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def assert_exit_0_or_one_line(result) -> None:
    assert result.exit_code in (0, 2), (result.exit_code, result.output)
    assert "Traceback" not in result.output
    if result.exit_code == 2:
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("cbir: error: "), result.stderr


@FUZZ
@given(
    flag=st.sampled_from(SEARCH_FLAGS + ["--param"]),
    value=NUMBERS,
    param=st.sampled_from(PARAM_NAMES),
    index=st.sampled_from(["exact", "hnsw", "ivf"]),
    rerank=st.sampled_from(["", "dba"]),
)
def test_fuzz_search_numbers(coll, flag, value, param, index, rerank):
    value = f"{param}={value}" if flag == "--param" else str(value)
    args = ["search", "--id", "1", "--index", index, flag, value, *opts(coll)]
    assert_exit_0_or_one_line(cli(*args, *(["--rerank", rerank] if rerank else [])))


@FUZZ
@given(flag=st.sampled_from(INDEX_FLAGS), value=NUMBERS)
def test_fuzz_index_numbers(coll, flag, value):
    # The same images into one extra catalog: after the first valid run, nothing changes.
    folder = coll / "fuzz"
    assert_exit_0_or_one_line(cli("index", coll / "imgs", flag, str(value), *opts(folder)))


@FUZZ
@given(flag=st.sampled_from(["--nprobe", "--ef-search", "--param"]), value=NUMBERS)
def test_fuzz_build_index_numbers(coll, flag, value):
    value = f"nprobe={value}" if flag == "--param" else str(value)
    # Valid values reach the build, which then refuses a parameter the Flat index lacks,
    # so the shared catalog keeps its indexes.
    r = cli("build-index", "fuzz", "--factory", "Flat", flag, value, *opts(coll))
    assert_exit_0_or_one_line(r)


def toml_value(value: object) -> str:
    """A Python value as TOML (hypothesis draws values of any type for any key)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return (
            "nan"
            if math.isnan(value)
            else ("inf" if value > 0 else "-inf")
            if math.isinf(value)
            else repr(value)
        )
    if isinstance(value, list):
        return "[" + ", ".join(map(toml_value, value)) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, str):
        return json.dumps(value)
    return str(value)


SCALARS = st.one_of(
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.text(max_size=8),
)
TOML_VALUES = st.one_of(
    SCALARS,
    st.lists(SCALARS, max_size=3),
    st.dictionaries(st.sampled_from(["a", "b"]), SCALARS, max_size=2),
)


@FUZZ
@given(key=st.sampled_from(sorted(DEFAULTS) + ["roots"]), value=TOML_VALUES)
def test_fuzz_config_values(coll, key, value):
    work = coll / "fuzz-config"
    work.mkdir(exist_ok=True)
    cfg = work / "c.toml"
    cfg.write_text(f"{key} = {toml_value(value)}\n")
    # Every value is checked when the file is read, although the flags then override
    # catalog and index_dir; a relative path drawn for another key lands in `work`.
    with contextlib.chdir(work):
        assert_exit_0_or_one_line(cli("search", "--id", "1", "--config", cfg, *opts(coll)))
