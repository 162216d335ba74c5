"""The model is loaded only from verified files, and an int8 catalog outlives its images.

Fast tier: a tiny OpenVINO network stands in for the converted ResNet50 (no
TensorFlow; `openvino_convert._convert` is replaced), so the real loader, model
cache, kept models and CLI run. Every file the model is loaded from, damaged
each way, gives the undamaged vectors (rebuilt) or one line; the int8 model
of a catalog survives its calibration images being deleted, moved and edited
with the model cache cleared. Slow tier: the same with the real int8 ResNet50.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

import fakes
from conftest import COREL, corel_rows
from pipeline import api
from pipeline.errors import CbirError

openvino = pytest.importorskip("openvino")
pytest.importorskip("nncf")

from pipeline.embed import openvino_convert  # noqa: E402
from pipeline.embed import runtime_openvino as embed_openvino  # noqa: E402
from pipeline.embed.calibration import check_images  # noqa: E402

# -- damage, each keeping the file's name (and, but for truncation, its size)


def truncate(path: Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


def zero_range(path: Path) -> None:
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.seek(size // 3)
        f.write(bytes(min(4096, size - size // 3)))


def random_blocks(path: Path) -> None:
    """64 KiB of random bytes at every MiB (the whole file if it is smaller)."""
    size, rng = path.stat().st_size, np.random.default_rng(7)
    with open(path, "r+b") as f:
        for at in range(0, size, 1 << 20):
            f.seek(at)
            f.write(rng.integers(0, 256, min(1 << 16, size - at), dtype=np.uint8).tobytes())


def flip_bit(path: Path) -> None:
    with open(path, "r+b") as f:
        f.seek(path.stat().st_size // 2)
        byte = f.read(1)[0]
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte ^ 0x10]))


DAMAGES = {"truncate": truncate, "zero": zero_range, "random": random_blocks, "bit": flip_bit}


# -- a tiny stand-in for the converted ResNet50


TINY_FINGERPRINT = {
    "architecture": "tiny-projection (tests)",
    "pooling": "avg",
    "weights_sha256": "1" * 64,
    "preprocessing": "tests",
    "dimension": 2048,
    "normalization": "l2",
}


@pytest.fixture
def tiny(monkeypatch) -> list[str]:
    """Conversions replaced by a 1.5 MB OpenVINO network: uint8 (n, h, w, 3) -> 2048 feature
    maps (an 8x8 convolution every 32 pixels, averaged for the classic descriptor), its
    weights seeded by the calibration (int8), so another calibration gives other
    vectors. Returns the log of conversions run."""
    import openvino.opset13 as ops

    runs: list[str] = []

    def convert(folder, weights, pooling, precision, calibration, any_size=False):
        seed = 0
        if precision == "int8":
            check_images(calibration)  # as the real conversion does, first
            seed = int(calibration.id[:8], 16)
        runs.append(precision)
        side = -1 if any_size else 224
        x = ops.parameter([-1, side, side, 3], openvino.Type.u8)
        nchw = ops.transpose(ops.convert(x, "f32"), ops.constant(np.array([0, 3, 1, 2])))
        w = np.random.default_rng(seed).standard_normal((2048, 3, 8, 8)).astype(np.float32)
        conv = ops.convolution(nchw, ops.constant(w), [32, 32], [0, 0], [0, 0], [1, 1])
        maps = ops.transpose(ops.abs(conv), ops.constant(np.array([0, 2, 3, 1])))
        y = maps if any_size else ops.reduce_mean(maps, ops.constant(np.array([1, 2])), False)
        model = openvino.Model([y], [x])
        openvino.save_model(
            model, str(folder / openvino_convert.MODEL_FILE), compress_to_fp16=False
        )
        return {"fingerprint": TINY_FINGERPRINT}

    monkeypatch.setattr(openvino_convert, "_convert", convert)
    api.cached_embedder.cache_clear()
    yield runs
    api.cached_embedder.cache_clear()


def pixels(n: int = 4) -> np.ndarray:
    return np.random.default_rng(3).integers(0, 256, (n, 224, 224, 3), dtype=np.uint8)


def same_or_one_line(run, want, where: str) -> str:
    """`run()` gives `want` (fingerprint, vectors) exactly, or raises a one-line CbirError."""
    try:
        fingerprint, vecs = run()
    except CbirError as e:
        assert "\n" not in str(e), where
        return "refused"
    assert fingerprint == want[0], where
    np.testing.assert_array_equal(vecs, want[1], err_msg=where)
    return "same"


def damage_each(root: Path, run, want, files: list[Path], prepare=None) -> dict[str, int]:
    """Damage every file in `files` (under `root`) every way, on a fresh copy each time;
    each run must give `want` or one line. Returns how many cells gave which."""
    pristine = root.with_name(root.name + ".pristine")
    shutil.copytree(root, pristine)
    outcomes = {"same": 0, "refused": 0}
    for rel in files:
        for name, damage in DAMAGES.items():
            shutil.rmtree(root)
            shutil.copytree(pristine, root)
            if prepare:
                prepare()
            damage(root / rel)
            outcomes[same_or_one_line(run, want, f"{rel} {name}")] += 1
    shutil.rmtree(root)
    pristine.rename(root)  # left as it was found
    return outcomes


# -- every file a model is loaded from is verified (issue 17, item 1)


def test_a_damaged_cache_file_is_rebuilt_never_trusted(tmp_path, tiny):
    """Every file under the cache folder (compiled blobs of old, entries, manifests), damaged
    four ways: the same vectors and fingerprint as undamaged (rebuilt), or one line."""
    root = tmp_path / "cache"
    batch = pixels()

    def run():
        e = embed_openvino.load("imagenet", 4, "avg", "fp32", cache_dir=str(root))
        return e.fingerprint, e.embed(batch)

    want = run()
    run()  # a second load, from the cache: whatever a cache hit writes is there now
    files = sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file() and p.stat().st_size)
    assert {"model.xml", "model.bin", "manifest.json"} <= {p.name for p in files}
    outcomes = damage_each(root, run, want, files)
    assert outcomes["same"] == 4 * len(files)  # all rebuilt: nothing here is irreplaceable


def test_a_cache_hit_writes_nothing(tmp_path, tiny):
    """A cache that cannot be written (read-only, without OpenVINO's folder) still serves:
    loading a cached model creates, changes or removes no file in it."""
    root = tmp_path / "cache"
    embed_openvino.load("imagenet", 4, "avg", "fp32", cache_dir=str(root))
    for p in root.iterdir():  # only the entries: what a cache copied or made read-only holds
        if not (p / "manifest.json").is_file():
            shutil.rmtree(p) if p.is_dir() else p.unlink()

    def tree() -> dict[str, tuple[int, int]]:
        return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}

    before = tree()
    embed_openvino.load("imagenet", 4, "avg", "fp32", cache_dir=str(root))
    embed_openvino.load("imagenet", 1, "avg", "fp32", cache_dir=str(root))
    assert tree() == before


@pytest.mark.parametrize("kind", ["regular file", "/dev/null"])
def test_a_cache_that_is_not_a_folder_is_one_line(tmp_path, tiny, monkeypatch, kind):
    images = fakes.make_images(tmp_path / "photos", 3)
    state = tmp_path / "state"
    run = ("--runtime", "openvino", "--precision", "fp32")
    monkeypatch.setenv("CBIR_CACHE", str(tmp_path / "cache"))
    fakes.ok(fakes.cli("index", tmp_path / "photos", *fakes.opts(state), *run))
    api.cached_embedder.cache_clear()
    if kind == "/dev/null":
        monkeypatch.setenv("CBIR_CACHE", os.devnull)
    else:
        (tmp_path / "file").write_text("not a folder")
        monkeypatch.setenv("CBIR_CACHE", str(tmp_path / "file"))
    line = fakes.one_line_error(fakes.cli("search", images[0], *fakes.opts(state)), 2)
    assert "CBIR_CACHE" in line and "not a folder" in line


# -- an int8 catalog does not depend on its image files (issue 17, item 5)


INT8 = ("--runtime", "openvino", "--precision", "int8")


def stored_vector(state: Path, path: Path) -> np.ndarray:
    return fakes.snapshot(state / "c.db")[str(path)][6]


def query_vector(state: Path, image: Path, *options: str) -> np.ndarray:
    """The vector the catalog's model gives `image` now (as `cbir search` would embed it)."""
    from pipeline.inputs.decode import decode_file
    from pipeline.store.collection import reading

    api.cached_embedder.cache_clear()
    s = api.settings_for(catalog=str(state / "c.db"), index_dir=str(state / "idx"))
    for option in options:
        s = s.replace(calibration=option)
    coll = reading(s.catalog, s.index_dir)
    try:
        decode = api.descriptor_for(s, coll).decode  # the catalog's input, as search decodes
        pixels = decode_file(str(image), s.max_pixels, 0, **decode).pixels
        return api.embedder_for(s, coll).embed([pixels])[0]
    finally:
        coll.close()


def results(state: Path, image: Path, but: Path | None = None) -> list[tuple[str, float]]:
    """(path, score) of `cbir search IMAGE` on the catalog, leaving out the file `but`."""
    api.cached_embedder.cache_clear()
    r = fakes.cli("search", image, *fakes.opts(state), "--json", "-k", "8")
    out = json.loads(fakes.ok(r, "search").strip().splitlines()[-1])  # one line per query
    return [(x["path"], x["score"]) for x in out["results"] if x["path"] != str(but)]


def assert_same_answers(before, after, edited: Path, new: Path) -> None:
    """The same (path, score) answers, but for the edited image (embedded again under a new
    id) and the new one; the deleted and moved ones stay catalogued until --prune."""
    before = [r for r in before if r[0] != str(edited)]
    after = [r for r in after if r[0] not in (str(edited), str(new))]
    n = min(len(before), len(after))
    assert n >= 5 and after[:n] == before[:n]


@pytest.fixture
def int8_catalog(tmp_path, tiny, monkeypatch):
    """12 images indexed at int8 (all of them calibration images), a private model cache."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("CBIR_CACHE", str(cache))
    images = fakes.make_images(tmp_path / "photos", 12)
    state = tmp_path / "state"
    fakes.ok(fakes.cli("index", tmp_path / "photos", *fakes.opts(state), *INT8))
    later = fakes.make_images(tmp_path / "later", 1, seed=5)[0]
    return {
        "state": state,
        "cache": cache,
        "images": images,
        "later": later,
        "before": results(state, images[2]),
        "later_vector": query_vector(state, later),
        "runs": tiny,
    }


def test_int8_catalog_outlives_deleted_moved_and_edited_calibration_images(tmp_path, int8_catalog):
    c = int8_catalog
    state, images = c["state"], c["images"]
    assert c["runs"] == ["int8"]
    images[0].unlink()  # deleted
    (tmp_path / "moved").mkdir()
    images[1].rename(tmp_path / "moved" / images[1].name)  # moved
    fakes.make_images(tmp_path / "edit", 1, seed=9)[0].replace(images[3])  # edited
    shutil.rmtree(c["cache"])  # and the model cache cleared
    api.cached_embedder.cache_clear()
    fakes.ok(fakes.cli("index", tmp_path / "photos", c["later"].parent, *fakes.opts(state)))
    np.testing.assert_array_equal(stored_vector(state, c["later"]), c["later_vector"])
    assert_same_answers(c["before"], results(state, images[2]), images[3], c["later"])
    assert c["runs"] == ["int8"]  # never rebuilt: the catalog's kept model served


def test_a_damaged_kept_model_is_rebuilt_from_its_images_or_one_line(tmp_path, int8_catalog):
    """Each file of the kept model damaged each way, the model cache empty: with the
    calibration images there, rebuilt to the same vectors; with one gone, one line."""
    c = int8_catalog
    state, images = c["state"], c["images"]
    kept = state / "c.models"
    files = sorted(p.relative_to(kept) for p in kept.rglob("*") if p.is_file() and p.stat().st_size)
    assert {"model.xml", "model.bin", "manifest.json"} <= {p.name for p in files}
    want = (None, c["later_vector"])

    def run():
        return None, query_vector(state, c["later"])

    def clear_cache():
        shutil.rmtree(c["cache"], ignore_errors=True)

    rebuilt = damage_each(kept, run, want, files, clear_cache)
    assert rebuilt["same"] == 4 * len(files)
    gone = images[5].read_bytes()
    images[5].unlink()
    refused = damage_each(kept, run, want, files, clear_cache)
    assert refused["refused"] == 4 * len(files)
    images[5].write_bytes(gone)


def test_verify_checks_the_kept_model(int8_catalog):
    """`cbir verify` hashes every file of the catalog's kept int8 model: each damage of
    model.bin or the manifest is a problem (exit 1) naming the kept folder."""
    state = int8_catalog["state"]
    fakes.ok(fakes.cli("verify", *fakes.opts(state)))
    kept = state / "c.models"
    for name in ("model.bin", "manifest.json"):
        (target,) = kept.rglob(name)
        original = target.read_bytes()
        for damage in (truncate, zero_range, random_blocks, flip_bit):
            damage(target)
            r = fakes.cli("verify", *fakes.opts(state))
            assert r.exit_code == 1, (name, damage.__name__, r.output)
            assert "int8 model kept in" in r.output and str(kept) in r.output, r.output
            target.write_bytes(original)
    fakes.ok(fakes.cli("verify", *fakes.opts(state)))


def test_an_old_catalog_whose_images_are_gone_says_what_to_do(tmp_path, int8_catalog):
    """A catalog from before kept models (calibration paths only), its images moved and
    the cache cleared: one line naming --calibration; given the folder they moved to,
    the same model again, found by content."""
    c = int8_catalog
    state = c["state"]
    shutil.rmtree(state / "c.models", ignore_errors=True)  # as an older cbir left it
    shutil.rmtree(c["cache"])
    shutil.move(tmp_path / "photos", tmp_path / "elsewhere")
    api.cached_embedder.cache_clear()
    r = fakes.cli("search", c["later"], *fakes.opts(state))
    assert "--calibration" in fakes.one_line_error(r, 2)
    got = query_vector(state, c["later"], str(tmp_path / "elsewhere"))
    np.testing.assert_array_equal(got, c["later_vector"])
    assert c["runs"] == ["int8", "int8"]  # rebuilt once, from the moved images


def test_calibration_folder_calibrates_a_new_model(tmp_path, int8_catalog):
    """--calibration DIR of other images is used (not ignored): another model, whose
    vectors the catalog takes only with --allow-mixed."""
    c = int8_catalog
    state = c["state"]
    other = tmp_path / "other"
    fakes.make_images(other, 6, seed=11)
    v = query_vector(state, c["later"], str(other))
    assert not np.allclose(v, c["later_vector"])
    api.cached_embedder.cache_clear()
    r = fakes.cli("index", c["later"].parent, *fakes.opts(state), "--calibration", other)
    assert "--allow-mixed" in fakes.one_line_error(r, 2)


# -- the real int8 ResNet50 (slow)


@pytest.mark.slow
def test_real_int8_catalog_outlives_its_calibration_images(tmp_path, weights, monkeypatch):
    """20 Corel images indexed at int8; calibration images deleted, moved and edited, the
    cache cleared: a new image is indexed to the vector the first model gave it, and
    searches answer as before. Prints the bytes kept and the load and rebuild times."""
    monkeypatch.setenv("CBIR_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("CBIR_CONFIG", raising=False)  # the conftest pins Keras: this is int8
    photos = tmp_path / "photos"
    photos.mkdir()
    rows = corel_rows("database", 3)
    for r in rows[:20]:
        shutil.copy(COREL / r["path"], photos / Path(r["path"]).name)
    later = tmp_path / "later"
    later.mkdir()
    shutil.copy(COREL / rows[20]["path"], later / "new.jpg")
    state = tmp_path / "state"
    options = (*fakes.opts(state), "--weights", weights)
    started = time.perf_counter()
    fakes.ok(fakes.cli("index", photos, *options, *INT8), "index")
    built = time.perf_counter() - started
    query = sorted(photos.iterdir())[5]
    before = results(state, query)
    want = query_vector(state, later / "new.jpg")
    names = sorted(photos.iterdir())
    names[0].unlink()
    names[1].rename(tmp_path / names[1].name)
    shutil.copy(COREL / rows[25]["path"], names[2])
    shutil.rmtree(tmp_path / "cache")
    api.cached_embedder.cache_clear()
    started = time.perf_counter()
    fakes.ok(fakes.cli("index", photos, later, *fakes.opts(state)), "index again")
    again = time.perf_counter() - started
    np.testing.assert_array_equal(stored_vector(state, later / "new.jpg"), want)
    assert_same_answers(before, results(state, query), names[2], later / "new.jpg")
    kept = sum(p.stat().st_size for p in (state / "c.models").rglob("*") if p.is_file())
    print(f"kept {kept} bytes; first job {built:.1f} s, after the cache was cleared {again:.1f} s")
