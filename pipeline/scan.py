"""Walking folders: which files are images, where they are, and their labels."""

from __future__ import annotations

import csv
import logging
import os
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import CbirError

log = logging.getLogger("cbir")

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}
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


def read_csv(
    path: str | Path, required: tuple[str, ...], what: str, header_hint: str
) -> list[dict[str, str | None]]:
    """The rows of a UTF-8 CSV with a header holding `required` columns, as dicts.

    Spreadsheet habits are accepted: a byte-order mark, and spaces around the
    header names and after the commas. Every way it can fail is one line naming
    the file (`what`: "label", "ground-truth"; `header_hint`: what the header needs).
    """
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f, skipinitialspace=True)
            fields = [name.strip() for name in reader.fieldnames or []]
            missing = [c for c in required if c not in fields]
            if missing:
                raise CbirError(f"{path}: {header_hint} (missing: {', '.join(missing)})")
            reader.fieldnames = fields
            return list(reader)
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


def read_label_csv(csv_path: str | Path, split: str = "") -> dict[str, str | None]:
    """Read `path,label[,split]` rows; paths are relative to the CSV's folder.

    Returns absolute path -> label, keeping only rows of `split` when given.
    Spreadsheet habits are accepted: a UTF-8 byte-order mark, and spaces
    around the header names and after the commas (`path, label`).
    """
    csv_path = Path(csv_path)
    base = csv_path.resolve().parent
    rows = read_csv(
        csv_path, ("path",), "label", "a label CSV needs a 'path' column (path,label[,split])"
    )
    if split and rows and "split" not in rows[0]:
        raise CbirError(f"{csv_path}: --split {split} given but the CSV has no 'split' column")
    labels: dict[str, str | None] = {}
    for n, row in enumerate(rows, start=1):
        if not row["path"]:  # empty, or a short row (DictReader fills it with None)
            raise CbirError(f"{csv_path}: data row {n} has no path")
        if split and row.get("split") != split:
            continue
        labels[os.path.abspath(base / row["path"])] = row.get("label") or None
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
) -> Iterator[ScannedFile]:
    """Find the image files under `roots` (folders, image files or manifest CSVs).

    `labels` is "folder" (the parent folder's name), "none", or a CSV path of
    `path,label`. A root ending in `.csv` lists the files itself, with their
    labels, optionally restricted to one `split`. Files a manifest lists that
    do not exist (and dangling links) are skipped: each is appended to
    `missing` when given, and every root with some logs a one-line warning.
    """
    csv_labels = read_label_csv(labels) if labels not in ("folder", "none") else None
    seen_dirs: set[tuple[int, int]] = set()
    seen_files: set[str] = set()
    for root in roots:
        root = os.path.abspath(root)
        gone: list[str] = []
        listed: dict[str, str | None] | None = None
        if root.lower().endswith(".csv"):
            listed = read_label_csv(root, split)
            paths: Iterable[str] = sorted(listed)
        elif os.path.isdir(root):
            paths = _walk(root, seen_dirs)
        elif os.path.exists(root):
            paths = [root] if is_image_name(root) else []
        else:
            raise CbirError(f"no such file or folder: {root}")
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
            log.warning(
                "%d files %s %s do not exist and were skipped (first: %s)",
                len(gone),
                where,
                root,
                gone[0],
            )
            if missing is not None:
                missing.extend(gone)
