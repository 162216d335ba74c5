"""Descriptor options: whole image, scales, GeM and R-MAC pooling (fast tier, no model).

The pooling arithmetic is checked against hand computations; the options are
checked end to end with the fake model: recorded in the catalog's fingerprint,
used by later commands without flags, and a query with another descriptor refused.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

import fakes
from fakes import cli
from pipeline import api
from pipeline.embed import descriptor
from pipeline.embed.descriptor import Descriptor
from pipeline.errors import CbirError
from pipeline.inputs.decode import decode_file
from pipeline.store import catalog, reads


@pytest.fixture(autouse=True)
def fake_model(monkeypatch):
    monkeypatch.setattr(api.models, "cached_embedder", fakes.cached)


def test_the_classic_descriptor_keeps_the_old_fingerprint():
    assert Descriptor().fingerprint() == {"pooling": "avg"}
    assert Descriptor(pooling="gem").fingerprint() == {"pooling": "gem-p3"}
    whole = Descriptor("whole", 288, (1.0, 0.7071), "rmac").fingerprint()
    assert whole["input"] == "whole-288" and whole["scales"] == "1,0.7071"
    assert whole["pooling"] == "rmac-L3" and "shorter-side-288" in whole["preprocessing"]
    for d in (
        Descriptor(),
        Descriptor("whole", 288, (1.0, 0.5), "rmac"),
        Descriptor(pooling="gem"),
    ):
        assert descriptor.from_fingerprint({**fakes.FAKE_FINGERPRINT, **d.fingerprint()}) == d


@pytest.mark.parametrize(
    "text", ["", "0", "-1", "1.5", "nan", "inf", "1,1", "a", "1,0.5,0.4,0.3,0.2,0.1", "1e400"]
)
def test_bad_scales_are_one_line_errors(text):
    with pytest.raises(CbirError) as e:
        descriptor.parse_scales(text)
    assert "\n" not in str(e.value)


def test_scales_are_sorted_largest_first():
    assert descriptor.parse_scales("0.5, 1,0.7071") == (1.0, 0.7071, 0.5)
    with pytest.raises(CbirError, match="under 32 pixels"):
        descriptor.make("whole", 64, "1,0.25")


def test_pooling_by_hand():
    maps = np.zeros((2, 3, 4), np.float32)
    maps[0, 0] = [1, 2, 3, 4]
    maps[1, 2] = [4, 3, 2, 1]
    np.testing.assert_allclose(descriptor.pool(maps, "avg"), [5 / 6, 5 / 6, 5 / 6, 5 / 6])
    gem = np.cbrt(np.array([1 + 64, 8 + 27, 27 + 8, 64 + 1]) / 6)
    np.testing.assert_allclose(descriptor.pool(maps, "gem"), gem, rtol=1e-4)
    # R-MAC of a map with a single hot position: the global max and every region that
    # holds the position add the same unit vector.
    hot = np.zeros((7, 7, 3), np.float32)
    hot[3, 3] = [0, 3, 4]
    r = descriptor.rmac(hot)
    np.testing.assert_allclose(r / np.linalg.norm(r), [0, 0.6, 0.8], atol=1e-6)
    assert np.linalg.norm(r) > 2  # several regions contained it


def test_describe_sums_unit_descriptors_of_each_scale():
    calls = []

    def maps(x):
        calls.append(x.shape)
        # a "feature map" that depends on the image size: its mean colour, as channels
        return np.repeat(x.mean(axis=(1, 2), keepdims=True), 2, axis=1).astype(np.float32)

    rng = np.random.default_rng(0)
    images = [
        rng.integers(0, 255, s, dtype=np.uint8) for s in [(64, 96, 3), (64, 96, 3), (96, 64, 3)]
    ]
    d = Descriptor("whole", 64, (1.0, 0.5), "avg")
    got = descriptor.describe(images, d, maps, batch_size=8)
    assert sorted(calls) == sorted([(2, 64, 96, 3), (1, 96, 64, 3), (2, 32, 48, 3), (1, 48, 32, 3)])
    for i, im in enumerate(images):
        parts = [maps(descriptor.rescale(im, s)[None])[0].mean(axis=(0, 1)) for s in (1.0, 0.5)]
        want = sum(p / np.linalg.norm(p) for p in parts)
        np.testing.assert_allclose(got[i], want / np.linalg.norm(want), rtol=1e-5)


def test_whole_image_decoding_keeps_the_aspect_ratio(tmp_path):
    from PIL import Image

    Image.new("RGB", (400, 100), "red").save(tmp_path / "wide.png")
    Image.new("RGB", (90, 160), "blue").save(tmp_path / "tall.png")
    assert decode_file(str(tmp_path / "tall.png"), 10**8, size=120, crop=False).pixels.shape == (
        213, 120, 3,
    )  # fmt: skip
    # A panorama is cut to 3x its shorter side, centred.
    assert decode_file(str(tmp_path / "wide.png"), 10**8, size=100, crop=False).pixels.shape == (
        100, 300, 3,
    )  # fmt: skip
    assert decode_file(str(tmp_path / "wide.png"), 10**8).pixels.shape == (224, 224, 3)


def _wide_images(folder, n: int, seed: int = 0) -> None:
    """Non-square images whose borders differ from their centres (crop != whole)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for i in range(n):
        sub = folder / ("a" if i % 2 else "b")
        sub.mkdir(parents=True, exist_ok=True)
        px = rng.integers(0, 255, (60, 150, 3), dtype=np.uint8)
        px[:, :40] = rng.integers(0, 255, 3)  # a flat left border of its own colour
        Image.fromarray(px).save(sub / f"w{seed}_{i:03d}.png")


def test_the_catalog_records_its_descriptor_and_refuses_another(tmp_path):
    _wide_images(tmp_path / "imgs", 12)
    o = ["--catalog", tmp_path / "c.db", "--index-dir", tmp_path / "i"]
    r = cli("index", tmp_path / "imgs", "--input", "whole", "--image-size", "96",
            "--scales", "1,0.5", "--pooling", "rmac", *o)  # fmt: skip
    assert r.exit_code == 0, r.output
    db = catalog.open_reader(tmp_path / "c.db")
    fp = json.loads(reads.get_meta(db, "fingerprint"))
    db.conn.close()
    assert (fp["input"], fp["scales"], fp["pooling"]) == ("whole-96", "1,0.5", "rmac-L3")
    coll = api.open_collection(api.settings_for(catalog=str(tmp_path / "c.db")))
    v = coll.vectors(coll.indexed_ids())
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1, atol=1e-5)
    # Later commands use the recorded descriptor without flags ...
    query = sorted((tmp_path / "imgs").rglob("*.png"))[0]
    r = cli("search", query, "--json", *o)
    assert r.exit_code == 0, r.output
    top = json.loads(r.output.splitlines()[0])["results"][0]
    assert top["path"] == str(query) and math.isclose(top["score"], 1, abs_tol=1e-5)
    # ... a second index run adds with it too ...
    _wide_images(tmp_path / "more", 2, seed=5)
    assert cli("index", tmp_path / "more", *o).exit_code == 0
    # ... and a query with another descriptor is refused in one line.
    # (A value equal to the default cannot be told from no value: `--input crop` reads as
    # "the catalog's"; any other value is a descriptor of its own.)
    for flags in (["--scales", "1,0.7071"], ["--image-size", "128"], ["--pooling", "gem"]):
        r = cli("search", query, *flags, *o)
        assert r.exit_code != 0 and len(r.output.strip().splitlines()) == 1, (flags, r.output)


@pytest.mark.parametrize(
    "flags",
    [["--scales", "0"], ["--scales", "x"], ["--image-size", "10"], ["--image-size", "99999"],
     ["--input", "square"], ["--pooling", "max"]],
)  # fmt: skip
def test_bad_descriptor_options_are_one_line(tmp_path, flags):
    fakes.make_images(tmp_path / "imgs", 2)
    r = cli("index", tmp_path / "imgs", "--catalog", tmp_path / "c.db", *flags)
    assert r.exit_code == 2, r.output
    assert len(r.output.strip().splitlines()) == 1 and "Traceback" not in r.output
    assert not (tmp_path / "c.db").exists() or catalog.open_reader(tmp_path / "c.db")
