"""Fine-tuning: a short real run, a loadable model with a new fingerprint, and no leakage."""

from __future__ import annotations

import json
import shutil
from collections import Counter

import numpy as np
import pytest

import pipeline
from conftest import COREL
from pipeline.embed.interface import gem
from pipeline.errors import CbirError
from pipeline.evaluation.train import stratified_split, train
from pipeline.inputs.decode import decode_file
from pipeline.store import catalog

pytestmark = pytest.mark.slow


def test_stratified_split_is_80_20_per_label_and_seeded():
    labels = ["a"] * 10 + ["b"] * 20 + ["c"] * 5
    tr, va = stratified_split(labels, 0.2, seed=1)
    assert not set(tr) & set(va) and len(tr) + len(va) == 35
    assert Counter(labels[i] for i in va) == {"a": 2, "b": 4, "c": 1}
    assert np.array_equal(va, stratified_split(labels, 0.2, seed=1)[1])
    assert not np.array_equal(va, stratified_split(labels, 0.2, seed=2)[1])


def test_gem_by_hand():
    maps = np.zeros((1, 2, 2, 2), dtype=np.float32)
    maps[0, :, :, 0] = [[1, 1], [1, 1]]
    maps[0, 0, 0, 1] = 2.0  # one strong activation
    out = gem(maps, p=3.0)
    assert out[0, 0] == pytest.approx(1.0, rel=1e-5)
    assert out[0, 1] == pytest.approx((8 / 4) ** (1 / 3), rel=1e-4)  # > the average 0.5


def test_short_training_gives_new_loadable_model_without_query_leakage(
    tmp_path, corel_collection, corel_query_rows
):
    o = {k: corel_collection[k] for k in ("catalog", "index_dir", "weights")}
    opened: list[str] = []

    def spy(path, max_pixels):
        opened.append(path)
        return decode_file(path, max_pixels)

    settings = pipeline.api.settings_for(**o)
    out = tmp_path / "tuned.weights.h5"
    coll = pipeline.api.open_collection(settings)
    record = train(coll, settings, out, epochs=1, decode=spy, log=lambda _: None)

    # Leakage guard: training read exactly the catalog's images, never a query image.
    db = catalog.open_reader(o["catalog"])
    catalogued = {r["path"] for r in db.query("select path from images where status = 'indexed'")}
    queries = {str(COREL / r["path"]) for r in corel_query_rows}
    assert set(opened) == catalogued
    assert not set(opened) & queries
    assert not set(record["train_paths"]) & set(record["val_paths"])
    assert set(record["train_paths"]) | set(record["val_paths"]) == catalogued
    assert len(record["val_paths"]) == 40  # 20% of 20 images in each of 10 labels
    assert (
        json.loads((tmp_path / "tuned.weights.h5.json").read_text())["val_ids"] == record["val_ids"]
    )
    assert 0.0 <= record["val_map"] <= 1.0

    # The saved weights load as a ResNet50, under a fingerprint of their own.
    folder = tmp_path / "imgs"
    folder.mkdir()
    for r in corel_query_rows[:3]:
        shutil.copy(COREL / r["path"], folder)
    new = {"catalog": str(tmp_path / "new.db"), "index_dir": str(tmp_path / "idx")}
    assert pipeline.index([folder], weights=str(out), **new).indexed == 3
    fp_new = pipeline.info(**new)["fingerprint"]
    fp_old = pipeline.info(**o)["fingerprint"]
    assert fp_new["weights_sha256"] != fp_old["weights_sha256"]
    assert pipeline.search([str(next(folder.iterdir()))], **new)[0]["results"][0]["score"] > 0.999
    with pytest.raises(CbirError, match="different model"):
        pipeline.index([folder], **{**o, "weights": str(out)})


def test_gem_pooling_is_its_own_fingerprint(tmp_path, weights, corel_query_rows, corel_collection):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for r in corel_query_rows[:4]:
        shutil.copy(COREL / r["path"], folder)
    o = {
        "catalog": str(tmp_path / "gem.db"),
        "index_dir": str(tmp_path / "idx"),
        "weights": weights,
    }
    pipeline.index([folder], pooling="gem", **o)
    assert pipeline.info(**o)["fingerprint"]["pooling"] == "gem-p3"
    # Searching with an image re-uses the catalog's pooling when none is given.
    first = str(sorted(folder.iterdir())[0])
    assert pipeline.search([first], **o)[0]["results"][0]["score"] > 0.999
    # Adding to it without --pooling keeps GeM; asking a plain-average catalog for GeM is refused.
    shutil.copy(first, folder / "extra.jpg")
    assert pipeline.index([folder], **o).copied == 1
    plain = {k: corel_collection[k] for k in ("catalog", "index_dir", "weights")}
    with pytest.raises(CbirError, match="different model"):
        pipeline.index([folder], pooling="gem", **plain)
