"""End to end with the real ImageNet weights on a Corel-1K subset."""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import pipeline
from conftest import COREL, copy_collection, write_manifest
from pipeline.cli import main
from pipeline.errors import CbirError
from pipeline.store import catalog

pytestmark = pytest.mark.slow


def opts(c):
    return {"catalog": c["catalog"], "index_dir": c["index_dir"], "weights": c["weights"]}


def cli(args, env=None):
    result = CliRunner().invoke(main, args, env=env)
    return result


def test_database_image_finds_itself_first(corel_collection, corel_db_rows):
    queries = [str(COREL / r["path"]) for r in corel_db_rows[::20]]
    answers = pipeline.search(queries, **opts(corel_collection))
    assert len(answers) == len(queries)
    for q, a in zip(queries, answers, strict=True):
        top = a["results"][0]
        assert top["path"] == q and top["rank"] == 1
        assert top["score"] >= 0.999
        assert len(a["results"]) == 10
        scores = [r["score"] for r in a["results"]]
        assert scores == sorted(scores, reverse=True)


def test_held_out_queries_are_mostly_of_their_class(corel_collection, corel_query_rows):
    queries = [str(COREL / r["path"]) for r in corel_query_rows]
    answers = pipeline.search(queries, **opts(corel_collection))
    precisions = []
    for row, a in zip(corel_query_rows, answers, strict=True):
        labels = [r["label"] for r in a["results"]]
        precisions.append(sum(label == row["label"] for label in labels) / 10)
    # 20 relevant images per class in this subset; the full benchmark reaches P@10 > 0.9.
    assert np.mean(precisions) >= 0.8, precisions
    assert np.median(precisions) >= 0.9


def test_search_by_id_and_json_lines(corel_collection):
    c = corel_collection
    r = cli(
        [
            "search",
            "--id",
            "5",
            "-k",
            "3",
            "--json",
            "--catalog",
            c["catalog"],
            "--index-dir",
            c["index_dir"],
        ]
    )
    assert r.exit_code == 0, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1
    answer = json.loads(lines[0])
    assert answer["query_id"] == 5
    assert [x["rank"] for x in answer["results"]] == [1, 2, 3]
    first = answer["results"][0]
    assert first["id"] == 5 and os.path.isabs(first["path"]) and first["score"] >= 0.999
    assert set(first) >= {"rank", "id", "path", "label", "score"}


def test_folder_query_is_a_batch_and_env_vars_locate_the_catalog(corel_collection, tmp_path):
    c = corel_collection
    for name in ("bus", "horses"):
        src = next((COREL / name).glob("q_*.jpg"))
        shutil.copy(src, tmp_path / f"{name}.jpg")
    env = {
        "CBIR_CATALOG": c["catalog"],
        "CBIR_INDEX_DIR": c["index_dir"],
        "CBIR_WEIGHTS": c["weights"],
    }
    r = cli(["search", str(tmp_path), "--json"], env=env)
    assert r.exit_code == 0, r.output
    answers = [json.loads(line) for line in r.output.strip().splitlines()]
    assert [Path(a["query"]).name for a in answers] == ["bus.jpg", "horses.jpg"]
    for a in answers:
        top_labels = [x["label"] for x in a["results"][:5]]
        assert top_labels.count(Path(a["query"]).stem) >= 4


def test_bad_query_exits_2_with_one_line(corel_collection, tmp_path):
    c = corel_collection
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    r = cli(
        [
            "search",
            str(bad),
            "--catalog",
            c["catalog"],
            "--index-dir",
            c["index_dir"],
            "--weights",
            c["weights"],
        ]
    )
    assert r.exit_code == 2
    assert len(r.output.strip().splitlines()) == 1
    assert "cannot use query image" in r.output and "Traceback" not in r.output
    r = cli(["search", "--id", "999999", "--catalog", c["catalog"], "--index-dir", c["index_dir"]])
    assert r.exit_code == 2 and "no indexed image with id 999999" in r.output


def test_ivf_with_full_probe_equals_exact(corel_collection, tmp_path):
    c = copy_collection(corel_collection, tmp_path / "copy")
    rec = pipeline.build_index("ivf", "IVF8,Flat", ["nprobe=8"], **opts(c))
    assert rec["ntotal"] == 200
    ids = list(range(0, 200, 7))
    exact = pipeline.search(ids, **opts(c))
    approx = pipeline.search(ids, index="ivf", **opts(c))
    for e, a in zip(exact, approx, strict=True):
        assert [r["id"] for r in e["results"]] == [r["id"] for r in a["results"]]
        assert [r["score"] for r in e["results"]] == [r["score"] for r in a["results"]]
    # A query-time parameter overrides the stored one, and fewer probes can only lose results.
    narrow = pipeline.search(ids, index="ivf", params=["nprobe=1"], **opts(c))
    assert all(len(a["results"]) <= 10 for a in narrow)
    # HNSW and PQ variants build and answer through the same interface.
    pipeline.build_index("hnsw", "HNSW16", ["efSearch=64"], **opts(c))
    pipeline.build_index("pq", "IVF4,PQ16x4", ["nprobe=4"], **opts(c))
    for name in ("hnsw", "pq"):
        a = pipeline.search([3], index=name, **opts(c))[0]
        assert a["results"][0]["id"] == 3 and a["results"][0]["score"] >= 0.999
    with pytest.raises(CbirError, match="no search parameter"):
        pipeline.search([3], index="hnsw", params=["nprobe=4"], **opts(c))
    with pytest.raises(CbirError, match="invalid FAISS factory"):
        pipeline.build_index("bad", "NotAnIndex99", **opts(c))
    info = pipeline.info(**opts(c))
    assert {i["name"] for i in info["indexes"]} == {"exact", "ivf", "hnsw", "pq"}
    assert pipeline.verify(**opts(c))["ok"]


def make_bad_files(folder: Path) -> dict[str, str]:
    """One real file of each broken kind; returns name -> expected reason fragment."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "empty.jpg").write_bytes(b"")
    buf = io.BytesIO()
    Image.effect_noise((400, 300), 64).convert("RGB").save(buf, "JPEG", quality=90)
    (folder / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 3])
    (folder / "text.jpg").write_text("hello, I am a text file\n")
    Image.new("1", (12000, 12000)).save(folder / "bomb.png")
    (folder / "readme.txt").write_text("not an image extension: skipped, not failed\n")
    return {
        "empty.jpg": "empty file",
        "truncated.jpg": "truncated",
        "text.jpg": "not an image",
        "bomb.png": "over the limit",
    }


def test_bad_files_are_marked_failed_and_the_job_goes_on(tmp_path, weights, corel_db_rows):
    folder = tmp_path / "mixed"
    expected = make_bad_files(folder)
    for r in corel_db_rows[:3]:
        shutil.copy(COREL / r["path"], folder / Path(r["path"]).name)
    args = [
        "index",
        str(folder),
        "--catalog",
        str(tmp_path / "c.db"),
        "--index-dir",
        str(tmp_path / "idx"),
        "--weights",
        weights,
    ]
    r = cli(args)
    assert r.exit_code == 0, r.output
    assert "failed 4" in r.output and "Traceback" not in r.output
    db = catalog.open_reader(tmp_path / "c.db")
    rows = {Path(x["path"]).name: x for x in db.query("select * from images")}
    assert "readme.txt" not in rows
    for name, reason in expected.items():
        assert rows[name]["status"] == "failed"
        assert reason in rows[name]["error"]
    assert sum(x["status"] == "indexed" for x in rows.values()) == 3
    # --strict: same job, non-zero exit; failed files are not retried unless asked.
    r = cli([*args, "--strict"])
    assert r.exit_code == 0 and "unchanged 7" in r.output
    r = cli([*args, "--strict", "--retry-failed"])
    assert r.exit_code == 1 and "failed 4" in r.output
    assert pipeline.verify(catalog=str(tmp_path / "c.db"), index_dir=str(tmp_path / "idx"))["ok"]


def test_incremental_changes_duplicates_and_prune(tmp_path, weights, corel_db_rows):
    folder = tmp_path / "photos"
    for r in corel_db_rows[:6]:
        (folder / r["label"]).mkdir(parents=True, exist_ok=True)
        shutil.copy(COREL / r["path"], folder / r["label"] / Path(r["path"]).name)
    o = {"catalog": str(tmp_path / "c.db"), "index_dir": str(tmp_path / "idx"), "weights": weights}
    first = pipeline.index([folder], **o)
    assert (first.indexed, first.failed) == (6, 0)

    again = pipeline.index([folder], **o)
    assert (again.indexed, again.copied, again.unchanged) == (0, 0, 6)

    # Two identical copies at new paths: catalogued, counted, vectors copied without the model.
    src = sorted(folder.glob("*/*.jpg"))[0]
    shutil.copy(src, folder / "copy1.jpg")
    shutil.copy(src, folder / "copy2.jpg")
    # A changed file (new content at the same path) is re-extracted under a new id.
    changed = sorted(folder.glob("*/*.jpg"))[-1]
    old_id = pipeline.search([str(changed)], **o)[0]["results"][0]["id"]
    Image.open(COREL / corel_db_rows[50]["path"]).save(changed, quality=90)
    s = pipeline.index([folder], **o)
    assert (s.copied, s.duplicates, s.indexed) == (2, 2, 1)
    hits = pipeline.search([str(folder / "copy2.jpg")], k=3, **o)[0]["results"]
    assert {h["path"] for h in hits} == {
        str(src),
        str(folder / "copy1.jpg"),
        str(folder / "copy2.jpg"),
    }
    assert all(h["score"] >= 0.999 for h in hits)
    new_hit = pipeline.search([str(changed)], **o)[0]["results"][0]
    assert new_hit["path"] == str(changed) and new_hit["id"] != old_id

    # Deleted files stay until --prune.
    (folder / "copy1.jpg").unlink()
    assert pipeline.index([folder], **o).pruned == 0
    assert pipeline.index([folder], prune=True, **o).pruned == 1
    info = pipeline.info(**o)
    assert info["images"]["indexed"] == 7  # 6 originals + 2 copies - 1 pruned
    assert pipeline.verify(**o)["ok"]


def test_fingerprint_mismatch_is_refused(tmp_path, weights, corel_collection):
    from pipeline.embed.runtime_keras import import_keras

    keras = import_keras()
    model = keras.applications.ResNet50(
        weights=weights, include_top=False, pooling="avg", input_shape=(224, 224, 3)
    )
    kernel = model.weights[-4]  # a kernel of the last block
    kernel.assign(kernel.numpy() * 1.01)
    other = tmp_path / "other.weights.h5"
    model.save_weights(other)

    q = str(COREL / "bus" / "q_000.jpg") if (COREL / "bus" / "q_000.jpg").exists() else None
    q = q or str(next((COREL / "bus").glob("q_*.jpg")))
    o = {"catalog": corel_collection["catalog"], "index_dir": corel_collection["index_dir"]}
    with pytest.raises(CbirError, match="differs from the one that built the catalog"):
        pipeline.search([q], weights=str(other), **o)
    folder = tmp_path / "new"
    folder.mkdir()
    shutil.copy(q, folder / "q.jpg")
    with pytest.raises(CbirError, match="different model"):
        pipeline.index([folder], weights=str(other), **o)
    assert pipeline.info(**o)["images"]["total"] == 200


def test_missing_download_gives_one_clear_line(tmp_path, monkeypatch):
    # No internet here: the real Keras download path fails, and we say what to do.
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras-home"))
    r = cli(
        ["index", str(COREL / "bus"), "--catalog", str(tmp_path / "c.db"), "--weights", "imagenet"]
    )
    assert r.exit_code == 2
    # Keras announces the download on stdout; the error itself is one line on stderr.
    assert "cannot download the ImageNet weights" in r.stderr and "--weights PATH" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.output


def test_stale_approximate_index_is_refused_exact_is_rebuilt(tmp_path, weights, corel_db_rows):
    o = {"catalog": str(tmp_path / "c.db"), "index_dir": str(tmp_path / "idx"), "weights": weights}
    manifest = write_manifest(tmp_path / "m.csv", corel_db_rows[:40])
    pipeline.index([manifest], **o)
    pipeline.build_index("hnsw", "HNSW8", **o)
    manifest = write_manifest(tmp_path / "m.csv", corel_db_rows[:48])
    pipeline.index([manifest], **o)
    info = {i["name"]: i for i in pipeline.info(**o)["indexes"]}
    assert info["hnsw"]["stale"] and not info["exact"]["stale"]
    with pytest.raises(CbirError, match="stale"):
        pipeline.search([1], index="hnsw", **o)
    pipeline.build_index("hnsw", **o)  # refresh with its recorded factory
    assert pipeline.search([45], index="hnsw", **o)[0]["results"][0]["id"] == 45
