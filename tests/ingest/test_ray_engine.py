"""`cbir index --engine ray` on a real multi-node Ray cluster on this machine (slow tier).

A head and two worker nodes of one CPU each (`ray.cluster_utils.Cluster`).
The Ray engine must give the catalog the local engine gives (paths, labels,
statuses, failures, ids, vectors), survive a killed actor process and a
removed node, and a killed driver must leave a catalog that a rerun finishes.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402

import fakes  # noqa: E402
from pipeline import api  # noqa: E402
from pipeline.errors import CbirError  # noqa: E402
from pipeline.store import catalog  # noqa: E402

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
COREL = ROOT.parent / "shared" / "datasets" / "corel1k"
PYTHONPATH = f"{ROOT}{os.pathsep}{ROOT / 'tests'}"
# Fault tests: N images in batches of 8, each batch DELAY s in the fake model, so
# that the job is still running (about 10 s) when the fault is injected.
N, DELAY = 240, 0.5


@pytest.fixture(scope="module")
def cluster():
    """Head + 2 worker nodes, 1 CPU each; workers can import the tests' fake model."""
    if ray.is_initialized():
        ray.shutdown()
    c = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "object_store_memory": 150 * 2**20},
    )
    workers = [c.add_node(num_cpus=1, object_store_memory=150 * 2**20) for _ in range(2)]
    c.wait_for_nodes()
    ray.init(address=c.address, runtime_env={"env_vars": {"PYTHONPATH": PYTHONPATH}})
    c.workers = workers
    try:
        yield c
    finally:
        ray.shutdown()
        c.shutdown()


def _ids(cat: Path) -> list[tuple[int, str]]:
    db = catalog.open_reader(cat)
    try:
        return [(r["id"], r["path"]) for r in db.query("select id, path from images order by id")]
    finally:
        db.conn.close()


def _corel_subset(folder: Path) -> None:
    """24 Corel photos in 3 classes, plus a damaged JPEG, a text file, a copy, an odd name."""
    for cls in ("beaches", "bus", "horses"):
        (folder / cls).mkdir(parents=True)
        for src in sorted((COREL / cls).glob("*.jpg"))[:8]:
            shutil.copy(src, folder / cls / src.name)
    first = sorted((folder / "bus").glob("*.jpg"))[0]
    (folder / "bus" / "truncated.jpg").write_bytes(first.read_bytes()[:1500])
    (folder / "bus" / "notes.jpg").write_text("not an image")
    shutil.copy(first, folder / "horses" / "copy-of-a-bus.jpg")
    odd = sorted((COREL / "dinosaurs").glob("*.jpg"))[0]
    shutil.copy(odd, os.fsdecode(bytes(folder / "beaches") + b"/caf\xe9.jpg"))


def test_ray_gives_the_local_engines_catalog(cluster, tmp_path, weights):
    """Real OpenVINO fp32 model: same rows and ids; vectors equal to cosine 0.9999."""
    imgs = tmp_path / "imgs"
    _corel_subset(imgs)
    opts = {"weights": weights, "runtime": "openvino", "precision": "fp32", "batch_size": 8}
    local = {"catalog": str(tmp_path / "l.db"), "index_dir": str(tmp_path / "li"), **opts}
    remote = {"catalog": str(tmp_path / "r.db"), "index_dir": str(tmp_path / "ri"), **opts}
    want = api.index([imgs], **local)
    got = api.index([imgs], engine="ray", actors=2, **remote)
    assert got.counts() == want.counts()
    assert (got.indexed, got.failed, got.copied) == (25, 2, 1)
    assert sorted(got.failures) == sorted(want.failures)
    a, b = fakes.snapshot(Path(local["catalog"])), fakes.snapshot(Path(remote["catalog"]))
    assert sorted(a) == sorted(b)
    for path, row in a.items():
        assert b[path][:6] == row[:6], path
        if row[6] is not None:
            assert float(np.dot(row[6], b[path][6])) >= 0.9999, path
    assert _ids(Path(remote["catalog"])) == _ids(Path(local["catalog"]))
    # A rerun embeds nothing; one added file is the only one embedded.
    again = api.index([imgs], engine="ray", actors=2, **remote)
    assert (again.indexed, again.copied, again.unchanged) == (0, 0, 28)
    shutil.copy(sorted((COREL / "flowers").glob("*.jpg"))[0], imgs / "beaches" / "new.jpg")
    added = api.index([imgs], engine="ray", actors=2, **remote)
    assert (added.indexed, added.copied, added.unchanged) == (1, 0, 28)


def _fake_job(monkeypatch, delay: float, log: Path | None = None) -> None:
    # Pickled by value into the actors, which import `fakes` from PYTHONPATH.
    log_path = str(log) if log else None
    monkeypatch.setattr(
        api.models, "cached_embedder", lambda *a: fakes.cached(*a, delay=delay, log=log_path)
    )


def _embedded(log: Path) -> int:
    """Images the actors began to embed (a batch lost with its actor counts twice)."""
    return sum(int(n) for n in log.read_text().split())


def _reference(tmp_path: Path, imgs: Path, monkeypatch) -> dict:
    _fake_job(monkeypatch, 0.0)
    ref = {"catalog": str(tmp_path / "ref.db"), "index_dir": str(tmp_path / "refi")}
    api.index([imgs], batch_size=8, **ref)
    return fakes.snapshot(Path(ref["catalog"]))


def _run_in_thread(imgs: Path, opts: dict, done: list[int]):
    result: dict = {}

    def run() -> None:
        try:
            result["summary"] = api.index(
                [imgs], engine="ray", actors=2, batch_size=8, progress=done.append, **opts
            )
        except BaseException as e:  # reported by the test, not lost in the thread
            result["error"] = e

    thread = threading.Thread(target=run)
    thread.start()
    return thread, result


def _wait_for(done: list[int], n: int, thread: threading.Thread) -> None:
    deadline = time.monotonic() + 120
    while sum(done) < n and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert thread.is_alive(), "the job ended before the fault could be injected"


def _remove_a_node(cluster) -> None:
    """A worker node's raylet, workers and object store go, as a machine failing; the
    cluster's autoscaler would bring another, so one is added."""
    cluster.remove_node(cluster.workers.pop(0))
    cluster.workers.append(cluster.add_node(num_cpus=1, object_store_memory=150 * 2**20))


def _kill_an_actor(cluster) -> None:
    """kill -9 of one model actor's worker process."""
    ps = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True).stdout
    pids = [int(line.split()[0]) for line in ps.splitlines() if "EmbedActor" in line]
    assert pids, "no actor process found"
    os.kill(pids[0], signal.SIGKILL)


@pytest.mark.parametrize("fault", [_remove_a_node, _kill_an_actor], ids=["node", "actor"])
def test_a_fault_mid_job_loses_nothing(cluster, tmp_path, monkeypatch, fault):
    imgs = tmp_path / "imgs"
    fakes.make_images(imgs, N)
    want = _reference(tmp_path, imgs, monkeypatch)
    _fake_job(monkeypatch, DELAY, tmp_path / "calls.log")
    opts = {"catalog": str(tmp_path / "c.db"), "index_dir": str(tmp_path / "ci")}
    done: list[int] = []
    thread, result = _run_in_thread(imgs, opts, done)
    _wait_for(done, 40, thread)
    fault(cluster)
    thread.join(timeout=240)
    assert not thread.is_alive(), f"the job did not finish after {fault.__doc__}"
    assert "error" not in result, result.get("error")
    assert result["summary"].indexed == N
    fakes.assert_same(fakes.snapshot(Path(opts["catalog"])), want, fault.__name__)
    assert _embedded(tmp_path / "calls.log") > N, "no batch was lost and redone: no fault hit"


def test_a_killed_driver_is_finished_by_a_rerun(cluster, tmp_path, monkeypatch):
    """kill -9 of `cbir index --engine ray` mid-job; the rerun ends as a clean run does."""
    imgs = tmp_path / "imgs"
    fakes.make_images(imgs, N)
    want = _reference(tmp_path, imgs, monkeypatch)
    cat = tmp_path / "c.db"
    cmd = [sys.executable, str(ROOT / "tests" / "fakes.py"), "index", str(imgs)]
    cmd += ["--catalog", str(cat), "--index-dir", str(tmp_path / "ci"), "--batch-size", "8"]
    cmd += ["--engine", "ray", "--ray-address", cluster.address, "--actors", "2"]
    env = {**os.environ, "PYTHONPATH": PYTHONPATH, "FAKE_MODEL_DELAY": str(DELAY)}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        with contextlib.suppress(CbirError):  # a catalog the job is still creating
            if cat.exists() and len(fakes.snapshot(cat)) >= 40:
                break
        time.sleep(0.2)
    assert proc.poll() is None, proc.stderr.read().decode()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 40 <= len(fakes.snapshot(cat)) < N
    rerun = subprocess.run(
        cmd, env={**env, "FAKE_MODEL_DELAY": "0"}, capture_output=True, text=True
    )
    assert rerun.returncode == 0, rerun.stderr
    fakes.assert_same(fakes.snapshot(cat), want, "rerun after the driver was killed")


def test_engine_ray_without_ray_is_one_line(tmp_path):
    code = "import sys; sys.modules['ray'] = None; from pipeline.cli import main; main()"
    args = ["index", str(tmp_path), "--catalog", str(tmp_path / "c.db"), "--engine", "ray"]
    r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "pip install" in r.stderr, r.stderr
    assert not (tmp_path / "c.db").exists()
