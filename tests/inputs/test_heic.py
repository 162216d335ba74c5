"""HEIC/HEIF (pillow-heif) and AVIF (Pillow): phone photos are indexed and searched like
JPEGs, with the same header limits, orientation and one-line failures (fast tier).

The files are written here by the same libraries, from generated pictures whose PNG
is the reference: a lossy copy must decode to nearly the same pixels.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pillow_heif
import pytest
from PIL import Image

import fakes
from pipeline import api
from pipeline.inputs.decode import DecodeError, decode_file
from pipeline.inputs.scan import is_image_name

pillow_heif.register_heif_opener()  # (pipeline.inputs.decode registers it too)
MAX_PIXELS = 100_000_000


@pytest.fixture(autouse=True)
def fake_model(monkeypatch):
    monkeypatch.setattr(api.models, "cached_embedder", fakes.cached)


def picture(seed: int, w: int = 360, h: int = 240) -> Image.Image:
    """Blocks of colour: no detail a lossy codec would blur away."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (h // 40, w // 40, 3))
    return Image.fromarray(np.kron(blocks, np.ones((40, 40, 1))).astype(np.uint8))


def write(im: Image.Image, path: Path, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, quality=90, **kw)
    return path


@pytest.mark.parametrize("ext", [".heic", ".heif", ".avif", ".HEIC"])
def test_phone_formats_are_image_names(ext):
    assert is_image_name(f"IMG_0001{ext}")


@pytest.mark.parametrize("ext", [".heic", ".avif"])
def test_decodes_to_the_pixels_of_the_png(tmp_path, ext):
    im = picture(0)
    want = decode_file(str(write(im, tmp_path / "a.png")), MAX_PIXELS)
    got = decode_file(str(write(im, tmp_path / f"a{ext}")), MAX_PIXELS)
    assert got.pixels.shape == want.pixels.shape == (224, 224, 3)
    assert np.abs(got.pixels.astype(int) - want.pixels.astype(int)).mean() < 4
    assert (got.width, got.height) == (360, 240)


def test_orientation_is_applied_once(tmp_path):
    """A HEIC saved with EXIF orientation 6 (turned 90 degrees clockwise) decodes like
    the JPEG with the same tag: upright, not turned twice."""
    im = picture(1)
    exif = Image.Exif()
    exif[0x0112] = 6
    jpg = decode_file(str(write(im, tmp_path / "o.jpg", exif=exif.tobytes())), MAX_PIXELS)
    heic = decode_file(str(write(im, tmp_path / "o.heic", exif=exif.tobytes())), MAX_PIXELS)
    assert np.abs(heic.pixels.astype(int) - jpg.pixels.astype(int)).mean() < 6


def test_limits_are_checked_from_the_header(tmp_path):
    path = write(picture(2), tmp_path / "big.heic")
    with pytest.raises(DecodeError, match="over the limit"):
        decode_file(str(path), max_pixels=50_000)


@pytest.mark.parametrize("damage", ["truncate", "zero"])
def test_a_damaged_heic_is_one_reason(tmp_path, damage):
    path = write(picture(3), tmp_path / "d.heic")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncate" else bytes(len(data)))
    with pytest.raises(DecodeError) as e:
        decode_file(str(path), MAX_PIXELS)
    assert "\n" not in str(e.value) and str(e.value)


def test_index_and_search_heic_and_avif(tmp_path):
    """A folder of PNGs with HEIC and AVIF copies of two of them: all indexed, and each
    copy used as a query finds its PNG first."""
    folder = tmp_path / "photos"
    for i in range(6):
        write(picture(10 + i), folder / f"p{i}.png")
    write(picture(10), folder / "phone" / "IMG_0001.HEIC")
    write(picture(11), folder / "phone" / "IMG_0002.avif")
    (folder / "phone" / "broken.heic").write_bytes(b"\0\0\0\x18ftypheic" + bytes(40))
    out = fakes.ok(fakes.cli("index", folder, *fakes.opts(tmp_path)), "index")
    assert "indexed 8 " in out and "failed 1" in out, out
    for query, twin in (("IMG_0001.HEIC", "p0.png"), ("IMG_0002.avif", "p1.png")):
        r = fakes.cli(
            "search", folder / "phone" / query, "-k", "3", "--json", *fakes.opts(tmp_path)
        )
        answer = json.loads(fakes.ok(r, query).splitlines()[0])
        top = [Path(x["path"]).name for x in answer["results"][:2]]
        assert set(top) == {query, twin}, (query, answer["results"])
        assert answer["results"][1]["score"] > 0.99


def test_a_heic_thumbnail_is_never_decoded_in_place_of_the_picture(tmp_path):
    """pillow-heif's draft mode would hand back the embedded thumbnail, which an editor
    may have left stale: a HEIC decodes from its picture, so one written with a thumbnail
    gives exactly the pixels of the same picture written without one."""
    pixels = np.random.default_rng(7).integers(0, 256, (480, 640, 3), dtype=np.uint8)
    for name, thumbs in (("plain.heic", []), ("thumbed.heic", [320])):
        pillow_heif.from_pillow(Image.fromarray(pixels)).save(
            tmp_path / name, quality=90, thumbnails=thumbs
        )
    assert pillow_heif.open_heif(tmp_path / "thumbed.heic").info.get("thumbnails")
    plain = decode_file(str(tmp_path / "plain.heic"), MAX_PIXELS).pixels
    thumbed = decode_file(str(tmp_path / "thumbed.heic"), MAX_PIXELS).pixels
    assert np.array_equal(plain, thumbed)
