"""Decoding: every mode to RGB, EXIF orientation, resize + crop, and real broken files."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from pipeline.inputs.decode import DecodeError, decode_bytes, decode_file

LIMIT = 89_478_485


def encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


@pytest.mark.parametrize(
    "mode,fmt",
    [
        ("L", "PNG"),
        ("LA", "PNG"),
        ("RGBA", "PNG"),
        ("CMYK", "JPEG"),
        ("1", "PNG"),
        ("I;16", "PNG"),
        ("P", "GIF"),
        ("RGB", "WEBP"),
        ("RGB", "TIFF"),
        ("RGB", "BMP"),
    ],
)
def test_any_mode_becomes_224_rgb(mode, fmt):
    im = Image.new(mode, (300, 200))
    d = decode_bytes(encode(im, fmt), LIMIT)
    assert d.pixels.shape == (224, 224, 3) and d.pixels.dtype == np.uint8
    assert (d.width, d.height) == (300, 200)
    assert len(d.sha256) == 64


def test_transparent_areas_become_white_not_black():
    im = Image.new("RGBA", (64, 64), (0, 0, 0, 0))  # fully transparent black
    d = decode_bytes(encode(im, "PNG"), LIMIT)
    assert d.pixels.min() == 255

    pal = Image.new("P", (64, 64), 0)
    pal.putpalette([0, 0, 0] * 256)
    d = decode_bytes(encode(pal, "PNG", transparency=0), LIMIT)
    assert d.pixels.min() == 255


def test_16_bit_grey_is_rescaled_not_clipped():
    arr = np.full((64, 64), 32768, dtype=np.uint16)  # mid-grey in 16 bits
    d = decode_bytes(encode(Image.fromarray(arr), "PNG"), LIMIT)
    assert 120 <= d.pixels.mean() <= 135


def test_exif_orientation_is_applied():
    # Top half red, bottom half blue, stored landscape, tagged "rotate 90 CW to display".
    arr = np.zeros((200, 300, 3), dtype=np.uint8)
    arr[:100, :, 0] = 255
    arr[100:, :, 2] = 255
    im = Image.fromarray(arr)
    exif = Image.Exif()
    exif[0x0112] = 6
    d = decode_bytes(encode(im, "JPEG", exif=exif.tobytes(), quality=95), LIMIT)
    # After rotating 90 degrees clockwise, red (old top) is on the right.
    left, right = d.pixels[:, :50].mean(axis=(0, 1)), d.pixels[:, -50:].mean(axis=(0, 1))
    assert right[0] > 200 and right[2] < 60
    assert left[2] > 200 and left[0] < 60


def test_shorter_side_resize_then_centre_crop_keeps_the_centre():
    # 600x200 landscape: three 200-wide bands; only the middle one survives the crop.
    arr = np.zeros((200, 600, 3), dtype=np.uint8)
    arr[:, :200] = (255, 0, 0)
    arr[:, 200:400] = (0, 255, 0)
    arr[:, 400:] = (0, 0, 255)
    d = decode_bytes(encode(Image.fromarray(arr), "PNG"), LIMIT)
    inner = d.pixels[:, 4:-4].reshape(-1, 3).mean(axis=0)
    assert inner[1] > 250 and inner[0] < 5 and inner[2] < 5


def test_large_jpeg_uses_draft_and_still_gives_224():
    im = Image.new("RGB", (4000, 3000), (10, 200, 30))
    d = decode_bytes(encode(im, "JPEG"), LIMIT)
    assert d.pixels.shape == (224, 224, 3)
    assert abs(int(d.pixels[112, 112, 1]) - 200) < 6


def test_zero_byte_file(tmp_path):
    p = tmp_path / "empty.jpg"
    p.write_bytes(b"")
    with pytest.raises(DecodeError, match="empty file"):
        decode_file(str(p), LIMIT)


def test_truncated_jpeg(tmp_path):
    data = encode(Image.effect_noise((400, 300), 64).convert("RGB"), "JPEG", quality=90)
    p = tmp_path / "cut.jpg"
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(DecodeError, match="truncated|corrupt"):
        decode_file(str(p), LIMIT)


def test_text_named_jpg(tmp_path):
    p = tmp_path / "notes.jpg"
    p.write_text("this is not an image\n")
    with pytest.raises(DecodeError, match="not an image"):
        decode_file(str(p), LIMIT)


def test_decompression_bomb_refused_before_decoding(tmp_path):
    # 12000 x 12000 1-bit PNG: a few kB on disk, 144 megapixels when decoded.
    p = tmp_path / "bomb.png"
    Image.new("1", (12000, 12000)).save(p)
    assert p.stat().st_size < 1_000_000
    with pytest.raises(DecodeError, match="over the limit"):
        decode_file(str(p), LIMIT)
    # The limit is configurable.
    with pytest.raises(DecodeError, match="over the limit"):
        decode_bytes(encode(Image.new("RGB", (300, 300)), "PNG"), 50_000)


def test_vanished_file(tmp_path):
    with pytest.raises(DecodeError, match="vanished"):
        decode_file(str(tmp_path / "gone.jpg"), LIMIT)


def test_unreadable_file(tmp_path):
    import os

    if os.geteuid() == 0:
        pytest.skip("root reads files whatever their mode; the vanished-file case covers reads")
    p = tmp_path / "locked.jpg"
    p.write_bytes(encode(Image.new("RGB", (10, 10)), "JPEG"))
    p.chmod(0)
    with pytest.raises(DecodeError, match="permission denied"):
        decode_file(str(p), LIMIT)


def test_huge_file_is_refused_from_its_header_without_reading_it(tmp_path):
    """A 4 GB file must not be read (or hashed) in full to be refused."""
    import tracemalloc

    big = tmp_path / "huge.tif"
    with big.open("wb") as f:  # a sparse 4 GB file of zeros: no image header
        f.truncate(4 << 30)
    bomb = tmp_path / "bomb.png"
    Image.new("L", (3000, 3000)).save(bomb)
    with bomb.open("ab") as f:  # a real header, then 1 GB of trailing bytes
        f.truncate(1 << 30)
    tracemalloc.start()
    for path, words in ((big, "not an image"), (bomb, "over the limit")):
        with pytest.raises(DecodeError, match=words):
            decode_file(str(path), max_pixels=1_000_000)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 50 << 20, f"{peak:,} bytes allocated to refuse them"
