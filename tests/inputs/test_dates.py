"""When a photo was taken (`inputs.dates`): EXIF dates read from generated files, hostile
values ignored, never an exception. Fast tier: small JPEGs and PNGs written by Pillow."""

from __future__ import annotations

import time
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.inputs import dates
from pipeline.inputs.decode import decode_file

MAX_BYTES = 10_000_000


def photo(path: Path, fmt: str = "JPEG", **tags) -> Path:
    """A small image whose EXIF holds `tags`: original / digitized (Exif IFD), datetime
    (IFD0), offset (OffsetTimeOriginal); each value written as given (str or bytes)."""
    exif = Image.Exif()
    ifd = exif.get_ifd(dates.EXIF_IFD)
    names = {"original": 0x9003, "digitized": 0x9004, "offset": 0x9011}
    for name, value in tags.items():
        if name == "datetime":
            exif[0x0132] = value
        else:
            ifd[names[name]] = value
    pixels = np.random.default_rng(len(path.name)).integers(0, 255, (32, 40, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, fmt, exif=exif.tobytes())
    return path


def local(*args) -> float:
    return datetime(*args).timestamp()


def test_exif_dates_in_order_of_preference(tmp_path):
    f = photo(tmp_path / "a.jpg", original="2021:06:15 10:20:30", datetime="2022:01:01 00:00:00")
    assert dates.file_date(str(f), MAX_BYTES) == local(2021, 6, 15, 10, 20, 30)
    f = photo(tmp_path / "b.jpg", datetime="2022:01:02 03:04:05", digitized="2019:01:01 00:00:00")
    assert dates.file_date(str(f), MAX_BYTES) == local(2022, 1, 2, 3, 4, 5)
    f = photo(tmp_path / "c.jpg", digitized="2019:07:08 09:10:11")
    assert dates.file_date(str(f), MAX_BYTES) == local(2019, 7, 8, 9, 10, 11)
    # An offset makes it a moment: 12:00 at +02:00 is 10:00 UTC.
    f = photo(tmp_path / "d.jpg", original="2024:05:01 12:00:00", offset="+02:00")
    assert (
        dates.file_date(str(f), MAX_BYTES)
        == datetime.fromisoformat("2024-05-01T10:00:00+00:00").timestamp()
    )
    # A bad original falls back to the next tag.
    f = photo(tmp_path / "e.jpg", original="garbage", datetime="2020:02:29 12:00:00")
    assert dates.file_date(str(f), MAX_BYTES) == local(2020, 2, 29, 12)


def test_decoding_records_the_exif_date(tmp_path):
    f = photo(tmp_path / "a.jpg", original="2021:06:15 10:20:30")
    assert decode_file(str(f), 10**8).taken_at == local(2021, 6, 15, 10, 20, 30)
    plain = tmp_path / "plain.jpg"
    Image.new("RGB", (40, 30), "red").save(plain)
    assert decode_file(str(plain), 10**8).taken_at is None
    assert dates.taken(None, 123.5) == (123.5, "mtime")
    assert dates.taken(99.0, 123.5) == (99.0, "exif")


def test_a_png_exif_chunk_before_the_pixels_is_read(tmp_path):
    f = photo(tmp_path / "a.png", "PNG", original="2018:03:04 05:06:07")
    assert dates.file_date(str(f), MAX_BYTES) == local(2018, 3, 4, 5, 6, 7)


HOSTILE = [
    "0000:00:00 00:00:00",
    "    :  :     :  :  ",
    "2021:13:01 00:00:00",
    "2021:02:30 00:00:00",
    "2021:01:01 25:00:00",
    "1800:01:01 00:00:00",  # before photography
    "9999:12:31 23:59:59",  # the future
    "2021:01:01",
    "x" * 5000,
    "2021:01:01 00:00:00" + "\x00" * 3000,  # padded: still a date
    b"\xff\xfe\x00garbage",
    "\u0662\u0660\u0662\u0661:01:01 00:00:00",  # 2021 in Arabic-Indic digits
]


@pytest.mark.parametrize("value", HOSTILE)
def test_hostile_exif_dates_are_no_date(tmp_path, value):
    f = photo(tmp_path / "h.jpg", original=value)
    got = dates.file_date(str(f), MAX_BYTES)
    if isinstance(value, str) and value.startswith("2021:01:01 00:00:00"):
        assert got == local(2021, 1, 1)
    else:
        assert got is None
    assert decode_file(str(f), 10**8).taken_at == got  # decoding never fails on it


@pytest.mark.parametrize(
    "value, offset",
    [(12345, None), (None, None), (["2021:01:01 00:00:00"], None), ("2021:01:01 00:00:00", "+99:00"),
     ("2021:01:01 00:00:00", 7), ("2021:01:01 00:00:00", "-01:30")],
)  # fmt: skip
def test_parse_never_raises(value, offset):
    got = dates.parse_exif_date(value, offset)
    if isinstance(value, str):
        assert got is not None  # an offset out of range is ignored, the date kept
    else:
        assert got is None
    assert dates.parse_exif_date("2024:05:01 00:00:00", now=local(2024, 4, 29)) is None
    assert dates.parse_exif_date("2024:05:01 00:00:00", now=local(2024, 4, 30, 12)) is not None


def test_unreadable_files_have_no_date(tmp_path):
    (tmp_path / "not.jpg").write_bytes(b"\xff\xd8\xff\xe1" + b"\x00" * 100)
    (tmp_path / "dir.jpg").mkdir()
    for name in ("not.jpg", "dir.jpg", "gone.jpg"):
        assert dates.file_date(str(tmp_path / name), MAX_BYTES) is None
    big = photo(tmp_path / "big.jpg", original="2021:06:15 10:20:30")
    assert dates.file_date(str(big), 100) is None  # over the size limit: not opened


def test_reading_a_header_does_not_decode(tmp_path):
    """A 6000x6000 JPEG's date comes from its header in well under a decode's time."""
    f = tmp_path / "large.jpg"
    exif = Image.Exif()
    exif.get_ifd(dates.EXIF_IFD)[0x9003] = "2021:06:15 10:20:30"
    Image.new("RGB", (6000, 6000), "gray").save(f, exif=exif.tobytes())
    start = time.perf_counter()
    for _ in range(20):
        assert dates.file_date(str(f), 10**9) == local(2021, 6, 15, 10, 20, 30)
    assert (time.perf_counter() - start) / 20 < 0.02
