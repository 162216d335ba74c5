"""`cbir bench extract --big`, fast tier: the big copies are the photos upscaled (turned
for an upright one), and the command prints both rates and their ratio, with the fake
model and small "big" copies. The real figures: docs/benchmarks.md, "Big JPEGs"."""

from __future__ import annotations

import re

from PIL import Image

from pipeline.bench import bigjpeg
from tests import fakes


def test_the_copies_are_the_photos_upscaled_and_upright_stays_upright(tmp_path):
    wide, tall = tmp_path / "wide.jpg", tmp_path / "tall.png"
    Image.new("RGB", (60, 40), (200, 10, 10)).save(wide)
    Image.new("RGBA", (40, 60), (10, 200, 10, 255)).save(tall)
    made = bigjpeg.make_big([str(wide), str(tall)], tmp_path / "big", size=(400, 300))
    sizes = []
    for path in made:
        with Image.open(path) as im:
            assert im.format == "JPEG" and im.mode == "RGB"
            sizes.append(im.size)
            colour = im.getpixel((im.width // 2, im.height // 2))
    assert sizes == [(400, 300), (300, 400)]
    assert colour[1] > 180 and colour[0] < 40  # the second photo's green


def test_the_command_prints_both_rates_and_their_ratio(tmp_path, monkeypatch):
    from pipeline.api import models

    monkeypatch.setattr(models, "cached_embedder", fakes.cached)
    monkeypatch.setattr(bigjpeg, "BIG", (640, 480))
    fakes.make_images(tmp_path / "photos", 6, size=64)
    out = fakes.ok(
        fakes.cli(
            "bench",
            "extract",
            tmp_path / "photos",
            "--big",
            "--limit",
            4,
            "--repeats",
            2,
            "--runtime",
            "keras",  # no int8 calibration, which would look for real weights
        )  # fmt: skip
    )
    small = float(re.search(r"small: ([\d.]+) images/s", out).group(1))
    big = float(re.search(r"12 MP: ([\d.]+) images/s", out).group(1))
    ratio = float(re.search(r"ratio 12 MP / small: ([\d.]+)", out).group(1))
    assert small > 0 and big > 0 and abs(ratio - big / small) < 0.01
    assert "4 images under" in out and "640x480 copies" in out and "decode_file" in out
