"""Descriptor options on real images with the real ResNet50, on every runtime (slow tier).

Each option gives unit vectors, records itself in the fingerprint, gives the
same vectors on Keras and OpenVINO fp32, and a catalog built with one option
refuses a query made with another.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from pipeline import api
from pipeline.embed import descriptor
from pipeline.embed.loading import load_embedder
from pipeline.errors import CbirError
from pipeline.inputs.decode import decode_file

pytestmark = pytest.mark.slow
HOLIDAYS = Path(__file__).resolve().parents[3] / "shared" / "datasets" / "holidays150" / "images"

OPTIONS = [
    descriptor.make("whole", 224, "1", "avg"),
    descriptor.make("crop", 224, "1", "rmac"),
    descriptor.make("whole", 160, "1,0.7071", "gem"),
]


@pytest.fixture(scope="module")
def images() -> list[Path]:
    files = sorted(HOLIDAYS.glob("*.jpg"))[:6]
    assert len(files) == 6, f"Holidays-150 is missing under {HOLIDAYS}"
    return files


@pytest.mark.parametrize("d", OPTIONS, ids=lambda d: d.describe_text())
def test_option_on_both_runtimes(d, images, weights):
    pixels = [decode_file(str(f), 10**8, **d.decode).pixels for f in images]
    if d.input == "whole":
        assert all(min(p.shape[:2]) == d.size for p in pixels)
        assert len({p.shape for p in pixels}) >= 1
    got = {}
    for runtime in ("keras", "openvino"):
        e = load_embedder(weights, 4, d.pooling, runtime, "fp32", (), d)
        v = e.embed(pixels)
        assert v.shape == (6, 2048)
        np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1, atol=1e-5)
        for key, value in d.fingerprint().items():
            assert e.fingerprint[key] == value
        assert descriptor.from_fingerprint(e.fingerprint) == d
        got[runtime] = v
    cos = np.sum(got["keras"] * got["openvino"], axis=1)
    assert cos.min() >= 0.999, cos


def test_a_catalog_refuses_queries_of_another_descriptor(tmp_path, images, weights):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for f in images:
        shutil.copy(f, folder / f.name)
    opts = {"catalog": str(tmp_path / "c.db"), "index_dir": str(tmp_path / "i"),
            "weights": weights, "runtime": "openvino", "precision": "fp32"}  # fmt: skip
    api.index([folder], input="whole", image_size=160, pooling="rmac", **opts)
    # The recorded descriptor is used without flags, and the image finds itself.
    top = api.search([str(images[2])], k=1, **opts)[0]["results"][0]
    assert top["path"] == str(folder / images[2].name) and top["score"] > 0.999
    with pytest.raises(CbirError, match="fingerprint|model|pooling|input"):
        api.search([str(images[2])], k=1, pooling="gem", **opts)
    with pytest.raises(CbirError):
        api.search([str(images[2])], k=1, image_size=192, **opts)
