"""Images sent to a server to be added (`POST /api/images`): checked, stored, deleted.

The client names nothing on disk. An upload is decoded first, as an indexing job
will decode it (the same limits: max_pixels, the aspect ratio, the descriptor's
size), so what is no image, a truncated file or a decompression bomb is refused
(`UploadRefused`, one line) before a byte is written. It is then stored as
FOLDER/ab/SHA256.EXT: the sha256 of its bytes (its first two hex digits name a
subfolder, so no folder grows past a few thousand files) and the extension of
the format Pillow found in it, never the name the client sent. The same bytes
sent again are the same file, so an add is idempotent. Written whole or not at
all (temporary file, fsync, rename, the folder fsynced: `movefiles.write_atomic`).

A file is deleted (`delete`) only when it lies inside FOLDER, by its real
folder: a catalog row pointing elsewhere, or at a link placed in FOLDER, never
takes a file outside it.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from pipeline import files
from pipeline.ingest import movefiles
from pipeline.inputs.decode import SIZE, DecodeError, decode_bytes

# Pillow's format name -> the extension stored; each one `scan` indexes. A format
# not listed (ICO, a PDF, ...) decodes but would never be found by a job: refused.
SUFFIXES = {
    "JPEG": ".jpg",
    "MPO": ".jpg",  # a phone's JPEG with a second frame (Pillow names it MPO)
    "PNG": ".png",
    "GIF": ".gif",
    "BMP": ".bmp",
    "TIFF": ".tif",
    "WEBP": ".webp",
    "PPM": ".ppm",
    "HEIF": ".heic",
    "AVIF": ".avif",
}


class UploadRefused(Exception):
    """An upload that cannot be added; the message says why, in one line."""


@dataclass(frozen=True)
class CheckedUpload:
    """An upload that decodes as the catalog's images do, and where it is to be stored."""

    name: str  # as the client sent it: told back in answers, never used as a path
    data: bytes
    sha256: str
    suffix: str

    @property
    def relative(self) -> str:
        return f"{self.sha256[:2]}/{self.sha256}{self.suffix}"


def check(
    name: str, data: bytes, max_pixels: int, size: int = SIZE, crop: bool = True
) -> CheckedUpload:
    """Decode `data` as an indexing job will (UploadRefused, one line, if it cannot be)."""
    limit = files.image_max_bytes(max_pixels)
    if len(data) > limit:  # the job would refuse the file by its size (`decode_file`)
        raise UploadRefused(f"{len(data):,} bytes, over the limit of {limit:,} for an image")
    try:
        decode_bytes(data, max_pixels, size=size, crop=crop)
    except DecodeError as e:
        raise UploadRefused(str(e)) from None
    with Image.open(io.BytesIO(data)) as im:  # decoded above: the header reads again
        fmt = im.format or "unknown"
    suffix = SUFFIXES.get(fmt)
    if suffix is None:
        raise UploadRefused(
            f"{fmt} images are not indexed (formats: {', '.join(sorted(set(SUFFIXES)))})"
        )
    return CheckedUpload(name, data, hashlib.sha256(data).hexdigest(), suffix)


def _holds(path: Path, sha256: str, size: int) -> bool:
    """Whether `path` is a regular file (not a link) with these bytes already."""
    try:
        st = path.lstat()
        if not stat.S_ISREG(st.st_mode) or st.st_size != size:
            return False
        data = files.read_regular(path, "upload", size)
    except (OSError, files.UnusableFile):
        return False
    return hashlib.sha256(data).hexdigest() == sha256


def store(folder: str | Path, upload: CheckedUpload) -> tuple[str, bool]:
    """Write the upload under `folder` (see the module docstring) unless the same bytes are
    there; returns (its absolute path, whether it was written now)."""
    path = Path(os.path.abspath(folder)) / upload.relative
    if _holds(path, upload.sha256, len(upload.data)):
        return str(path), False
    # Anything else in its place (a link, other bytes) is replaced, never written through.
    movefiles.write_atomic(path, upload.data, "upload")
    return str(path), True


def inside(path: str, folder: str | Path) -> bool:
    """Whether the file `path` names lies in `folder`, by real folders (its own name as is:
    a link there is itself inside, whatever it points at)."""
    top = os.path.realpath(folder)
    real = os.path.join(
        os.path.realpath(os.path.dirname(os.path.abspath(path))), os.path.basename(path)
    )
    return real.startswith(top.rstrip(os.sep) + os.sep)


def delete(path: str, folder: str | Path) -> bool:
    """Delete the file at `path` if it lies inside `folder` (and empty subfolders it
    leaves there); whether a file was deleted."""
    if not inside(path, folder) or not os.path.lexists(path):
        return False
    try:
        movefiles.unlink(path)
    except OSError:  # gone meanwhile, a folder, no permission: the answer says not deleted
        return False
    movefiles.remove_empty_folders(os.path.dirname(path), str(folder))
    return True
