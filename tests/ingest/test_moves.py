"""`cbir duplicates --move-to / --undo / --plan / --apply`: nothing lost, from any crash point.

The collection: 8 distinct images, two byte-identical copies and one upscaled copy
(fake model: tests/fakes.py), grouped at --near 0.99 into three groups; a move takes
three images out (two copies and the smaller original) into DIR. The crash suites
(slow) run a move and an undo in a child process that dies after each durable step
in turn, then require that `--undo LOG` returns to the state before the move and that
rerunning the move gives the state of a clean move.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path

import pytest
from PIL import Image

import fakes
from fakes import assert_same, cli, ok, one_line_error, opts, run_child, snapshot
from pipeline import api, faults
from pipeline.ingest import movefiles
from pipeline.retrieval import index_files
from pipeline.store import catalog, reads

NEAR = ("--near", "0.99")
MOVED = ("copies/same.jpg", "copies/third.jpg", "red/img0_0001.jpg")  # under photos/


@pytest.fixture(autouse=True)
def fake_model(monkeypatch):
    monkeypatch.setattr(api.models, "cached_embedder", fakes.cached)


def make_collection(root: Path) -> None:
    photos = root / "photos"
    made = fakes.make_images(photos, 8)
    copies = photos / "copies"
    copies.mkdir()
    shutil.copy2(made[0], copies / "same.jpg")  # same bytes, same time: the lower id stays
    shutil.copy2(made[2], copies / "third.jpg")
    Image.open(made[1]).resize((96, 96)).save(copies / "big.png")  # kept: more pixels
    ok(cli("index", photos, *opts(root)), "index")


def files_of(root: Path) -> dict[str, tuple[str, float]]:
    """Every image file under root/photos and root/dups: relative path -> (sha256, mtime)."""
    out = {}
    for top in ("photos", "dups"):
        for p in sorted((root / top).rglob("*")) if (root / top).exists() else ():
            if p.is_file() and p.suffix in (".jpg", ".png"):
                out[str(p.relative_to(root))] = (
                    hashlib.sha256(p.read_bytes()).hexdigest(),
                    p.stat().st_mtime,
                )
    return out


def moved_files(before: dict[str, tuple[str, float]]) -> dict[str, tuple[str, float]]:
    """What `files_of` reads after the move: the moved images under dups/, same bytes and time."""
    out = dict(before)
    for rel in MOVED:
        out[f"dups/{rel}"] = out.pop(f"photos/{rel}")
    return out


def logs(root: Path) -> list[Path]:
    return sorted((root / "dups").glob("cbir-duplicates-*.json"))


def check_index_files(root: Path, where: str) -> None:
    db = catalog.open_reader(root / "c.db")
    try:
        recorded = {
            index_files.index_path(root / "idx", r["name"], r).name for r in reads.index_records(db)
        }
        assert reads.index_record(db, "exact")["generation"] == reads.generation(db), where
    finally:
        db.conn.close()
    assert {f.name for f in (root / "idx").iterdir()} == recorded, where
    v = cli("verify", *opts(root))
    assert v.exit_code == 0 and "not recorded" not in v.output, f"{where}: {v.output}"


def answers(root: Path) -> list[str]:
    """`cbir search --id` of every kept image whose answers include a moved one."""
    return [ok(cli("search", "--id", i, "-k", 11, *opts(root))) for i in (0, 2, 8)]


def state(root: Path) -> tuple:
    return files_of(root), snapshot(root / "c.db")


def same_state(root: Path, want: tuple, where: str) -> None:
    files, rows = state(root)
    assert files == want[0], where
    assert_same(rows, want[1], where)
    check_index_files(root, where)


def move(root: Path, *extra) -> str:
    return ok(cli("duplicates", "--move-to", root / "dups", *NEAR, *extra, *opts(root)), "move")


# --- fast -----------------------------------------------------------------------------------


def test_move_then_undo_gives_back_the_same_bytes_rows_and_answers(tmp_path):
    make_collection(tmp_path)
    before, said = state(tmp_path), answers(tmp_path)
    out = move(tmp_path)
    assert "moved 3 images" in out and out.strip().splitlines()[-1].startswith("log: "), out
    (log,) = logs(tmp_path)
    assert out.strip().endswith(str(log))
    files, rows = state(tmp_path)
    assert files == moved_files(before[0])
    assert sorted(rows) == sorted(p for p in before[1] if not p.endswith(MOVED))
    check_index_files(tmp_path, "after the move")
    body = json.loads(log.read_text())
    assert body["state"] == "moved" and body["base"] == str(tmp_path / "photos")
    assert all(set(m["row"]) >= {"vector_crc", "file_key", "sha256"} for m in body["moves"])
    # The moved images are out of the collection: a search no longer finds them.
    assert "copies/same.jpg" not in ok(cli("search", "--id", 0, "-k", 11, *opts(tmp_path)))
    assert "nothing to move" in move(tmp_path)  # done is done

    out = ok(cli("duplicates", "--undo", log, *opts(tmp_path)), "undo")
    assert "put back 3 images" in out and "3 catalog rows restored" in out, out
    same_state(tmp_path, before, "after the undo")
    assert answers(tmp_path) == said
    assert [p.name for p in (tmp_path / "dups").iterdir()] == [log.name]  # its folders removed
    assert "nothing to undo" in ok(cli("duplicates", "--undo", log, *opts(tmp_path)))

    # Moving again after an undo does the same move.
    move(tmp_path)
    assert files_of(tmp_path) == moved_files(before[0])


def test_a_plan_is_written_then_applied(tmp_path):
    make_collection(tmp_path)
    before = state(tmp_path)
    plan = tmp_path / "plan.csv"
    out = ok(cli("duplicates", *NEAR, "--plan", plan, *opts(tmp_path)))
    assert "wrote 3 moves (3 groups)" in out
    lines = plan.read_text().splitlines()
    assert lines[0].startswith("group,kind,keeper,id,")
    assert sorted(line.rsplit(",", 1)[1] for line in lines[1:]) == sorted(
        str(tmp_path / "photos" / rel) for rel in MOVED
    )
    assert files_of(tmp_path) == before[0]  # a plan moves nothing
    # A person's choice: move one image only (rows are what moves).
    plan.write_text("\n".join(lines[:2]) + "\n")
    out = ok(cli("duplicates", "--move-to", tmp_path / "dups", "--apply", plan, *opts(tmp_path)))
    assert "moved 1 images" in out
    assert len([f for f in files_of(tmp_path) if f.startswith("dups/")]) == 1
    # Applied again: the image is no longer in the catalog, so it is left with a notice.
    r = cli("duplicates", "--move-to", tmp_path / "dups", "--apply", plan, *opts(tmp_path))
    assert r.exit_code == 0 and "no longer in the catalog" in r.output, r.output
    # A plan whose id names another path (another catalog's, or stale) is refused.
    bad = tmp_path / "bad.csv"
    bad.write_text(f"id,path\n3,{tmp_path / 'photos' / 'elsewhere.jpg'}\n")
    r = cli("duplicates", "--move-to", tmp_path / "dups", "--apply", bad, *opts(tmp_path))
    assert "the plan is from another catalog, or stale" in one_line_error(r, 2)
    bad.write_text("path\nx.jpg\n")
    r = cli("duplicates", "--move-to", tmp_path / "dups", "--apply", bad, *opts(tmp_path))
    assert "needs the columns id and path" in one_line_error(r, 2)


def test_refusals_are_one_line_and_move_nothing(tmp_path):
    make_collection(tmp_path)
    before = state(tmp_path)
    dups, o = tmp_path / "dups", opts(tmp_path)

    def refused(code: int, *args) -> str:
        line = one_line_error(cli("duplicates", *args, *o), code)
        assert files_of(tmp_path) == before[0] and not logs(tmp_path), line
        assert_same(snapshot(tmp_path / "c.db"), before[1], line)
        return line

    assert "inside the collection's folder" in refused(2, "--move-to", tmp_path / "photos/d", *NEAR)
    assert "goes with --move-to" in refused(2, "--apply", "plan.csv")
    assert "goes with --move-to" in refused(2, "--log", tmp_path / "x.json")
    assert "--csv lists groups" in refused(2, "--move-to", dups, "--csv")
    assert "--undo LOG goes alone" in refused(2, "--undo", "x.json", "--move-to", dups)
    assert "--plan FILE moves nothing" in refused(2, "--plan", "p.csv", "--move-to", dups)
    assert "no duplicates log at" in refused(2, "--undo", tmp_path / "none.json")
    # A changed image (other bytes than its row's): refused, nothing moved.
    third = tmp_path / "photos/copies/third.jpg"
    kept = third.read_bytes()
    st = third.stat()
    third.write_bytes(kept + b"edited")
    before = files_of(tmp_path), before[1]
    assert "changed since it was indexed" in refused(2, "--move-to", dups, *NEAR)
    third.write_bytes(kept)
    os.utime(third, ns=(st.st_atime_ns, st.st_mtime_ns))
    # Only its time changed (a touch), its bytes the same: nothing to refuse.
    os.utime(third, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert "moved 3 images" in move(tmp_path)
    (log,) = logs(tmp_path)
    ok(cli("duplicates", "--undo", log, *o))
    assert third.stat().st_mtime_ns == st.st_mtime_ns + 10**9  # its time given back
    log.unlink()
    os.utime(third, ns=(st.st_atime_ns, st.st_mtime_ns))
    before = files_of(tmp_path), before[1]
    # A destination that exists.
    blocker = dups / "red" / "img0_0001.jpg"
    blocker.parent.mkdir(parents=True)
    blocker.write_bytes(b"someone else's")
    before = files_of(tmp_path), before[1]
    assert "exists already" in refused(2, "--move-to", dups, *NEAR)
    blocker.unlink()

    # After a move: an undo that would overwrite, or bring back a changed file, is refused.
    move(tmp_path)
    (log,) = logs(tmp_path)
    after = state(tmp_path)
    src = tmp_path / "photos/copies/same.jpg"
    src.write_bytes(b"a new file where the moved one was")
    r = cli("duplicates", "--undo", log, *o)
    assert "exists already and is another file" in one_line_error(r, 2)
    src.unlink()
    moved_one = dups / "copies/third.jpg"
    kept, st = moved_one.read_bytes(), moved_one.stat()
    moved_one.write_bytes(kept[::-1])  # the same size, other bytes, another time
    r = cli("duplicates", "--undo", log, *o)
    assert "changed since the move was planned" in one_line_error(r, 2)
    moved_one.write_bytes(kept)
    os.utime(moved_one, ns=(st.st_atime_ns, st.st_mtime_ns))
    r = cli("duplicates", "--undo", log, "--catalog", tmp_path / "other.db")
    assert "pass --catalog" in one_line_error(r, 2)
    # More groups at the default threshold (the fake model's vectors are close): a new move,
    # whose log would replace the only record of the first one.
    r = cli("duplicates", "--move-to", dups, "--log", log, *o)
    assert "exists already; give another --log" in one_line_error(r, 2)
    same_state(tmp_path, after, "after the refused undos")


@pytest.mark.parametrize(
    "damage",
    ["truncated", "zeroed", "empty", "not a log", "newer", *[f"bit {i}" for i in range(12)]],
)
def test_a_damaged_log_is_one_line_and_changes_nothing(tmp_path, damage):
    make_collection(tmp_path)
    move(tmp_path)
    (log,) = logs(tmp_path)
    after = state(tmp_path)
    data = bytearray(log.read_bytes())
    if damage == "truncated":
        data = data[: len(data) // 2]
    elif damage == "zeroed":
        data = bytearray(len(data))
    elif damage == "empty":
        data = bytearray()
    elif damage == "not a log":
        data = bytearray(b'{"moves": []}')
    elif damage == "newer":
        body = json.loads(data)
        body.pop("checksum")
        body["version"] = 2
        body["checksum"] = movefiles._digest(body)
        data = bytearray(json.dumps(body).encode())
    else:  # one bit, at positions spread over the file
        i = int(damage.split()[1])
        data[(i * 7919) % len(data)] ^= 1 << (i % 8)
    log.write_bytes(bytes(data))
    code = 2 if damage == "newer" else 1
    line = one_line_error(cli("duplicates", "--undo", log, *opts(tmp_path)), code)
    assert ("damaged" in line) if code == 1 else ("format version 2" in line), line
    # The rerun of the move reads every log in DIR first: refused the same way.
    one_line_error(cli("duplicates", "--move-to", tmp_path / "dups", *NEAR, *opts(tmp_path)), code)
    same_state(tmp_path, after, damage)


@pytest.mark.parametrize("coarse", [False, True], ids=["same times", "2 s times"])
def test_moves_across_filesystems_copy_fsync_rename_unlink(tmp_path, monkeypatch, coarse):
    make_collection(tmp_path)
    before = state(tmp_path)

    def across(frm, to):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(movefiles, "rename_file", across)
    if coarse:  # DIR on a filesystem that keeps times to 2 s (FAT): copies come out rounded
        copystat = shutil.copystat

        def rounded(frm, to, **kw):
            copystat(frm, to, **kw)
            st = os.stat(to)
            os.utime(to, ns=(st.st_atime_ns, st.st_mtime_ns // 2_000_000_000 * 2_000_000_000))

        monkeypatch.setattr(movefiles.shutil, "copystat", rounded)
    move(tmp_path)
    got, want = files_of(tmp_path), moved_files(before[0])
    if coarse:
        assert all(got[p][1] != want[p][1] for p in want if p.startswith("dups/"))
        got, want = ({p: v[0] for p, v in x.items()} for x in (got, want))
    assert got == want  # same bytes (and times, unless DIR rounds them)
    (log,) = logs(tmp_path)
    ok(cli("duplicates", "--undo", log, *opts(tmp_path)))
    same_state(tmp_path, before, "after a move and undo across filesystems")


def test_transfer_finishes_what_a_crash_left(tmp_path):
    frm, to = tmp_path / "a" / "x.jpg", tmp_path / "b" / "x.jpg"
    frm.parent.mkdir()
    frm.write_bytes(b"pixels")
    # A copy cut short (its temporary file) is made again.
    to.parent.mkdir()
    Path(movefiles.tmp_of(str(to))).write_bytes(b"pix")
    movefiles.transfer(str(frm), str(to))
    assert to.read_bytes() == b"pixels" and not frm.exists()
    assert not Path(movefiles.tmp_of(str(to))).exists()
    # A whole copy whose source was not yet unlinked: only the unlink is left.
    shutil.copy2(to, frm)
    movefiles.transfer(str(frm), str(to))
    assert to.read_bytes() == b"pixels" and not frm.exists()
    movefiles.transfer(str(frm), str(to))  # done is done
    assert to.read_bytes() == b"pixels"


def second_filesystem(tmp_path: Path) -> Path:
    """A new folder's path on another filesystem (/dev/shm), or the test is skipped."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or not os.access(shm, os.W_OK):
        pytest.skip("no writable /dev/shm")
    if shm.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("/dev/shm is on the same filesystem as the tests' folder")
    return shm / f"cbir-test-{uuid.uuid4().hex}"


def test_a_real_second_filesystem(tmp_path):
    dups = second_filesystem(tmp_path)
    make_collection(tmp_path)
    before = state(tmp_path)
    try:
        ok(cli("duplicates", "--move-to", dups, *NEAR, *opts(tmp_path)))
        for rel in MOVED:
            assert (dups / rel).is_file() and not (tmp_path / "photos" / rel).exists()
        (log,) = dups.glob("cbir-duplicates-*.json")
        ok(cli("duplicates", "--undo", log, *opts(tmp_path)))
        same_state(tmp_path, before, "after a round trip through /dev/shm")
    finally:
        shutil.rmtree(dups, ignore_errors=True)


# --- slow: a crash after every durable step -------------------------------------------------


def save(root: Path, to: Path) -> None:
    """Copy the tree (and DIR, when root/dups links to another filesystem) to `to`."""
    if to.exists():
        shutil.rmtree(to)
    shutil.copytree(root, to, symlinks=True)
    dups = root / "dups"
    if dups.is_symlink():
        shutil.copytree(dups.resolve(), to / "_dups", symlinks=True)


def restore(saved: Path, root: Path) -> None:
    """Put a saved tree back at the same path (the catalog holds absolute paths)."""
    if (root / "dups").is_symlink():
        far = (root / "dups").resolve()
        shutil.rmtree(far)
        shutil.copytree(saved / "_dups", far, symlinks=True)
    shutil.rmtree(root)
    shutil.copytree(saved, root, symlinks=True, ignore=shutil.ignore_patterns("_dups"))


def steps_of(root: Path, args: list) -> list[str]:
    log = root.parent / "steps.log"
    log.unlink(missing_ok=True)
    r = run_child([*args, *opts(root)], {faults.CRASH_LOG: str(log)})
    assert r.returncode == 0, r.stderr
    return log.read_text().splitlines()


def crash_each_step(tmp_path: Path, undo: bool, far: Path | None = None) -> int:
    """Crash a move (or an undo) after each of its steps; `far`: DIR on another filesystem
    (root/dups links to it), so each file is copied, fsynced, renamed and unlinked."""
    root = tmp_path / "work"
    make_collection(root)
    if far is not None:
        far.mkdir()
        (root / "dups").symlink_to(far)
    original, said = state(root), answers(root)
    saved = {k: tmp_path / f"saved-{k}" for k in ("original", "moved", "crashed")}
    save(root, saved["original"])
    move(root)
    moved = state(root)
    save(root, saved["moved"])
    (log,) = logs(root)
    move_args = ["duplicates", "--move-to", root / "dups", *NEAR]
    command = ["duplicates", "--undo", log] if undo else move_args
    start = saved["moved"] if undo else saved["original"]
    restore(start, root)
    steps = steps_of(root, command)
    assert len(steps) >= 10, steps
    copied = [s for s in steps if s.split()[1] == "unlink" and s.endswith(".jpg")]
    assert bool(copied) == (far is not None), steps
    for k in range(1, len(steps) + 1):
        where = f"crash after step {k} ({steps[k - 1]}) of {'undo' if undo else 'move'}"
        restore(start, root)
        r = run_child([*command, *opts(root)], {faults.CRASH_AFTER: str(k)})
        assert r.returncode == faults.CRASH_EXIT, f"{where}: {r.stderr}"
        save(root, saved["crashed"])
        # --undo LOG returns to the state before the move (no log yet: nothing moved).
        if found := logs(root):
            ok(cli("duplicates", "--undo", found[0], *opts(root)), f"{where}: undo")
            assert answers(root) == said, where
        same_state(root, original, f"{where}, then undo")
        # Rerunning the move finishes it.
        restore(saved["crashed"], root)
        ok(cli(*move_args, *opts(root)), f"{where}: rerun")
        same_state(root, moved, f"{where}, then the move again")
    return len(steps)


@pytest.mark.slow
@pytest.mark.parametrize("across", [False, True], ids=["one filesystem", "two filesystems"])
def test_crash_at_every_step_of_a_move(tmp_path, across):
    far = second_filesystem(tmp_path) if across else None
    try:
        print(f"move: {crash_each_step(tmp_path, undo=False, far=far)} crash points")
    finally:
        if far is not None:
            shutil.rmtree(far, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.parametrize("across", [False, True], ids=["one filesystem", "two filesystems"])
def test_crash_at_every_step_of_an_undo(tmp_path, across):
    far = second_filesystem(tmp_path) if across else None
    try:
        print(f"undo: {crash_each_step(tmp_path, undo=True, far=far)} crash points")
    finally:
        if far is not None:
            shutil.rmtree(far, ignore_errors=True)
