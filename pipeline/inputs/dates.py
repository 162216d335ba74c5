"""When a photo was taken: its EXIF date, from an opened image or from a file's header alone.

The date of an image in the catalog (`taken_at`, for `cbir search --since/--until`)
is its EXIF DateTimeOriginal, else DateTime, else DateTimeDigitized, when one is
valid, and otherwise the file's modification time (the indexing job chooses,
`ingest.jobs`). An EXIF date has no time zone unless the file also gives an offset
(OffsetTimeOriginal and its siblings, EXIF 2.31): without one it is read as local
time of the machine that indexes, as a camera's clock shows it.

EXIF is whatever the file says: a date that does not parse, or that is absurd (before
1826, the first photograph, or more than a day in the future), is no date, and
nothing here raises for any file or value (a hostile EXIF block must never stop a
job). Reading a date from a file reads only its header (`file_date`: Pillow's
`open` and `getexif`, no pixel decoded; a PNG whose EXIF chunk comes after its
pixels has none here).
"""

from __future__ import annotations

import re
import time
import warnings
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

from PIL import Image

from pipeline import files

EXIF_IFD = 0x8769
# (date tag, its offset tag, whether the date is in the Exif IFD rather than IFD0), in the
# order they are tried: the moment the photo was taken first.
_TAGS = (
    (0x9003, 0x9011, True),  # DateTimeOriginal, OffsetTimeOriginal
    (0x0132, 0x9010, False),  # DateTime (IFD0), OffsetTime
    (0x9004, 0x9012, True),  # DateTimeDigitized, OffsetTimeDigitized
)
# "YYYY:MM:DD HH:MM:SS" as EXIF writes it (some writers use '-' or 'T'); anything after
# the seconds (sub-seconds, NULs, spaces) is ignored.
_DATE = re.compile(r"(\d{4})[:-](\d{2})[:-](\d{2})[ T](\d{2}):(\d{2}):(\d{2})", re.ASCII)
_OFFSET = re.compile(r"([+-])(\d{2}):(\d{2})", re.ASCII)
EARLIEST = datetime(1826, 1, 1, tzinfo=UTC).timestamp()
FUTURE_SLACK = 86400.0  # a camera clock a few hours ahead is not absurd; a year ahead is


def _text(value: Any) -> str | None:
    """An EXIF ASCII value as text, bounded; None for any other kind of value."""
    if isinstance(value, bytes):
        value = value[:64].decode("ascii", "replace")
    if not isinstance(value, str):
        return None
    return value[:64].strip("\x00 \t\r\n")


def parse_exif_date(value: Any, offset: Any = None, now: float | None = None) -> float | None:
    """Unix seconds of an EXIF date string ("2024:05:01 13:45:00") with an optional offset
    ("+02:00"); None when it does not parse or is absurd. Never raises."""
    text = _text(value)
    match = _DATE.match(text) if text else None
    if match is None:
        return None
    try:
        when = datetime(*(int(g) for g in match.groups()))
        off = _OFFSET.fullmatch(_text(offset) or "")
        if off is not None:
            minutes = int(off.group(2)) * 60 + int(off.group(3))
            if minutes <= 14 * 60:  # real offsets are within +-14:00
                sign = -1 if off.group(1) == "-" else 1
                when = when.replace(tzinfo=timezone(timedelta(minutes=sign * minutes)))
        stamp = when.timestamp()  # a naive date: local time
    except (ValueError, OverflowError, OSError):
        return None
    latest = (time.time() if now is None else now) + FUTURE_SLACK
    return stamp if EARLIEST <= stamp <= latest else None


def exif_date(im: Image.Image, now: float | None = None) -> float | None:
    """The EXIF date of an opened image (see the module docstring), or None. Never raises."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow warns on odd EXIF; no date is the answer
            exif = im.getexif()
            ifd = exif.get_ifd(EXIF_IFD)
            for tag, offset_tag, in_ifd in _TAGS:
                value = (ifd if in_ifd else exif).get(tag)
                if value is None:
                    continue
                stamp = parse_exif_date(value, ifd.get(offset_tag), now)
                if stamp is not None:
                    return stamp
    except Exception:  # any EXIF Pillow cannot parse is no date, never a failed job
        return None
    return None


def file_date(path: str, max_bytes: int) -> float | None:
    """The EXIF date of an image file from its header alone (no pixel decoded), or None:
    for a catalogued file whose row has no date yet. Only a regular file of at most
    `max_bytes` is opened. Never raises."""
    try:
        with files.open_regular(path, "image", max_bytes) as f, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            im = Image.open(f)
            # Pillow's PNG reader decodes the whole image to look for an EXIF chunk after
            # the pixels: only one before them (in the header) is read here.
            if im.format == "PNG" and "exif" not in im.info:
                return None
            return exif_date(im)
    except Exception:  # a file gone, unreadable or no image: no date (its mtime stands)
        return None


def taken(exif: float | None, mtime: float) -> tuple[float, str]:
    """An image's recorded date and where it came from: its EXIF date, else its mtime."""
    return (exif, "exif") if exif is not None else (mtime, "mtime")
