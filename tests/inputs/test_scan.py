"""Scanning: image files only, symlink loops, labels from folders, CSVs and manifests."""

from __future__ import annotations

import os

import pytest

from pipeline.errors import CbirError
from pipeline.inputs.scan import scan


def touch(path, data=b"x"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_only_image_extensions_and_folder_labels(tmp_path):
    touch(tmp_path / "cats" / "a.JPG")
    touch(tmp_path / "cats" / "b.png")
    touch(tmp_path / "cats" / "notes.txt")
    touch(tmp_path / "dogs" / "c.webp")
    touch(tmp_path / ".hidden" / "d.jpg")
    found = {os.path.basename(f.path): f.label for f in scan([tmp_path])}
    assert found == {"a.JPG": "cats", "b.png": "cats", "c.webp": "dogs"}


def test_symlink_loop_does_not_hang(tmp_path):
    touch(tmp_path / "a" / "x.jpg")
    os.symlink(tmp_path, tmp_path / "a" / "loop")  # a -> root -> a -> ...
    os.symlink(tmp_path / "a", tmp_path / "a" / "self")
    found = [f.path for f in scan([tmp_path])]
    assert found == [str(tmp_path / "a" / "x.jpg")]


def test_labels_none_and_csv(tmp_path):
    touch(tmp_path / "imgs" / "a.jpg")
    touch(tmp_path / "imgs" / "b.jpg")
    assert {f.label for f in scan([tmp_path / "imgs"], labels="none")} == {None}
    csv = tmp_path / "labels.csv"
    csv.write_text("path,label\nimgs/a.jpg,apple\n")
    labels = {os.path.basename(f.path): f.label for f in scan([tmp_path / "imgs"], labels=str(csv))}
    assert labels == {"a.jpg": "apple", "b.jpg": None}


def test_manifest_root_with_split(tmp_path):
    touch(tmp_path / "k" / "db.jpg")
    touch(tmp_path / "k" / "q.jpg")
    man = tmp_path / "manifest.csv"
    man.write_text(
        "path,label,split\nk/db.jpg,kite,database\nk/q.jpg,kite,query\nk/missing.jpg,kite,database\n"
    )
    found = [(os.path.basename(f.path), f.label) for f in scan([man], split="database")]
    assert found == [("db.jpg", "kite")]


def test_missing_root_is_a_clear_error(tmp_path):
    with pytest.raises(CbirError, match="no such file or folder"):
        list(scan([tmp_path / "nope"]))


def test_fifo_and_dangling_link_are_skipped(tmp_path):
    os.mkfifo(tmp_path / "pipe.jpg")
    os.symlink(tmp_path / "nowhere.jpg", tmp_path / "dangling.jpg")
    touch(tmp_path / "real.jpg")
    assert [os.path.basename(f.path) for f in scan([tmp_path])] == ["real.jpg"]
