"""Shared fixtures: the Corel-1K benchmark and the real ImageNet weights from ../shared."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
COREL = SHARED / "datasets" / "corel1k"
WEIGHTS = SHARED / "models" / "resnet50_imagenet_notop.weights.h5"


def corel_rows(split: str, per_class: int) -> list[dict[str, str]]:
    """The first `per_class` rows of each class in the manifest's `split`."""
    if not (COREL / "manifest.csv").exists():
        pytest.fail(f"the Corel-1K benchmark is missing at {COREL}")
    taken: dict[str, int] = {}
    rows = []
    with (COREL / "manifest.csv").open(newline="") as f:
        for row in csv.DictReader(f):
            if row["split"] != split or taken.get(row["label"], 0) >= per_class:
                continue
            taken[row["label"]] = taken.get(row["label"], 0) + 1
            rows.append(row)
    return rows


def write_manifest(path: Path, rows: list[dict[str, str]]) -> Path:
    """A manifest CSV with absolute paths into ../shared (read-only; nothing is copied)."""
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "split"])
        for r in rows:
            w.writerow([str(COREL / r["path"]), r["label"], r["split"]])
    return path


@pytest.fixture(autouse=True)
def keras_for_end_to_end_tests(request, tmp_path_factory, monkeypatch):
    """Slow tests run the reference Keras model unless they name a runtime.

    Their expected figures were measured with it, and a new catalog under the
    default runtime would quantise an int8 model for every test (20-60 s each).
    (The descriptor is not pinned here: a config file's value counts as given and
    would override every catalog's recorded one. The shared Corel catalog is built
    with the paper's descriptor instead; see `corel_collection`.)
    """
    if request.node.get_closest_marker("slow") and "CBIR_CONFIG" not in os.environ:
        config = tmp_path_factory.getbasetemp() / "keras-runtime.toml"
        config.write_text('runtime = "keras"\n')
        monkeypatch.setenv("CBIR_CONFIG", str(config))


@pytest.fixture(scope="session")
def weights() -> str:
    if not WEIGHTS.exists():
        pytest.fail(f"the local ResNet50 weights are missing at {WEIGHTS}")
    return str(WEIGHTS)


@pytest.fixture(scope="session")
def corel_db_rows() -> list[dict[str, str]]:
    """20 database images per class: 200 images, about 10 s through the model here."""
    return corel_rows("database", 20)


@pytest.fixture(scope="session")
def corel_query_rows() -> list[dict[str, str]]:
    return corel_rows("query", 3)


@pytest.fixture(scope="session")
def corel_collection(tmp_path_factory, weights, corel_db_rows):
    """The Corel subset indexed once per test session, through the Python API.

    Tests must not modify it; they copy it or index into their own catalog.
    """
    import pipeline

    tmp = tmp_path_factory.mktemp("corel")
    manifest = write_manifest(tmp / "manifest.csv", corel_db_rows)
    options = {
        "catalog": str(tmp / "catalog.db"),
        "index_dir": str(tmp / "index"),
        "weights": weights,
        "runtime": "keras",  # the reference; tests/embed/test_runtime.py covers OpenVINO
        # The paper's descriptor: the figures the tests assert were measured with it
        # (queries on the catalog then use it without flags, as users' would).
        "input": "crop",
        "pooling": "avg",
    }
    summary = pipeline.index([manifest], **options)
    assert summary.indexed == len(corel_db_rows)
    return {"manifest": manifest, "summary": summary, **options}


def copy_collection(options: dict, dest: Path) -> dict:
    """A private copy of an indexed collection (catalog, vector file, indexes) to modify."""
    import shutil

    from pipeline.store import vectors

    dest.mkdir(parents=True, exist_ok=True)
    for suffix in ("", "-wal", "-shm"):
        src = Path(options["catalog"] + suffix)
        if src.exists():
            shutil.copy(src, dest / ("catalog.db" + suffix))
    shutil.copy(vectors.vectors_path(options["catalog"]), dest / "catalog.vectors")
    if Path(options["index_dir"]).exists():
        shutil.copytree(options["index_dir"], dest / "index")
    return {**options, "catalog": str(dest / "catalog.db"), "index_dir": str(dest / "index")}
