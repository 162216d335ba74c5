"""Issue 17, items 6 and 7: thin images bypassed the pixel limits (the cost counted the file's
pixels, not those after the upscale to the model's input); FIFOs, devices and huge files
were read without limit. Fast: the fake model, in-process (the hostile cases that need a
memory cap are in test_resource_limits.py)."""

from __future__ import annotations

import base64
import io
import os
import re
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import fakes
from pipeline import api, files
from pipeline.embed import openvino_convert
from pipeline.embed import runtime_keras as embed_keras
from pipeline.errors import CbirError
from pipeline.inputs.decode import MAX_ASPECT_RATIO, DecodeError, decode_bytes, decode_file
from pipeline.retrieval import whitening
from pipeline.web.slots import decode_cost


@pytest.fixture(autouse=True)
def fake_model(monkeypatch):
    monkeypatch.setattr(api.models, "cached_embedder", fakes.cached)


@pytest.fixture(scope="module")
def coll(tmp_path_factory) -> Path:
    """A small indexed collection: images/, c.db, idx/."""
    d = tmp_path_factory.mktemp("coll")
    fakes.make_images(d / "images", 6)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(api.models, "cached_embedder", fakes.cached)
        fakes.ok(fakes.cli("index", d / "images", *fakes.opts(d)))
    return d


def png(path: Path, width: int, height: int) -> Path:
    rng = np.random.default_rng(width * 7 + height)
    Image.fromarray(rng.integers(0, 256, (height, width, 3), np.uint8)).save(path)
    return path


def png_bytes(width: int, height: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (30, 140, 220)).save(out, "PNG")
    return out.getvalue()


# ---- item 6: the pixels that will exist, and the aspect ratio ------------------------------


@pytest.mark.parametrize("size", [(1, 600), (600, 1), (8, 500)])
def test_a_thin_query_is_refused_in_one_line(coll, tmp_path, size):
    # Before: upscaled to 224 x 134,400 (1x600) and searched, exit 0.
    line = fakes.one_line_error(
        fakes.cli("search", png(tmp_path / "q.png", *size), *fakes.opts(coll)), 2
    )
    assert f"{MAX_ASPECT_RATIO}:1" in line and "q.png" in line


def test_pixels_after_the_upscale_count_against_max_pixels(coll, tmp_path):
    # 20x400 is 8,000 pixels in the file, 224x4480 = 1,003,520 once resized for the model.
    config = tmp_path / "c.toml"
    config.write_text("max_pixels = 1_000_000\n")
    small = ["--config", config, *fakes.opts(coll)]
    line = fakes.one_line_error(fakes.cli("search", png(tmp_path / "thin.png", 20, 400), *small), 2)
    assert "224x4480 = 1,003,520 pixels" in line and "1,000,000" in line
    # A larger file that is resized down stays within the same limit.
    fakes.ok(fakes.cli("search", png(tmp_path / "big.png", 900, 1000), *small))


def test_panoramas_index_and_strips_fail_with_their_reason(tmp_path):
    folder = tmp_path / "shots"
    folder.mkdir()
    png(folder / "pano10.png", 400, 40)  # 10:1, a phone panorama
    png(folder / "pano50.png", 1500, 30)  # 50:1, the limit itself
    png(folder / "strip.png", 1, 600)
    r = fakes.cli("index", folder, *fakes.opts(tmp_path))
    out = fakes.ok(r)
    assert "indexed 2 " in out and "failed 1" in out, out
    assert re.search(
        rf"strip\.png: image is 1x600, thinner than the limit of {MAX_ASPECT_RATIO}:1", out
    )


def test_decoding_refuses_before_allocating_the_upscale():
    # Before: decode_bytes of a 1x8000 PNG allocated 224 x 1,792,000 pixels (1.6 GB).
    for data in (png_bytes(1, 8000), png_bytes(8000, 1)):
        with pytest.raises(DecodeError, match="thinner than the limit"):
            decode_bytes(data, 89_478_485)
    assert decode_bytes(png_bytes(2240, 224), 89_478_485).pixels.shape == (224, 224, 3)


def test_the_web_budget_counts_the_upscaled_pixels():
    # Before: 8,000 (the file's pixels), so four such uploads ran at once in 6.5 GB.
    assert decode_cost(png_bytes(1, 8000)) == 224 * 1_792_000
    assert decode_cost(png_bytes(20, 400), size=448) == 448 * 8960
    assert decode_cost(png_bytes(3000, 2000)) == 3000 * 2000  # resized down: the file's


@pytest.fixture
def web(coll, tmp_path):
    pytest.importorskip("flask")
    from pipeline.web.server import open_app

    options = {"catalog": str(coll / "c.db"), "index_dir": str(coll / "idx")}
    return open_app(api.settings_for(**options), thumbs_dir=tmp_path / "thumbs").test_client()


def test_thin_uploads_and_carried_pngs_are_400(web):
    thin = png_bytes(1, 8000)
    r = web.post("/api/search", data={"image": (io.BytesIO(thin), "thin.png")})
    assert r.status_code == 400 and "thinner than the limit" in r.get_json()["error"]
    r = web.post("/search", data={"image": (io.BytesIO(thin), "thin.png")})
    assert r.status_code == 400
    carried = {"query_png": base64.b64encode(thin).decode(), "query_name": "thin.png"}
    r = web.post("/search", data=carried)
    assert r.status_code == 400 and "not one a results page sends" in r.get_data(as_text=True)
    # What a results page really carries still searches, round after round.
    page = web.post("/search", data={"image": (io.BytesIO(png_bytes(300, 200)), "q.png")})
    assert page.status_code == 200
    sent = re.search(r'name="query_png" value="([^"]+)"', page.get_data(as_text=True)).group(1)
    again = web.post("/search", data={"query_png": sent, "query_name": "q.png"})
    assert again.status_code == 200


# ---- item 7: regular files only, with a size limit per kind --------------------------------


@pytest.fixture
def fifo(tmp_path):
    """A FIFO; if something waits on it (the old behaviour), a writer comes and goes every
    3 s, so the test fails instead of hanging."""
    path = tmp_path / "pipe.csv"
    os.mkfifo(path)
    done = threading.Event()

    def unblock() -> None:
        while not done.wait(3):
            fd = os.open(path, os.O_RDWR)  # never blocks: a writer appears, then leaves (EOF)
            time.sleep(0.2)
            os.close(fd)

    threading.Thread(target=unblock, daemon=True).start()
    yield path
    done.set()


def commands(coll: Path, bad: Path) -> dict[str, list]:
    """The commands that read a user-named file, with `bad` as that file."""
    o = fakes.opts(coll)
    img = next((coll / "images").rglob("*.jpg"))
    return {
        "config": ["search", img, "--config", bad, *o],
        "labels": ["index", coll / "images", "--labels", bad, *o],
        "manifest": ["index", bad, *o],
        "groundtruth": ["evaluate", "--groundtruth", bad, *o],
        "queries": ["evaluate", bad, *o],
        "query image": ["search", bad, *o],
    }


KINDS = ["config", "labels", "manifest", "groundtruth", "queries", "query image"]


@pytest.mark.parametrize("kind", KINDS)
def test_a_fifo_is_refused_without_waiting(coll, fifo, kind):
    start = time.monotonic()
    line = fakes.one_line_error(fakes.cli(*commands(coll, fifo)[kind]), 2)
    assert "not a regular file (a FIFO" in line and time.monotonic() - start < 3, line


@pytest.mark.parametrize("kind", KINDS)
def test_a_device_is_refused(coll, tmp_path, kind):
    # /dev/null reads as empty; /dev/zero (test_resource_limits) never ends.
    dev = tmp_path / "dev.csv"
    os.symlink("/dev/null", dev)
    line = fakes.one_line_error(fakes.cli(*commands(coll, dev)[kind]), 2)
    assert "not a regular file (a character device)" in line, line


def test_a_config_over_its_limit_is_refused(coll, tmp_path):
    big = tmp_path / "big.toml"
    big.write_text("k = 5\n" + "# padding\n" * (files.CONFIG_MAX // 10 + 1))
    line = fakes.one_line_error(fakes.cli(*commands(coll, big)["config"]), 2)
    assert f"over the limit of {files.CONFIG_MAX:,} bytes for config files" in line


def test_a_deeply_nested_config_is_one_line(coll, tmp_path):
    deep = tmp_path / "deep.toml"
    deep.write_text("k = " + "[" * 5000 + "]" * 5000 + "\n")
    line = fakes.one_line_error(fakes.cli(*commands(coll, deep)["config"]), 2)
    assert "nests arrays or tables too deeply" in line


@pytest.mark.parametrize("kind", ["labels", "manifest", "groundtruth", "queries"])
def test_a_csv_line_over_its_limit_is_refused(coll, tmp_path, kind):
    long = tmp_path / "long.csv"
    header = "query,relevant" if kind == "groundtruth" else "path,label"
    long.write_text(f"{header}\n{'x' * (files.CSV_LINE_MAX + 1)},y\n")
    line = fakes.one_line_error(fakes.cli(*commands(coll, long)[kind]), 2)
    assert f"a line is longer than {files.CSV_LINE_MAX:,} characters" in line, line


def test_an_image_file_over_its_limit_is_refused(tmp_path):
    # A valid PNG followed by a hole: Pillow ignores the tail, but the hash read all of it.
    path = tmp_path / "padded.png"
    path.write_bytes(png_bytes(300, 300))
    with path.open("r+b") as f:
        f.truncate(files.image_max_bytes(100_000) + 1)
    with pytest.raises(DecodeError, match="over the limit of .* bytes for image files"):
        decode_file(str(path), 100_000)
    assert decode_file(str(path), 200_000).pixels.shape == (224, 224, 3)  # a larger limit


def test_whitening_and_weights_files_must_be_regular(fifo):
    with pytest.raises(CbirError, match=r"whitening file .*: not a regular file \(a FIFO"):
        whitening.read_transform(str(fifo), 2048)
    with pytest.raises(CbirError, match=r"weights file .*: not a regular file \(a FIFO"):
        openvino_convert.weights_id(str(fifo))
    with pytest.raises(CbirError, match="weights file not found"):
        openvino_convert.weights_id(str(fifo) + ".missing")
    with pytest.raises(CbirError, match=r"weights file .*: not a regular file \(a FIFO"):
        embed_keras._build_resnet50(str(fifo))  # refused before TensorFlow is imported
