"""The CSV files cbir reads, and bad input to `cbir index` (issue 17, proof section), fast tier.

A NUL byte or another control character in a label, manifest, ground-truth or query
CSV is damage, refused in one line naming the file and the line; so is a last row
cut short. Label and manifest rows that name files that do not exist give one
warning line each. And input found bad before work (a CSV, an empty folder, a
mistyped --weights) leaves the catalog as it was, or uncreated.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

import fakes
from pipeline import api

N_IMAGES = 8


@pytest.fixture(autouse=True)
def fake_model(monkeypatch):
    monkeypatch.setattr(api.models, "cached_embedder", fakes.cached)


def images(root: Path) -> list[Path]:
    return fakes.make_images(root / "imgs", N_IMAGES)


def write_rows(path: Path, header: str, rows: list[str], end: str = "\n") -> Path:
    path.write_text("\n".join([header, *rows]) + end)
    return path


def labels_csv(root: Path, imgs: list[Path], name: str = "labels.csv") -> Path:
    """path,label rows for every image, paths relative to the CSV."""
    return write_rows(
        root / name,
        "path,label",
        [f"imgs/{p.parent.name}/{p.name},L-{p.parent.name}" for p in imgs],
    )


def state_files(root: Path) -> list[str]:
    """What the catalog and its index folder left on disk (fakes.opts: c.db*, c.vectors, idx)."""
    return sorted(p.name for p in root.iterdir() if p.name.startswith(("c.", "idx")))


def runs(root: Path) -> int:
    con = sqlite3.connect(root / "c.db")
    try:
        return con.execute("select count(*) from runs").fetchone()[0]
    finally:
        con.close()


def stderr_lines(r) -> list[str]:
    return [line for line in r.stderr.splitlines() if line.strip()]


# --- control characters -----------------------------------------------------------------------


def _damaged_command(kind: str, root: Path, imgs: list[Path]) -> tuple[Path, list]:
    """(the CSV, the command that reads it) for each kind of CSV cbir reads."""
    rel = [f"imgs/{p.parent.name}/{p.name}" for p in imgs]
    if kind == "labels":
        path = write_rows(root / "labels.csv", "path,label", [f"{r},x" for r in rel])
        return path, ["index", root / "imgs", "--labels", path]
    if kind == "manifest":
        path = write_rows(root / "m.csv", "path,label,split", [f"{r},x,database" for r in rel])
        return path, ["index", path]
    if kind == "groundtruth":
        path = write_rows(
            root / "gt.csv", "query,relevant", [f"{imgs[0].name},{p.name}" for p in imgs[1:]]
        )
        return path, ["evaluate", "--groundtruth", path]
    path = write_rows(
        root / "q.csv",
        "path,label",
        [f"{r},{p.parent.name}" for r, p in zip(rel, imgs, strict=True)],
    )
    return path, ["evaluate", path]


@pytest.mark.parametrize("kind", ["labels", "manifest", "groundtruth", "queries"])
def test_a_nul_byte_in_any_csv_is_refused_naming_the_file_and_line(tmp_path, kind):
    """Before: a NUL in a label row silently unlabelled that image (exit 0); in a manifest
    it was "unexpected ValueError: embedded null byte (a bug)"."""
    imgs = images(tmp_path)
    if kind in ("groundtruth", "queries"):  # they read an indexed catalog
        fakes.ok(fakes.cli("index", tmp_path / "imgs", *fakes.opts(tmp_path)))
    path, command = _damaged_command(kind, tmp_path, imgs)
    lines = path.read_bytes().split(b"\n")
    lines[3] = lines[3][:6] + b"\0" * 4 + lines[3][10:]  # zeroed bytes inside line 4's path
    path.write_bytes(b"\n".join(lines))
    line = fakes.one_line_error(fakes.cli(*command, *fakes.opts(tmp_path)), 2)
    assert f"{path.name} line 4 holds a NUL byte" in line, line


def test_a_control_character_is_refused_and_a_tab_is_not(tmp_path):
    """An escape character in a label was stored and printed as is (exit 0)."""
    imgs = images(tmp_path)
    rows = [f"imgs/{p.parent.name}/{p.name},{p.parent.name}" for p in imgs]
    rows[2] = rows[2] + "\x1b[2J"
    bad = write_rows(tmp_path / "labels.csv", "path,label", rows)
    line = fakes.one_line_error(
        fakes.cli("index", tmp_path / "imgs", "--labels", bad, *fakes.opts(tmp_path)), 2
    )
    assert "labels.csv line 4 holds a control character (U+001B)" in line, line
    assert state_files(tmp_path) == []
    rows[2] = rows[2].replace("\x1b[2J", "\tsecond")  # a tab is text
    write_rows(bad, "path,label", rows)
    fakes.ok(fakes.cli("index", tmp_path / "imgs", "--labels", bad, *fakes.opts(tmp_path)))


# --- a last row cut short ---------------------------------------------------------------------


def test_a_label_csv_cut_short_does_not_unlabel_the_collection(tmp_path):
    """Before: half a label CSV was read as a shorter one, and `cbir index` silently set the
    label of every image past the cut to none (exit 0)."""
    imgs = images(tmp_path)
    full = labels_csv(tmp_path, imgs)
    fakes.ok(fakes.cli("index", tmp_path / "imgs", "--labels", full, *fakes.opts(tmp_path)))
    before = fakes.snapshot(tmp_path / "c.db")
    data = full.read_bytes()
    cut = tmp_path / "cut.csv"
    cut.write_bytes(data[: data.index(b"/img", len(data) // 2)])  # inside a row's path
    line = fakes.one_line_error(
        fakes.cli("index", tmp_path / "imgs", "--labels", cut, *fakes.opts(tmp_path)), 2
    )
    assert "cut.csv line" in line and "cut short" in line, line
    fakes.assert_same(fakes.snapshot(tmp_path / "c.db"), before, "after a cut label CSV")
    # A whole last row without a line end (a hand-written file) is fine.
    whole = tmp_path / "whole.csv"
    whole.write_bytes(data.rstrip(b"\n"))
    fakes.ok(fakes.cli("index", tmp_path / "imgs", "--labels", whole, *fakes.opts(tmp_path)))
    fakes.assert_same(fakes.snapshot(tmp_path / "c.db"), before, "a CSV without a last line end")


# --- rows naming files that do not exist --------------------------------------------------------


def test_label_rows_naming_no_file_under_the_folder_give_one_warning(tmp_path):
    """Before: a typo in a label CSV's path left that image unlabelled without a word."""
    imgs = images(tmp_path)
    rows = [f"imgs/{p.parent.name}/{p.name},{p.parent.name}" for p in imgs]
    rows[1] = rows[1].replace(".jpg", ".jpeg")  # a typo: that image gets no label
    rows += ["imgs/red/gone.jpg,red", "elsewhere/other.jpg,red"]  # the last is outside: normal
    path = write_rows(tmp_path / "labels.csv", "path,label", rows)
    r = fakes.cli("index", tmp_path / "imgs", "--labels", path, *fakes.opts(tmp_path))
    fakes.ok(r)
    warnings = stderr_lines(r)
    assert len(warnings) == 1, warnings
    typo = tmp_path / rows[1].split(",")[0]
    assert "2 files listed in" in warnings[0] and "labels.csv" in warnings[0], warnings
    assert f"(first: {typo})" in warnings[0], warnings
    assert "WARNING" in warnings[0] and "other.jpg" not in warnings[0], warnings


# --- nothing written on bad input ---------------------------------------------------------------


def _bad_inputs(root: Path, imgs: list[Path]) -> dict[str, list]:
    rel = [f"imgs/{p.parent.name}/{p.name}" for p in imgs]
    dup = write_rows(root / "dup.csv", "path,label", [f"{rel[0]},a", f"{rel[0]},b"])
    nohead = write_rows(root / "nohead.csv", "file,label", [f"{rel[0]},a"])
    nul = root / "nul.csv"
    nul.write_bytes(b"path,label\n" + rel[0].encode() + b",\0\n")
    (root / "empty").mkdir()
    return {
        "two labels for one file": ["index", root / "imgs", "--labels", dup],
        "no path column": ["index", root / "imgs", "--labels", nohead],
        "a NUL byte": ["index", nul],
        "an empty folder": ["index", root / "empty"],
        "a mistyped --weights": ["index", root / "imgs", "--weights", root / "nope.weights.h5"],
    }


CASES = ["two labels for one file", "no path column", "a NUL byte", "an empty folder",
         "a mistyped --weights"]  # fmt: skip


@pytest.mark.parametrize("case", CASES)
def test_bad_input_creates_no_catalog(tmp_path, case):
    """Before: the catalog was created (empty) before the input was read; an empty folder
    exited 0 with "scanned 0"."""
    command = _bad_inputs(tmp_path, images(tmp_path))[case]
    fakes.one_line_error(fakes.cli(*command, *fakes.opts(tmp_path)), 2)
    assert state_files(tmp_path) == [], state_files(tmp_path)


@pytest.mark.parametrize("case", CASES)
def test_bad_input_leaves_an_existing_catalog_untouched(tmp_path, case):
    """Before: the job opened the catalog, recorded a run and repaired it before reading
    its input; an empty folder was a run that did nothing, exit 0."""
    imgs = images(tmp_path)
    fakes.ok(fakes.cli("index", tmp_path / "imgs", *fakes.opts(tmp_path)))
    before, n_runs = fakes.snapshot(tmp_path / "c.db"), runs(tmp_path)
    command = _bad_inputs(tmp_path, imgs)[case]
    line = fakes.one_line_error(fakes.cli(*command, *fakes.opts(tmp_path)), 2)
    if case == "an empty folder":
        assert f"no images found under {tmp_path / 'empty'}" in line and "--prune" in line, line
    assert runs(tmp_path) == n_runs
    fakes.assert_same(fakes.snapshot(tmp_path / "c.db"), before, case)


def test_an_emptied_folder_is_pruned_only_when_asked(tmp_path):
    """Every image of a folder deleted: `--prune` drops their rows and says how many; without
    it the run is refused (before: exit 0, "scanned 0", nothing said)."""
    imgs = images(tmp_path)
    fakes.ok(fakes.cli("index", tmp_path / "imgs", *fakes.opts(tmp_path)))
    for p in imgs:
        p.unlink()
    before = fakes.snapshot(tmp_path / "c.db")
    line = fakes.one_line_error(fakes.cli("index", tmp_path / "imgs", *fakes.opts(tmp_path)), 2)
    assert "add --prune" in line, line
    fakes.assert_same(fakes.snapshot(tmp_path / "c.db"), before, "refused")
    out = fakes.ok(fakes.cli("index", tmp_path / "imgs", "--prune", *fakes.opts(tmp_path)))
    assert f"pruned {N_IMAGES}" in out, out
    assert fakes.snapshot(tmp_path / "c.db") == {}


def test_prune_with_a_manifest_or_a_file_keeps_rows_of_files_that_exist(tmp_path):
    """--prune removes files gone from disk. Before, with an image or a manifest as the root,
    it dropped every catalogued file in that folder the root did not name (the other
    images beside it, the rows of another split), though they all still existed."""
    imgs = sorted(images(tmp_path))
    fakes.ok(fakes.cli("index", tmp_path / "imgs", *fakes.opts(tmp_path)))
    red = sorted((tmp_path / "imgs" / "red").glob("*.jpg"))
    manifest = tmp_path / "imgs" / "red" / "m.csv"
    write_rows(
        manifest, "path,label,split", [f"{red[0].name},r,database", f"{red[1].name},r,query"]
    )
    red[2].unlink()  # the one file really gone
    out = fakes.ok(
        fakes.cli("index", manifest, "--split", "database", "--prune", *fakes.opts(tmp_path))
    )
    assert out.rstrip().endswith("pruned 1"), out
    out = fakes.ok(fakes.cli("index", red[0], "--prune", *fakes.opts(tmp_path)))
    assert out.rstrip().endswith("pruned 0"), out
    kept = set(fakes.snapshot(tmp_path / "c.db"))
    assert kept == {str(p) for p in imgs if p != red[2]}
