"""Crash injection at every durable write step of adding an upload and of removing an image
(`api.add_uploads`, `api.remove_images`: what `POST /api/images` and `DELETE /api/images/ID`
run), as tests/store/test_crash_points.py does for the indexing jobs.

Each job runs once cleanly, with CBIR_CRASH_LOG, to count its steps and record the
catalog after it. Then, for every step K, it runs from the same state in a fresh process
(forked from a preloaded server: `fakes.in_fresh_process`) that dies right after step K
(`os._exit`, as a kill -9 leaves it). The catalog must verify and hold exactly the images
of before the job or of after it (with their vectors), never a file deleted whose row is
still there; rerunning the same request then gives the state of the clean run.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest

import fakes
from pipeline import api, faults

pytestmark = pytest.mark.slow


def options(state: Path) -> dict[str, str]:
    return {"catalog": str(state / "c.db"), "index_dir": str(state / "idx")}


def _add(state: str, image: str, env: dict[str, str]) -> list[dict]:
    """The add in a fresh process: the fake model, the crash variables set here."""
    fakes.install()
    os.environ.update(env)
    data = Path(image).read_bytes()
    return api.add_uploads([("new.jpg", data)], Path(state) / "up", **options(Path(state)))


def _remove(state: str, image_id: int, env: dict[str, str]) -> list[dict]:
    fakes.install()
    os.environ.update(env)
    folder = Path(state) / "up"
    return api.remove_images([image_id], delete_files_in=folder, **options(Path(state)))


def images(state: Path) -> dict[str, tuple]:
    """Relative path -> (status, label, sha256, size, vector): the catalog's images."""
    return {
        os.path.relpath(path, state): (*row[:4], row[6])
        for path, row in fakes.snapshot(state / "c.db").items()
    }


def same(a: dict[str, tuple], b: dict[str, tuple]) -> bool:
    if sorted(a) != sorted(b):
        return False
    for path, row in a.items():
        other = b[path]
        if row[:4] != other[:4]:
            return False
        if (row[4] is None) != (other[4] is None):
            return False
        if row[4] is not None and not np.allclose(row[4], other[4], atol=1e-6):
            return False
    return True


def verify_ok(state: Path, where: str) -> None:
    report = api.verify(**options(state))
    assert report["ok"], f"{where}: {report}"


def restore(pristine: Path, work: Path) -> Path:
    """`work` as `pristine` holds it: the catalog's paths name files under `work`."""
    if work.exists():
        shutil.rmtree(work)
    shutil.copytree(pristine, work)
    return work


def crash_every_step(tmp_path: Path, job, arg, check=None) -> int:
    """Crash `job(WORK, arg, env)` after each of its write steps in turn; returns how many."""
    pristine, work = tmp_path / "pristine", tmp_path / "work"
    before = images(restore(pristine, work))
    log = tmp_path / "steps.log"
    value, code, _ = fakes.in_fresh_process(job, str(work), arg, {faults.CRASH_LOG: str(log)})
    assert value is not None and value[0] == "ok", (code, value)
    steps = log.read_text().splitlines()
    assert len(steps) >= 3, steps
    after = images(work)
    assert not same(before, after)
    for k in range(1, len(steps) + 1):
        where = f"crash after step {k} ({steps[k - 1]})"
        restore(pristine, work)
        value, code, timed_out = fakes.in_fresh_process(
            job, str(work), arg, {faults.CRASH_AFTER: str(k)}
        )
        assert code == faults.CRASH_EXIT and not timed_out, f"{where}: {code} {value}"
        verify_ok(work, where)
        now = images(work)
        assert same(now, before) or same(now, after), f"{where}: neither before nor after"
        if check:
            check(work, now, where)
        # The same request again finishes the job (or finds it done).
        value, code, _ = fakes.in_fresh_process(job, str(work), arg, {})
        assert value is not None, f"{where}: rerun died ({code})"
        assert value[0] == "ok" or "NotFoundError" in value[1], f"{where}: {value[1]}"
        assert same(images(work), after), f"{where}: the rerun differs from the clean run"
        verify_ok(work, where)
    return len(steps)


@pytest.fixture
def upload(tmp_path, monkeypatch) -> Path:
    """tmp_path/pristine: a catalog of 10 images and one upload added through the API (to
    remove), made in tmp_path/work (where every run happens); returns that upload's file."""
    monkeypatch.setattr(api.models, "cached_embedder", fakes.cached)
    work = tmp_path / "work"
    fakes.make_images(tmp_path / "imgs", 10)
    api.index([tmp_path / "imgs"], **options(work))
    data = fakes.make_images(tmp_path / "one", 1, seed=7)[0].read_bytes()
    (done,) = api.add_uploads([("one.jpg", data)], work / "up", **options(work))
    shutil.copytree(work, tmp_path / "pristine")
    return Path(done["path"])


def test_crash_at_every_step_of_an_add(tmp_path, upload):
    image = fakes.make_images(tmp_path / "new", 1, seed=9)[0]
    n = crash_every_step(tmp_path, _add, str(image))
    print(f"add: {n} crash points")


def test_crash_at_every_step_of_a_remove_that_deletes_its_file(tmp_path, upload):
    rel = os.path.relpath(upload, tmp_path / "work")
    with sqlite3.connect(tmp_path / "work" / "c.db") as con:
        (image_id,) = con.execute("select id from images where path = ?", [str(upload)]).fetchone()

    def file_kept_while_catalogued(work: Path, now: dict, where: str) -> None:
        if rel in now:  # the row is still there: so is its file
            assert (work / rel).exists(), f"{where}: the file went before its row"

    n = crash_every_step(tmp_path, _remove, image_id, file_kept_while_catalogued)
    print(f"remove: {n} crash points")
