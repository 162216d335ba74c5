"""The Ray engine carries each image's EXIF date back to the writer, as the local engine
does (`Embedded.taken_at` -> the row's `taken_at`). Fast tier: the actor without a cluster."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("ray")

import fakes  # noqa: E402
from pipeline.ingest import engine_ray, jobs  # noqa: E402
from pipeline.inputs.scan import ScannedFile  # noqa: E402


def test_the_actor_returns_exif_dates(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("CBIR_THREADS", "")
    monkeypatch.setenv("TF_NUM_INTRAOP_THREADS", "")
    dated, plain = tmp_path / "dated.jpg", tmp_path / "plain.jpg"
    exif = Image.Exif()
    exif.get_ifd(0x8769)[0x9003] = "2020:02:29 12:00:00"
    Image.new("RGB", (40, 30), "red").save(dated, exif=exif.tobytes())
    Image.new("RGB", (40, 30), "blue").save(plain)
    todo = [ScannedFile(str(dated), 1, 5.0, None), ScannedFile(str(plain), 1, 7.0, None)]
    actor = engine_ray.EmbedActor(lambda: fakes.FakeEmbedder(8), 2048, 10**8, 1)
    block = actor({"i": np.arange(2), "path": np.array([str(p).encode() for p in (dated, plain)],
                                                       dtype=object)})  # fmt: skip
    out = engine_ray._results(todo, block)
    when = datetime(2020, 2, 29, 12).timestamp()
    assert out[0][1].taken_at == when and out[1][1].taken_at is None
    rows = [jobs._row(f, i, 1, result, None, None) for i, (f, result) in enumerate(out)]
    assert (rows[0]["taken_at"], rows[0]["taken_from"]) == (when, "exif")
    assert (rows[1]["taken_at"], rows[1]["taken_from"]) == (7.0, "mtime")
    # A block from an actor of an older cbir has no dates: the mtime stands.
    del block["taken_at"]
    assert all(r.taken_at is None for _, r in engine_ray._results(todo, block))
