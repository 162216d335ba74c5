"""The Ray engine's actor and its results, without a cluster (fast tier).

The actor decodes and embeds one block; names that are not UTF-8 and damaged
files must survive the trip through Arrow-friendly columns unchanged.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("ray")

import fakes  # noqa: E402
from pipeline.ingest import engine_ray  # noqa: E402
from pipeline.ingest.jobs import Embedded  # noqa: E402
from pipeline.inputs.decode import DecodeError, decode_file  # noqa: E402
from pipeline.inputs.scan import ScannedFile  # noqa: E402


def test_actor_block_round_trip(tmp_path: Path, monkeypatch):
    # The actor sets these for its process; here that is the test process: restore them.
    monkeypatch.setenv("CBIR_THREADS", "")
    monkeypatch.setenv("TF_NUM_INTRAOP_THREADS", "")
    made = fakes.make_images(tmp_path / "imgs", 3)
    odd = os.fsdecode(bytes(tmp_path) + b"/caf\xe9.jpg")
    os.link(made[0], odd)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(made[1].read_bytes()[:200])
    paths = [str(made[1]), odd, str(broken), str(made[2])]
    todo = [ScannedFile(p, 1, 0.0, None) for p in paths]
    actor = engine_ray.EmbedActor(lambda: fakes.FakeEmbedder(8), 2048, 10**8, 1)
    block = {
        "i": np.arange(len(paths)),
        "path": np.array([os.fsencode(p) for p in paths], dtype=object),
    }
    out = engine_ray._results(todo, actor(block))
    assert [f.path for f, _ in out] == paths
    assert isinstance(out[2][1], DecodeError) and str(out[2][1])
    model = fakes.FakeEmbedder(8)
    for k in (0, 1, 3):
        f, result = out[k]
        assert isinstance(result, Embedded)
        decoded = decode_file(f.path, 10**8)
        assert (result.sha256, result.width, result.height) == (
            decoded.sha256, decoded.width, decoded.height,
        )  # fmt: skip
        np.testing.assert_allclose(result.vector, model.embed(decoded.pixels[None])[0], atol=1e-6)
    assert os.environ["CBIR_THREADS"] == "1"


def test_auto_actors_fill_the_cluster():
    class FakeRay:
        @staticmethod
        def cluster_resources():
            return {"CPU": 6.0}

    assert engine_ray.RayEngine(None, actor_cpus=1).auto_actors(FakeRay) == 6
    assert engine_ray.RayEngine(None, actor_cpus=4).auto_actors(FakeRay) == 1
