"""`cbir duplicates` and `pipeline.duplicates` on a small generated collection (fast tier,
fake model from tests/fakes.py).

The fake model sees an 8x8 thumbnail, so the images here are 8x8 blocks of random
colours: two of them score below 0.7, a resized or re-encoded copy above 0.99, and
the same picture 30 levels brighter about 0.95. The tests pass --near 0.98 and
--similar 0.9 (the defaults are measured on the real model, docs/benchmarks.md):
same bytes, near-identical and similar shots are then told apart as a person would.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import fakes
import pipeline
from fakes import cli, ok, one_line_error, opts
from pipeline import api
from pipeline.api.dedup_export import CSV_COLUMNS
from pipeline.retrieval import whitening, whitening_fit
from pipeline.store import collection

THRESHOLDS = ["--near", "0.98", "--similar", "0.9"]
DAY = 86400
T0 = 1_700_000_000  # the files' times: fixed, so dates and ages are what the tests say


@pytest.fixture(autouse=True)
def fake_model(monkeypatch):
    monkeypatch.setattr(api.models, "cached_embedder", fakes.cached)


def blocks(seed: int) -> np.ndarray:
    """A 96x96 picture of 8x8 random colour blocks."""
    cells = np.random.default_rng(seed).integers(0, 256, (8, 8, 3))
    return np.kron(cells, np.ones((12, 12, 1))).astype(np.uint8)


def make_collection(folder: Path) -> dict[str, Path]:
    """b + a byte copy (older); c + a smaller re-encoded JPEG + a half-size BMP (more bytes); d + d 30
    levels brighter; e, f, g alone. Returns name -> path."""
    folder.mkdir(parents=True)
    files: dict[str, Path] = {}

    def save(name: str, pixels: np.ndarray, **kw) -> None:
        files[name] = folder / name
        Image.fromarray(pixels).save(files[name], **kw)

    for name, seed in (("b.png", 1), ("d.png", 3), ("e.png", 4), ("f.png", 5)):
        save(name, blocks(seed))
    save("c.jpg", blocks(2), quality=95)
    save("g.jpg", blocks(6), quality=90)
    files["b_copy.png"] = folder / "b_copy.png"
    shutil.copy(files["b.png"], files["b_copy.png"])
    save("c_q40.jpg", blocks(2), quality=40)
    save("c_small.bmp", np.asarray(Image.fromarray(blocks(2)).resize((48, 48))))
    save("d_bright.png", np.clip(blocks(3).astype(int) + 30, 0, 255).astype(np.uint8))
    for i, path in enumerate(sorted(files.values())):
        os.utime(path, (T0 + i * DAY, T0 + i * DAY))
    old = T0 - 30 * DAY  # the copy is the older file: the keeper of two same-size files
    os.utime(files["b_copy.png"], (old, old))
    return files


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    """The collection indexed once, with an IVF, an HNSW and a whitened index; tests read it
    (a test that damages it works on a copy)."""
    root = tmp_path_factory.mktemp("dups")
    files = make_collection(root / "imgs")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(api.models, "cached_embedder", fakes.cached)
        ok(cli("index", root / "imgs", *opts(root)), "index")
        ok(cli("build-index", "ivf", "--factory", "IVF2,Flat", *opts(root)), "ivf")
        ok(cli("build-index", "hnsw", "--factory", "HNSW8", *opts(root)), "hnsw")
        coll = collection.reading(root / "c.db", root / "idx")
        try:
            pca = whitening_fit.learn(coll.rows(), coll.indexed_ids(), 4, 0.5)
        finally:
            coll.close()
        whitening.write_transform(pca, str(root / "w.pca"))
        ok(cli("build-index", "white", "--whitening", root / "w.pca", *opts(root)), "white")
    return {"root": root, "files": files}


def dup(world, *args) -> str:
    return ok(cli("duplicates", *THRESHOLDS, *args, *opts(world["root"])), str(args))


def report(world, *args) -> dict:
    return json.loads(dup(world, "--json", *args))


def named(g: dict) -> list[str]:
    return [Path(im["path"]).name for im in g["images"]]


def kinds(rep: dict) -> list[tuple[str, set[str]]]:
    return sorted(((g["kind"], set(named(g))) for g in rep["groups"]), key=str)


# --- the groups -------------------------------------------------------------------------------


def test_groups_by_kind(world):
    rep = report(world)
    assert rep["images"] == 10 and rep["include"] == ["exact", "near"]
    assert rep["thresholds"] == {"near": 0.98, "similar": 0.9} and rep["index"] == "exact"
    assert rep["pair_recall"] is None
    assert kinds(rep) == [
        ("exact", {"b.png", "b_copy.png"}), ("near", {"c.jpg", "c_q40.jpg", "c_small.bmp"}),
    ]  # fmt: skip
    every = report(world, "--include", "exact,near,similar")
    assert kinds(every) == sorted(kinds(rep) + [("similar", {"d.png", "d_bright.png"})], key=str)
    assert [g["group"] for g in every["groups"]] == [1, 2, 3]
    for g in every["groups"]:  # the centre first, at 1; the others at their cosine to it
        assert g["centre"] == g["images"][0]["id"] and g["images"][0]["score"] == 1.0
        floor = {"exact": 1.0, "near": 0.98, "similar": 0.9}[g["kind"]]
        assert all(floor <= im["score"] <= 1.0 for im in g["images"])
    assert kinds(report(world, "--include", "exact")) == [("exact", {"b.png", "b_copy.png"})]
    assert kinds(report(world, "--include", "near")) == [
        ("near", {"c.jpg", "c_q40.jpg", "c_small.bmp"})
    ]
    # A lower near threshold takes the brighter copy in as near-identical.
    low = report(world, "--near", "0.9")
    assert ("near", {"d.png", "d_bright.png"}) in kinds(low)


def test_table_shows_what_json_says(world):
    every = ["--include", "exact,near,similar"]
    rep = report(world, *every)
    lines = dup(world, *every).splitlines()
    expected = []
    name = {"exact": "same bytes", "near": "near-identical", "similar": "similar shots"}
    for g in rep["groups"]:
        expected.append(f"group {g['group']}: {name[g['kind']]}, {len(g['images'])} images")
        for im in g["images"]:
            expected.append((im["keeper"], f"{im['score']:.4f}", im["path"]))
    assert len(lines) == len(expected) + 1
    for line, want in zip(lines, expected, strict=False):
        if isinstance(want, str):
            assert line == want
        else:
            keeper, score, path = want
            assert line.startswith("  keep  " if keeper else "        ") and score in line
            assert line.endswith(path) and f"{96 if 'small' not in path else 48}x" in line
    extra = sum(len(g["images"]) - 1 for g in rep["groups"])
    said = ", ".join(f"1 {name[g['kind']]}" for g in rep["groups"])  # one group of each kind
    assert lines[-1].startswith(
        f"3 groups ({said}) among 10 images; {extra} images besides the keepers"
    )


def test_csv_rows_are_the_json_images(world):
    every = ["--include", "exact,near,similar"]
    rep = report(world, *every)
    rows = list(csv.DictReader(io.StringIO(dup(world, "--csv", *every))))
    assert tuple(rows[0].keys()) == CSV_COLUMNS
    want = [(g, im) for g in rep["groups"] for im in g["images"]]
    assert len(rows) == len(want)
    for row, (g, im) in zip(rows, want, strict=True):
        assert row["group"] == str(g["group"]) and row["kind"] == g["kind"]
        assert row["keeper"] == str(int(im["keeper"])) and row["id"] == str(im["id"])
        assert float(row["score"]) == pytest.approx(im["score"], abs=1e-6)
        assert (row["width"], row["height"], row["size"]) == tuple(
            str(im[k]) for k in ("width", "height", "size")
        )
        assert row["date"] == im["date"] and row["path"] == im["path"]


def test_keeper_by_resolution_then_size_then_age(world):
    rep = report(world)
    by_kind = {g["kind"]: g for g in rep["groups"]}
    near = {Path(im["path"]).name: im for im in by_kind["near"]["images"]}
    # c_small is the largest file, but half the resolution; c_q40 has c's resolution, fewer bytes.
    assert near["c_small.bmp"]["size"] > near["c.jpg"]["size"] > near["c_q40.jpg"]["size"]
    assert (near["c_small.bmp"]["width"], near["c.jpg"]["width"]) == (48, 96)
    assert by_kind["near"]["keeper"] == near["c.jpg"]["id"]
    assert [n for n, im in near.items() if im["keeper"]] == ["c.jpg"]
    # Same resolution and size (same bytes): the older file, though it has the higher id.
    exact = {Path(im["path"]).name: im for im in by_kind["exact"]["images"]}
    assert exact["b_copy.png"]["id"] > exact["b.png"]["id"]
    assert exact["b_copy.png"]["mtime"] < exact["b.png"]["mtime"]
    assert by_kind["exact"]["keeper"] == exact["b_copy.png"]["id"]
    assert exact["b_copy.png"]["date"] == "2023-10-15T22:13:20+00:00"  # T0 - 30 days


def test_python_api_gives_the_cli_groups(world):
    root = world["root"]
    for extra in ([], ["--include", "exact,near,similar"]):
        want = report(world, *extra)
        include = extra[1] if extra else ("exact", "near")
        got = pipeline.duplicates(
            catalog=str(root / "c.db"), index_dir=str(root / "idx"),
            include=include, near=0.98, similar=0.9,
        )  # fmt: skip
        assert json.loads(json.dumps(got)) == want["groups"]


# --- approximate indexes ------------------------------------------------------------------------


@pytest.mark.parametrize("index", ["ivf", "hnsw"])
def test_an_index_that_range_searches(world, index):
    rep = report(world, "--index", index)
    assert rep["index"] == index and 0.0 <= rep["pair_recall"] <= 1.0
    exact = report(world)
    got = {frozenset(im["id"] for im in g["images"]) for g in rep["groups"]}
    # Missed pairs can only leave images out of a group, never add a stranger.
    every = {i for g in exact["groups"] for i in (im["id"] for im in g["images"])}
    assert all(g <= every for g in got)
    if rep["pair_recall"] == 1.0:
        assert rep["groups"] == exact["groups"]
    assert f"pair recall of index {index} " in dup(world, "--index", index).splitlines()[-1]


# --- refusals ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args,words",
    [
        (["--near", "0"], "--near"),
        (["--near", "1.5"], "--near"),
        (["--near", "nan"], "--near"),
        (["--near", "-1"], "--near"),
        (["--near", "x"], "--near"),
        (["--similar", "0"], "--similar"),
        (["--similar", "inf"], "--similar"),
        (["--include", "bogus"], "--include"),
        (["--include", "exact,bogus"], "--include"),
        (["--include", ""], "--include"),
        (["--include", "near,similar", "--near", "0.9", "--similar", "0.95"], "must not be above"),
        (["--json", "--csv"], "--json or --csv"),
        (["--index", "missing"], "no index named 'missing'"),
        (["--index", "white"], "cannot range-search"),
    ],
)
def test_bad_values_are_one_line(world, args, words):
    r = cli("duplicates", *args, *opts(world["root"]))
    line = one_line_error(r, 2)
    assert words in line and r.stdout == ""


def test_no_catalog_is_one_line(tmp_path):
    assert "no catalog" in one_line_error(cli("duplicates", *opts(tmp_path)), 2)


@pytest.mark.parametrize("images", [0, 1])
def test_empty_and_single_image_catalogs(tmp_path, images):
    """No usable image (one file that failed to decode) or one image: no groups, exit 0."""
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "broken.jpg").write_bytes(b"not an image")
    fakes.make_images(tmp_path / "imgs", images)
    ok(cli("index", tmp_path / "imgs", *opts(tmp_path)), "index")
    for include in ("exact", "exact,near", "exact,near,similar", "similar"):
        args = ["duplicates", "--include", include, *opts(tmp_path)]
        rep = json.loads(ok(cli(*args, "--json"), include))
        assert rep["images"] == images and rep["groups"] == [] and rep["pairs"] == 0
        assert ok(cli(*args)).strip() == (
            f"0 groups among {images} images; 0 images besides the keepers (0 B)"
        )
        assert ok(cli(*args, "--csv")).strip() == ",".join(CSV_COLUMNS)


# --- a damaged vector row ---------------------------------------------------------------------


def test_a_damaged_vector_row_is_left_out_with_one_notice(world, tmp_path):
    """As in a search: exit 0, one line naming `verify --repair`, and the answer of the same
    collection without that image (a copy repaired by `verify --repair`); every group
    without it as it was."""
    root = tmp_path / "copy"
    shutil.copytree(world["root"], root)
    args = ["duplicates", *THRESHOLDS, "--include", "exact,near,similar", "--json", *opts(root)]
    before = json.loads(ok(cli(*args)))
    small = next(
        im["id"] for g in before["groups"] for im in g["images"] if "c_small" in im["path"]
    )
    vectors = root / "c.vectors"
    data = bytearray(vectors.read_bytes())
    data[small * 2048 * 4 + 4 * 100 + 3] ^= 0x40  # an exponent bit of one float
    vectors.write_bytes(bytes(data))
    r = cli(*args)
    assert r.exit_code == 0, r.output
    notice = r.stderr.strip().splitlines()
    assert len(notice) == 1 and "verify --repair" in notice[0] and "Traceback" not in r.stderr
    got = json.loads(r.stdout)
    assert got["images"] == before["images"] - 1
    assert small not in {im["id"] for g in got["groups"] for im in g["images"]}
    unnumbered = [{k: v for k, v in g.items() if k != "group"} for g in got["groups"]]
    for g in before["groups"]:
        if small not in {im["id"] for im in g["images"]}:
            assert {k: v for k, v in g.items() if k != "group"} in unnumbered
    near = [g for g in got["groups"] if g["kind"] == "near"]
    assert [named(g) for g in near] == [["c.jpg", "c_q40.jpg"]]
    # The reference: the same command after `verify --repair` dropped the damaged row.
    repaired = cli("verify", "--repair", *opts(root))
    assert "dropped" in repaired.output, repaired.output
    assert json.loads(ok(cli(*args))) == got


def test_every_row_damaged_with_an_ivf_index(tmp_path):
    """No usable row left: no groups and one notice, with the exact search or an index."""
    fakes.make_images(tmp_path / "imgs", 3)
    ok(cli("index", tmp_path / "imgs", *opts(tmp_path)), "index")
    ok(cli("build-index", "ivf", "--factory", "IVF1,Flat", *opts(tmp_path)), "ivf")
    vectors = tmp_path / "c.vectors"
    data = bytearray(vectors.read_bytes())
    for row in range(3):
        data[row * 2048 * 4 + 403] ^= 0x40
    vectors.write_bytes(bytes(data))
    for index in ("exact", "ivf"):
        r = cli("duplicates", "--index", index, "--json", *opts(tmp_path))
        assert r.exit_code == 0, r.output
        assert len(r.stderr.strip().splitlines()) == 1 and "verify --repair" in r.stderr
        rep = json.loads(r.stdout)
        assert (rep["images"], rep["groups"], rep["pair_recall"]) == (0, [], None)


def test_a_missing_file_is_never_the_keeper(world):
    """A file gone since indexing is shown `(missing)` and the next best copy is kept."""
    path = world["files"]["c.jpg"]
    aside = path.with_name("aside.tmp")
    path.rename(aside)
    try:
        rep = report(world, "--include", "near")
        table = dup(world, "--include", "near")
    finally:
        aside.rename(path)
    (g,) = rep["groups"]
    images = {Path(im["path"]).name: im for im in g["images"]}
    assert images["c.jpg"]["exists"] is False and not images["c.jpg"]["keeper"]
    assert g["keeper"] == images["c_q40.jpg"]["id"]  # c's resolution, though fewer bytes
    assert any(line.endswith(f"{path}  (missing)") for line in table.splitlines())
