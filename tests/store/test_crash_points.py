"""Crash injection at every durable write step, the way SQLite tests itself.

Each scenario runs a job once cleanly to count its write steps (each SQL write
statement and COMMIT, each fsync, truncate and rename) and to record the
result. Then, for every step K, it starts from the same state, runs the job in
a child process that dies right after step K (`os._exit`, as a kill -9 would
leave it), checks that the interrupted state reads back consistently, reruns
the same command and requires exactly the catalog and vectors of the clean
run and a passing `verify`. The model is the deterministic fake of `fakes.py`.
"""

from __future__ import annotations

import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from click.testing import CliRunner

import fakes
from fakes import assert_same, opts, run_child, snapshot
from pipeline import faults
from pipeline.cli import main
from pipeline.retrieval import index_files
from pipeline.store import catalog, reads


def copy_state(src: Path, dest: Path) -> None:
    if dest.exists():
        shutil.rmtree(dest)
    if src.exists():
        shutil.copytree(src, dest)
    else:
        dest.mkdir(parents=True)


def crash_every_step(tmp_path: Path, base: Path, command: list[str], check=None) -> int:
    """Crash `command` after each of its write steps in turn; returns the number of steps."""
    clean = tmp_path / "clean"
    copy_state(base, clean)
    log = tmp_path / "steps.log"
    r = run_child([*command, *opts(clean)], {faults.CRASH_LOG: str(log)})
    assert r.returncode == 0, r.stderr
    steps = log.read_text().splitlines()
    assert len(steps) >= 3, steps
    want = snapshot(clean / "c.db")

    def crash(k: int) -> tuple[int, Path, subprocess.CompletedProcess]:
        state = tmp_path / f"k{k}"
        copy_state(base, state)
        return k, state, run_child([*command, *opts(state)], {faults.CRASH_AFTER: str(k)})

    with ThreadPoolExecutor(max_workers=2) as pool:
        crashed = list(pool.map(crash, range(1, len(steps) + 1)))

    runner = CliRunner()
    for k, state, r in crashed:
        where = f"crash after step {k} ({steps[k - 1]})"
        assert r.returncode == faults.CRASH_EXIT, f"{where}: {r.stderr}"
        # The interrupted state reads back consistently (or says it is being created).
        v = runner.invoke(main, ["verify", *opts(state)])
        assert v.exit_code == 0 or "is being created" in v.output, f"{where}: {v.output}"
        assert "Traceback" not in v.output, where
        again = runner.invoke(main, [*command, *opts(state)])
        assert again.exit_code == 0, f"{where}: rerun failed: {again.output}"
        assert_same(snapshot(state / "c.db"), want, where)
        v = runner.invoke(main, ["verify", *opts(state)])
        assert v.exit_code == 0, f"{where}: verify after rerun: {v.output}"
        assert "not recorded" not in v.output, f"{where}: files left behind: {v.output}"
        recorded = {
            index_files.index_path(state / "idx", r["name"], r).name
            for r in reads.index_records(catalog.open_reader(state / "c.db"))
        }
        assert {f.name for f in (state / "idx").iterdir()} == recorded, where
        if check:
            check(state)
        shutil.rmtree(state)
    return len(steps)


@pytest.fixture(autouse=True)
def fake_model(monkeypatch):
    from pipeline import api

    monkeypatch.setattr(api.models, "cached_embedder", fakes.cached)


def image_folder(folder: Path, n: int, seed: int = 0) -> Path:
    """n distinct images, two byte-identical copies and two broken files."""
    made = fakes.make_images(folder, n, seed)
    shutil.copy(made[0], folder / "blue" / f"dup{seed}_a.jpg")
    shutil.copy(made[1], folder / "red" / f"dup{seed}_b.jpg")
    (folder / "red" / f"broken{seed}.jpg").write_bytes(made[2].read_bytes()[:200])
    (folder / "blue" / f"text{seed}.png").write_text("not an image")
    return folder


def index_cmd(*folders: Path, extra: tuple[str, ...] = ()) -> list[str]:
    return ["index", *map(str, folders), "--batch-size", "8", *extra]


@pytest.mark.slow
def test_crash_at_every_step_of_the_first_job_on_a_new_catalog(tmp_path):
    imgs = image_folder(tmp_path / "imgs", 20)
    n = crash_every_step(tmp_path, tmp_path / "empty", index_cmd(imgs))
    print(f"first job: {n} crash points")


@pytest.mark.slow
def test_crash_at_every_step_of_a_job_that_adds_images(tmp_path):
    old = image_folder(tmp_path / "old", 10, seed=1)
    new = image_folder(tmp_path / "new", 22, seed=2)
    # Byte-identical to an image already indexed: copied, not embedded.
    shutil.copy(old / "red" / "img1_0001.jpg", new / "red" / "same_as_old.jpg")
    base = tmp_path / "base"
    r = run_child([*index_cmd(old), *opts(base)])
    assert r.returncode == 0, r.stderr
    n = crash_every_step(tmp_path, base, index_cmd(old, new))
    print(f"adding job: {n} crash points")


@pytest.mark.slow
def test_crash_at_every_step_of_a_prune_job(tmp_path):
    imgs = image_folder(tmp_path / "imgs", 16)
    base = tmp_path / "base"
    assert run_child([*index_cmd(imgs), *opts(base)]).returncode == 0
    for p in sorted((imgs / "blue").glob("img*.jpg"))[:4]:
        p.unlink()
    (imgs / "red" / "broken0.jpg").unlink()
    n = crash_every_step(tmp_path, base, index_cmd(imgs, extra=("--prune",)))
    print(f"prune job: {n} crash points")


@pytest.mark.slow
def test_crash_at_every_step_of_a_relabelling_job(tmp_path):
    imgs = image_folder(tmp_path / "imgs", 12)
    files = sorted(str(p) for p in imgs.rglob("img*.jpg"))
    first, second = tmp_path / "labels1.csv", tmp_path / "labels2.csv"
    first.write_text("path,label\n" + "".join(f"{p},a\n" for p in files))
    second.write_text("path,label\n" + "".join(f"{p},{'b' if i % 3 else 'a'}\n" for i, p in enumerate(files)))  # fmt: skip
    base = tmp_path / "base"
    assert (
        run_child([*index_cmd(imgs, extra=("--labels", str(first))), *opts(base)]).returncode == 0
    )
    n = crash_every_step(tmp_path, base, index_cmd(imgs, extra=("--labels", str(second))))
    print(f"relabelling job: {n} crash points")


@pytest.mark.slow
def test_crash_at_every_step_of_build_index(tmp_path):
    imgs = image_folder(tmp_path / "imgs", 40)
    base = tmp_path / "base"
    assert run_child([*index_cmd(imgs), *opts(base)]).returncode == 0
    # An older build of the same index exists, so a crash can leave old and new side by side.
    assert run_child(["build-index", "ivf", "--factory", "IVF2,Flat", *opts(base)]).returncode == 0

    def searchable(state: Path) -> None:
        r = CliRunner().invoke(main, ["search", "--id", "3", "--index", "ivf", *opts(state)])
        assert r.exit_code == 0, r.output
        rec = reads.index_record(catalog.open_reader(state / "c.db"), "ivf")
        assert rec["factory"] == "IVF4,Flat"

    command = ["build-index", "ivf", "--factory", "IVF4,Flat", "--nprobe", "2"]
    n = crash_every_step(tmp_path, base, command, check=searchable)
    print(f"build-index: {n} crash points")


@pytest.mark.slow
def test_crash_at_every_step_of_a_job_that_moves_images(tmp_path):
    imgs = image_folder(tmp_path / "imgs", 12)
    base = tmp_path / "base"
    assert run_child([*index_cmd(imgs), *opts(base)]).returncode == 0
    red, blue = imgs / "red", imgs / "blue"
    (red / "img0_0001.jpg").rename(red / "renamed.jpg")  # the same inode
    (blue / "img0_0002.jpg").rename(red / "img0_0003.jpg")  # over a catalogued image
    shutil.copy(blue / "img0_0004.jpg", blue / "rewritten.jpg")  # same bytes, another inode
    (blue / "img0_0004.jpg").unlink()
    fakes.make_images(tmp_path / "more", 2, seed=5)  # and new images in the same job
    for p in (tmp_path / "more").rglob("*.jpg"):
        shutil.copy(p, imgs / p.parent.name / p.name)
    n = crash_every_step(tmp_path, base, index_cmd(imgs, extra=("--prune",)))
    print(f"moving job: {n} crash points")
