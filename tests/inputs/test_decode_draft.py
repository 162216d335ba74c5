"""Big JPEGs decode at a reduced scale (Pillow's draft mode): a 12-megapixel file reaches
the resize as 1/8 of itself, also when its EXIF orientation turns it, while the hash is
still the whole file's and the pixels match a full-size decode."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from PIL import Image

from pipeline.inputs import decode
from pipeline.inputs.decode import decode_file

LIMIT = 89_478_485


def big_jpeg(path, orientation: int | None = None):
    """A 4000x3000 JPEG (quality 90) with edges and colour, tagged with `orientation`."""
    x = np.linspace(0, 255, 400, dtype=np.float32)
    small = np.stack(
        [np.tile(x, (300, 1)), np.tile(x[:300, None], (1, 400)), np.full((300, 400), 90.0)],
        axis=2,
    )
    small[100:200, 50:150] = (250, 20, 20)
    im = Image.fromarray(small.astype(np.uint8)).resize((4000, 3000), Image.BILINEAR)
    exif = Image.Exif()
    if orientation:
        exif[0x0112] = orientation
    im.save(path, quality=90, exif=exif)
    return path


@pytest.fixture
def resized(monkeypatch):
    """The sizes of the images that reach `resize_and_crop`."""
    seen: list[tuple[int, int]] = []
    real = decode.resize_and_crop

    def spy(im, *args, **kwargs):
        seen.append(im.size)
        return real(im, *args, **kwargs)

    monkeypatch.setattr(decode, "resize_and_crop", spy)
    return seen


@pytest.mark.parametrize("crop", [True, False])
def test_a_12_megapixel_jpeg_is_decoded_at_one_eighth(tmp_path, resized, crop):
    path = big_jpeg(tmp_path / "big.jpg")
    d = decode_file(str(path), LIMIT, crop=crop)
    assert resized == [(500, 375)]  # 1/8 scale: still more than the 224 the model needs
    assert (d.width, d.height) == (4000, 3000)  # as stored, not as decoded
    assert d.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()  # the whole file
    with Image.open(path) as im:
        full = np.asarray(decode.resize_and_crop(im.convert("RGB"), crop=crop), dtype=float)
    assert d.pixels.shape == full.shape
    assert np.abs(d.pixels - full).mean() < 4  # the same picture


def test_the_exif_orientation_keeps_the_draft(tmp_path, resized):
    path = big_jpeg(tmp_path / "turned.jpg", orientation=6)
    d = decode_file(str(path), LIMIT, crop=False)
    assert resized == [(375, 500)]  # turned upright, still at 1/8
    assert d.pixels.shape == (299, 224, 3)  # upright: taller than wide
