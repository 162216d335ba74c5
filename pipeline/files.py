"""Opening the files a user names: a regular file of a size suited to its kind, or one line.

A FIFO named as a config file would block `open` until a writer came, and
`/dev/zero` would be read until memory ran out. So every file cbir reads on a
user's word is opened without blocking, checked by `fstat` on the open
descriptor (what is checked is what is read, even if the name is swapped
meanwhile) to be a regular file within the limit of its kind, and read no
further than that limit even if it grows while being read.

Also `shown`: a file name as a page or report prints it (any layer may show one).
"""

from __future__ import annotations

import io
import os
import stat
from collections.abc import Iterator
from typing import BinaryIO

from pipeline.errors import CbirError

# Limits by kind, far above any real file of the kind and far below what would
# hurt: a config file is a few hundred bytes; a label, manifest or ground-truth
# CSV ~150 bytes a row (a million images is ~150 MB); a whitening transform at
# most two 2048x2048 float32 matrices (~34 MB); ResNet50 weights ~100 MB.
CONFIG_MAX = 1 << 20
CSV_MAX = 1 << 30
CSV_LINE_MAX = 1 << 16  # a path is at most 4096 bytes (PATH_MAX); a label is short
WHITENING_MAX = 256 << 20
WEIGHTS_MAX = 4 << 30
# An image file may hold every pixel uncompressed at 16-bit RGBA (8 bytes), plus metadata.
IMAGE_BYTES_PER_PIXEL = 8
IMAGE_METADATA_MAX = 64 << 20

_KINDS = (
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


class UnusableFile(CbirError):
    """A named file that is not a regular file, or too large for its kind (exit 2).

    `reason` is the message without the file's name, for callers that name it themselves.
    """

    def __init__(self, what: str, path: str | os.PathLike, reason: str):
        super().__init__(f"{what} file {os.fsdecode(path)}: {reason}")
        self.reason = reason


def shown(text: str) -> str:
    """A file name as printable text: undecodable bytes become U+FFFD (display only)."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def image_max_bytes(max_pixels: int) -> int:
    """The largest image file worth reading under a pixel limit."""
    return max_pixels * IMAGE_BYTES_PER_PIXEL + IMAGE_METADATA_MAX


def _over(limit: int, what: str) -> str:
    return f"over the limit of {limit:,} bytes for {what} files"


def check_size(size: int, path: str | os.PathLike, what: str, limit: int) -> None:
    """Raise UnusableFile if a file of `size` bytes is over the `limit` of its kind."""
    if size > limit:
        raise UnusableFile(what, path, f"{size:,} bytes, {_over(limit, what)}")


def open_regular(path: str | os.PathLike, what: str, limit: int | None) -> BinaryIO:
    """`path` open for binary reading, if it is a regular file of at most `limit` bytes
    (None: the caller checks the size itself, with `check_size`).

    Raises UnusableFile otherwise (`what` names the kind: "config", "label", ...),
    and OSError (FileNotFoundError, PermissionError, ...) as `open` would.
    """
    # O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer.
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = next((name for test, name in _KINDS if test(st.st_mode)), "not a file")
            raise UnusableFile(what, path, f"not a regular file ({kind})")
        if limit is not None:
            check_size(st.st_size, path, what, limit)
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def require_regular(path: str | os.PathLike, what: str, limit: int) -> None:
    """Check a file that a library then opens by its name (Keras weights): CbirError in one
    line unless it is a readable regular file of at most `limit` bytes."""
    try:
        open_regular(path, what, limit).close()
    except FileNotFoundError:
        raise CbirError(f"{what} file not found: {os.fsdecode(path)}") from None
    except OSError as e:
        raise CbirError(f"cannot read {what} file {os.fsdecode(path)}: {e.strerror}") from None


def read_regular(path: str | os.PathLike, what: str, limit: int) -> bytes:
    """The whole of a regular file of at most `limit` bytes (a file that grows past it too)."""
    with open_regular(path, what, limit) as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise UnusableFile(what, path, _over(limit, what))
    return data


def bounded_lines(
    f: BinaryIO,
    path: str | os.PathLike,
    what: str,
    encoding: str = "utf-8-sig",
    limit: int = CSV_MAX,
    line_limit: int = CSV_LINE_MAX,
) -> Iterator[str]:
    """The text lines of an open file (newlines kept, as `csv` wants them), refusing a line
    longer than `line_limit` bytes or more than `limit` bytes in all, before reading them."""
    text = io.TextIOWrapper(f, encoding=encoding, newline="")
    total = 0
    while line := text.readline(line_limit + 1):
        if len(line) > line_limit:
            raise UnusableFile(what, path, f"a line is longer than {line_limit:,} characters")
        total += len(line)
        if total > limit:
            raise UnusableFile(what, path, _over(limit, what))
        yield line
