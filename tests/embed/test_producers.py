"""Which runtime and precision a command uses, and when vectors of two producers may mix."""

from __future__ import annotations

import importlib.util
import json

import pytest

import fakes
from fakes import cli, opts
from pipeline import api
from pipeline.store import catalog, reads


@pytest.fixture(autouse=True)
def fake_model(monkeypatch):
    monkeypatch.setattr(api.models, "cached_embedder", fakes.cached)


def producer(folder) -> dict:
    return json.loads(reads.get_meta(catalog.open_reader(folder / "c.db"), "producer"))


def test_catalog_records_its_producer_and_later_commands_use_it(tmp_path):
    fakes.make_images(tmp_path / "a", 4)
    fakes.make_images(tmp_path / "b", 4, seed=1)
    r = cli(
        "index", tmp_path / "a", "--runtime", "openvino", "--precision", "bf16", *opts(tmp_path)
    )
    assert r.exit_code == 0, r.output
    assert producer(tmp_path)["runtime"] == "openvino" and producer(tmp_path)["precision"] == "bf16"
    # Left at auto, the next job uses the recorded producer: nothing to refuse.
    r = cli("index", tmp_path / "b", *opts(tmp_path))
    assert r.exit_code == 0 and "model 4" in r.output, r.output


def test_another_producer_is_refused_unless_allowed(tmp_path):
    fakes.make_images(tmp_path / "a", 4)
    fakes.make_images(tmp_path / "b", 4, seed=1)
    fakes.make_images(tmp_path / "c", 4, seed=2)
    assert cli("index", tmp_path / "a", "--runtime", "keras", *opts(tmp_path)).exit_code == 0
    r = cli(
        "index", tmp_path / "b", "--runtime", "openvino", "--precision", "fp32", *opts(tmp_path)
    )
    assert r.exit_code == 2 and "--allow-mixed" in r.output and "keras fp32" in r.output
    assert len(r.stderr.strip().splitlines()) == 1
    r = cli("index", tmp_path / "b", "--runtime", "openvino", "--precision", "fp32", "--allow-mixed", *opts(tmp_path))  # fmt: skip
    assert r.exit_code == 0 and "as --allow-mixed asks" in r.stderr, r.output
    db = catalog.open_reader(tmp_path / "c.db")
    assert json.loads(reads.get_meta(db, "mixed_producer"))["runtime"] == "openvino"
    assert producer(tmp_path)["runtime"] == "keras"  # the recorded producer stays


def test_a_query_from_another_producer_is_answered_with_a_notice(tmp_path):
    made = fakes.make_images(tmp_path / "a", 4)
    assert cli("index", tmp_path / "a", "--runtime", "keras", *opts(tmp_path)).exit_code == 0
    r = cli("search", made[0], "--runtime", "openvino", "--precision", "int8", *opts(tmp_path))
    assert r.exit_code == 0, r.output
    assert "scores may differ slightly" in r.stderr
    assert r.stdout.splitlines()[2].split()[-1] == str(made[0])  # still finds itself first


def test_a_legacy_catalog_counts_as_keras_fp32(tmp_path):
    made = fakes.make_images(tmp_path / "a", 3)
    assert cli("index", tmp_path / "a", "--runtime", "keras", *opts(tmp_path)).exit_code == 0
    import sqlite3

    con = sqlite3.connect(tmp_path / "c.db")
    with con:
        con.execute("delete from meta where key = 'producer'")
    con.close()
    r = cli("search", made[1], *opts(tmp_path))
    assert r.exit_code == 0 and "differ" not in r.stderr, r.output


def test_without_openvino_auto_falls_back_to_keras_with_one_notice(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "openvino" else real(name, *a)
    )
    fakes.make_images(tmp_path / "a", 3)
    r = cli("index", tmp_path / "a", *opts(tmp_path))
    assert r.exit_code == 0, r.output
    notices = [line for line in r.stderr.splitlines() if "OpenVINO is not installed" in line]
    assert len(notices) == 1
    assert producer(tmp_path)["runtime"] == "keras"


def test_keras_runs_fp32_only():
    from pipeline.embed import loading

    with pytest.raises(Exception, match="fp32 only"):
        loading.load_embedder("imagenet", 1, "avg", "keras", "int8")


def test_bench_extract_compares_every_producer_with_keras(tmp_path, monkeypatch):
    from pipeline.bench import extract as bench
    from pipeline.embed import cpu

    # The benchmark loads each producer's model through the facade name itself.
    monkeypatch.setattr(api, "cached_embedder", fakes.cached)
    fakes.make_images(tmp_path / "imgs", 12)
    result = bench.bench_extract(str(tmp_path / "imgs"), api.settings_for(batch_size=4))
    pairs = [(r["runtime"], r["precision"]) for r in result["rows"]]
    assert pairs[0] == ("keras", "fp32")
    if importlib.util.find_spec("openvino") is not None:
        assert {("openvino", p) for p in cpu.fast_precisions()} <= set(pairs)
    for r in result["rows"]:
        assert r["end_to_end"] > 0 and r["model"] > 0 and r["cos_min"] > 0.9999
    assert any("x keras e2e" in line for line in result["lines"])
