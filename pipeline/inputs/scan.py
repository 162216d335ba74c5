"""Walking folders: which files are images, where they are, and their labels."""

from __future__ import annotations

import csv
import logging
import os
import re
import stat
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from pipeline import files
from pipeline.errors import CbirError, path_problem

log = logging.getLogger("cbir")

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}
    | {".heic", ".heif", ".hif", ".avif"}  # phone photos (pillow-heif; AVIF: Pillow)
)


@dataclass(frozen=True)
class ScannedFile:
    """One image file found on disk, before it is opened."""

    path: str  # absolute, symlinks kept as the user named them
    size: int
    mtime: float
    label: str | None


def is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


# Characters no path or label holds, and no editor or spreadsheet writes: a NUL or another
# C0 control (tab, LF and CR are text) in a CSV means damage or a binary file. Python's csv
# module passes them on (a NUL reached os.stat as "embedded null byte").
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


class _Lines:
    """The text lines of a CSV, each refused in one line if it holds a control character.

    Once all are read: how many (`number`, as an editor numbers lines), and whether the
    last one ended with a line end (`ended`): a file cut short usually does not.
    """

    def __init__(self, lines: Iterator[str], path: str | Path):
        self._lines, self._path = lines, path
        self.number, self.ended = 0, True

    def __iter__(self) -> Iterator[str]:
        # Measured: reading 1M rows took 1.4 s instead of 1.1 s (an index of 1M images
        # embeds for hours).
        n, line = 0, ""
        for n, line in enumerate(self._lines, start=1):
            if bad := _CONTROL.search(line):
                char = bad.group()
                held = "a NUL byte" if char == "\0" else f"a control character (U+{ord(char):04X})"
                raise CbirError(f"{self._path} line {n} holds {held}: not a text CSV (damaged?)")
            yield line
        self.number, self.ended = n, not line or line.endswith(("\n", "\r"))


@contextmanager
def _csv_reader(path: str | Path, what: str) -> Iterator[tuple[csv.DictReader, _Lines]]:
    """A DictReader over a CSV file with its header names stripped, and its `_Lines`;
    each failure one line.

    A FIFO, a device, a file over `files.CSV_MAX` or a line over `files.CSV_LINE_MAX`
    is refused before it is read; a line holding a control character when it is read.
    """
    try:
        with files.open_regular(path, what, files.CSV_MAX) as f:
            lines = _Lines(files.bounded_lines(f, path, what), path)
            reader = csv.DictReader(lines, skipinitialspace=True)
            reader.fieldnames = [name.strip() for name in reader.fieldnames or []]
            yield reader, lines
    except FileNotFoundError:
        raise CbirError(f"{what} file not found: {path}") from None
    except UnicodeDecodeError as e:
        raise CbirError(
            f"{path} is not UTF-8 text (byte {e.start}); save it as UTF-8 CSV"
        ) from None
    except csv.Error as e:
        raise CbirError(f"{path} is not a readable CSV file: {e}") from None
    except OSError as e:
        raise CbirError(f"cannot read {what} file {path}: {e.strerror}") from None


def csv_columns(path: str | Path, what: str) -> list[str]:
    """The column names of a CSV's header (read as `read_csv` reads the file)."""
    with _csv_reader(path, what) as (reader, _):
        return list(reader.fieldnames or [])


def read_csv(
    path: str | Path, required: tuple[str, ...], what: str, header_hint: str
) -> list[dict[str, str | None]]:
    """The rows of a UTF-8 CSV with a header holding `required` columns, as dicts.

    Spreadsheet habits are accepted: a byte-order mark, and spaces around the
    header names and after the commas. Every way it can fail is one line naming
    the file (`what`: "label", "ground-truth"; `header_hint`: what the header needs),
    and so is damage that shows: a control character (a NUL) on any line, or a last
    line that has neither a line end nor every column of the header (a file cut short
    in its last row; one cut exactly at a line end cannot be told from a shorter file).
    """
    with _csv_reader(path, what) as (reader, lines):
        missing = [c for c in required if c not in (reader.fieldnames or [])]
        if missing:
            raise CbirError(f"{path}: {header_hint} (missing: {', '.join(missing)})")
        rows = list(reader)
    # DictReader fills the columns a short row lacks with None (an empty field is "").
    if rows and not lines.ended and None in rows[-1].values():
        raise CbirError(
            f"{path} line {lines.number} has fewer columns than the header and no line end: "
            "the file looks cut short (damaged?)"
        )
    return rows


def read_label_csv(csv_path: str | Path, split: str = "") -> dict[str, str | None]:
    """Read `path,label[,split]` rows; paths are relative to the CSV's folder.

    Returns absolute path -> label, keeping only rows of `split` when given.
    Spreadsheet habits are accepted: a UTF-8 byte-order mark, and spaces
    around the header names and after the commas (`path, label`).
    """
    csv_path = Path(csv_path)
    rows = read_csv(
        csv_path, ("path",), "label", "a label CSV needs a 'path' column (path,label[,split])"
    )
    base = csv_path.resolve().parent  # after reading: a symlink loop is refused there
    if split and rows and "split" not in rows[0]:
        raise CbirError(f"{csv_path}: --split {split} given but the CSV has no 'split' column")
    labels: dict[str, str | None] = {}
    first_row: dict[str, int] = {}
    for n, row in enumerate(rows, start=1):
        if not row["path"]:  # empty, or a short row (DictReader fills it with None)
            raise CbirError(f"{csv_path}: data row {n} has no path")
        if split and row.get("split") != split:
            continue
        path, label = os.path.abspath(base / row["path"]), row.get("label") or None
        if path in labels and labels[path] != label:
            # Refused, not resolved: either label would make every figure that uses it a guess.
            raise CbirError(
                f"{csv_path}: {row['path']} is listed twice with different labels, "
                f"{labels[path]!r} (data row {first_row[path]}) and {label!r} (data row {n}); "
                "keep one row"
            )
        labels[path] = label
        first_row.setdefault(path, n)
    return labels


def _walk(root: str, seen_dirs: set[tuple[int, int]]) -> Iterator[str]:
    """Yield image paths under `root`, following directory links once each."""
    try:
        st = os.stat(root)
    except OSError:
        return
    key = (st.st_dev, st.st_ino)
    if key in seen_dirs:  # a symlink loop or a second link to the same folder
        return
    seen_dirs.add(key)
    try:
        entries = sorted(os.scandir(root), key=lambda e: e.name)
    except OSError:
        return
    for entry in entries:
        if entry.name.startswith("."):
            continue
        try:
            is_dir = entry.is_dir(follow_symlinks=True)
        except OSError:
            continue
        if is_dir:
            yield from _walk(entry.path, seen_dirs)
        elif is_image_name(entry.name):
            yield entry.path


def scan(
    roots: Iterable[str | Path],
    labels: str = "folder",
    split: str = "",
    missing: list[str] | None = None,
    warnings: list[str] | None = None,
) -> Iterator[ScannedFile]:
    """Find the image files under `roots` (folders, image files or manifest CSVs).

    `labels` is "folder" (the parent folder's name), "none", or a CSV path of
    `path,label`. A root ending in `.csv` lists the files itself, with their
    labels, optionally restricted to one `split`. Files a manifest lists that
    do not exist (and dangling links) are skipped: each is appended to
    `missing` when given, and every root with some gives a one-line warning.
    So does a label CSV that lists files under the folders in `roots` that do not
    exist (a typo, a renamed folder: those labels are used by no image); its rows
    outside them are normal (one label file for a whole data set). Warnings are
    appended to `warnings` when given, else logged.
    """

    def warn(message: str) -> None:
        if warnings is not None:
            warnings.append(message)
        else:
            log.warning("%s", message)

    csv_labels = read_label_csv(labels) if labels not in ("folder", "none") else None
    seen_dirs: set[tuple[int, int]] = set()
    seen_files: set[str] = set()
    folders: list[str] = []  # folder roots, each ending in a separator
    for root in roots:
        root = os.path.abspath(root)
        gone: list[str] = []
        listed: dict[str, str | None] | None = None
        if root.lower().endswith(".csv"):
            listed = read_label_csv(root, split)
            paths: Iterable[str] = sorted(listed)
        elif os.path.isdir(root):
            folders.append(os.path.join(root, ""))
            paths = _walk(root, seen_dirs)
        elif os.path.exists(root):
            paths = [root] if is_image_name(root) else []
        else:
            problem = path_problem(root, folder=True)  # a symlink loop, a file on the way
            raise CbirError(problem or f"no such file or folder: {root}")
        for path in paths:
            if path in seen_files:
                continue
            try:
                st = os.stat(path)
            except OSError:
                # Listed in a manifest but missing, or a dangling link: nothing to index.
                gone.append(path)
                continue
            if not stat.S_ISREG(st.st_mode):
                continue
            seen_files.add(path)
            if listed is not None and labels == "folder":
                label = listed[path]
            elif csv_labels is not None:
                label = csv_labels.get(path)
            elif labels == "none":
                label = None
            else:
                label = os.path.basename(os.path.dirname(path))
            yield ScannedFile(path=path, size=st.st_size, mtime=st.st_mtime, label=label)
        if gone:
            # Said, not silent: a manifest that names files elsewhere would otherwise
            # look like a successful run that indexed less.
            where = "listed in" if listed is not None else "linked under"
            warn(
                f"{len(gone)} files {where} {root} do not exist and were skipped (first: {gone[0]})"
            )
            if missing is not None:
                missing.extend(gone)
    if csv_labels and folders:
        # Only rows the scan did not meet are looked up: at most a stat each.
        unknown = [
            p
            for p in csv_labels
            if p not in seen_files and p.startswith(tuple(folders)) and not os.path.exists(p)
        ]
        if unknown:
            warn(
                f"{len(unknown)} files listed in {labels} under the folders being indexed "
                f"do not exist, so their labels are unused (first: {unknown[0]})"
            )


def no_images(where: Iterable[str | Path], more: str = "") -> CbirError:
    """The one-line error for roots that hold no image file."""
    return CbirError(
        f"no images found under {', '.join(map(str, where))} (image files end in "
        f"{', '.join(sorted(IMAGE_EXTENSIONS))}){more}"
    )


@dataclass(frozen=True)
class Found:
    """What an index job found under its roots."""

    files: list[ScannedFile]
    missing: int  # named by a manifest (or a dangling link) but not on disk: skipped


def find(
    roots: list[str],
    labels: str = "folder",
    split: str = "",
    allow_empty: bool = False,
    hint: str = "",
) -> Found:
    """Scan `roots` for an index job in full, before anything is opened for writing, so a
    bad CSV or an empty folder leaves the catalog untouched (or uncreated).

    Each CSV or folder with files that do not exist gives one warning line. Finding no
    image at all is an error (a typo, an unmounted disk; an index that ends up empty
    answers every search with nothing) unless `allow_empty` (a run that only prunes);
    its one line then carries those warnings, and `hint`.
    """
    warnings: list[str] = []
    missing: list[str] = []
    files = list(scan(roots, labels, split, missing, warnings))
    if not files and not allow_empty:
        raise no_images(roots, "".join(f"; {w}" for w in warnings) + hint)
    for message in warnings:
        log.warning("%s", message)
    return Found(files, len(missing))
