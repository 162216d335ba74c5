"""`info` and `verify`: what a collection holds, and whether its parts agree.

Both look without changing anything, except `verify(repair=True)`, which first
drops what cannot be trusted (under the write lock) and then looks.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from pipeline.api.models import open_collection, settings_for
from pipeline.embed.modelcache import ModelCache
from pipeline.errors import CbirError
from pipeline.retrieval import factories, index_files, indexes, whitening
from pipeline.store import reads, seals, vectors
from pipeline.store.collection import Collection, drop_damaged, reading, writing


def info_in(coll: Collection) -> dict[str, Any]:
    """What the catalog holds: counts by status and label, fingerprint, indexes, last run.

    Counted from every images row, so all are checked first (DamagedRow, one line); meta
    values and index records are checked as read. The last run is shown as recorded
    (`runs` carries no checksums: history, not an answer about the images).
    """
    db = coll.db
    coll.check_rows()
    status = {
        r["status"]: r["n"]
        for r in db.query("select status, count(*) n from images group by status")
    }
    labels = {
        r["label"] if r["label"] is not None else "(none)": r["n"]
        for r in db.query(
            "select label, count(*) n from images where status = 'indexed' group by label order by label"
        )
    }
    vec_path = coll.vectors_path
    idx = []
    for rec in reads.index_records(db):
        path = index_files.index_path(coll.index_dir, rec["name"], rec)
        data = index_files.data_path(path) if index_files.is_ondisk(rec) else None
        missing = not path.exists() or (data is not None and not data.exists())
        idx.append(
            {
                "name": rec["name"],
                "factory": rec["factory"],
                "params": json.loads(rec["params"] or "{}"),
                "vectors": rec["ntotal"],
                "bytes": path.stat().st_size if path.exists() else None,
                "file": str(path),
                # an on-disk index: its inverted lists (NAME+TAG.ivfdata) and their size
                "data_file": str(data) if data is not None else None,
                "data_bytes": data.stat().st_size if data is not None and data.exists() else None,
                "trained_recall": rec.get("trained_recall"),
                "stale": indexes.is_stale(coll, rec) or missing,
                "recall_at_10": rec["recall_at_10"],
                "note": rec.get("note"),
                "build_seconds": rec["build_seconds"],
                "built_at": rec["built_at"],
            }
        )
    runs = list(db.query("select * from runs order by id desc limit 1"))
    last_run = None
    if runs:
        last_run = dict(runs[0])
        last_run["counts"] = json.loads(last_run["counts"] or "{}")
        last_run.pop("config", None)
    return {
        "catalog": str(coll.path.resolve()),
        "vectors_file": str(vec_path.resolve()),
        "vectors_bytes": vec_path.stat().st_size if vec_path.exists() else 0,
        "schema_version": reads.get_meta_int(db, "schema_version"),
        "images": {
            "total": sum(status.values()),
            "indexed": status.get("indexed", 0),
            "failed": status.get("failed", 0),
        },
        "labels": labels,
        "fingerprint": reads.fingerprint(db),
        "dimension": reads.dimension(db),
        "metric": reads.get_meta(db, "metric"),
        "generation": reads.generation(db),
        "indexes": idx,
        "last_run": last_run,
    }


def info(config: str | None = None, **options: Any) -> dict[str, Any]:
    """Counts by status and label, fingerprint, indexes (with staleness), last run."""
    coll = open_collection(settings_for(config, **options))
    try:
        return info_in(coll)
    finally:
        coll.close()


def verify(config: str | None = None, repair: bool = False, **options: Any) -> dict[str, Any]:
    """Check catalog, vector file and indexes against each other.

    repair=True first takes the write lock and repairs what can be repaired
    (migrates an old schema, drops rows left by a torn commit, whose vectors
    are gone or fail their checksum, or whose own checksum fails (never meta or
    index records: cbir cannot invent them), cuts uncommitted vector bytes); the
    report's "repaired" lists what was done.
    """
    s = settings_for(config, **options)
    done: list[str] = []
    if repair:
        # drop_lost: rows whose vectors a short vector file lost are dropped (and told)
        # here only; every other writer refuses such a file.
        with writing(s.catalog, s.index_dir, create=False, drop_lost=True) as coll:
            bad = drop_damaged(coll)  # also drops damaged catalog rows, told in coll.repaired
            done = list(coll.repaired)
            if bad:
                done.append(
                    f"dropped {len(bad)} images whose vectors fail their checksum (ids {bad[:5]}); "
                    "the next 'cbir index' embeds them again"
                )
    # Verify must see a damaged collection too: no vector check on opening.
    coll = reading(s.catalog, s.index_dir, check=False)
    try:
        report = verify_collection(coll)
    finally:
        coll.close()
    report["repaired"] = done
    return report


def verify_collection(coll: Collection) -> dict[str, Any]:
    """Cross-check catalog, vector file and indexes; `problems` empty means consistent.

    `coll` is opened without the vector-file check, so a damaged one is reported.
    """
    db = coll.db
    try:
        quick = [r[0] for r in db.conn.execute("pragma quick_check")]
    except sqlite3.DatabaseError as e:
        quick = [str(e)]
    if quick != ["ok"]:
        return {
            "ok": False,
            "problems": [f"SQLite quick_check failed: {'; '.join(quick[:5])}"],
            "notes": ["the catalog file itself is damaged: restore it from a backup"],
            "checked": {"images": 0, "vectors": 0, "indexes": 0},
        }
    try:
        return _verify(coll)
    except sqlite3.DatabaseError as e:
        return {
            "ok": False,
            "problems": [f"SQLite error while reading the catalog: {e}"],
            "notes": [],
            "checked": {"images": 0, "vectors": 0, "indexes": 0},
        }


REPAIR_HINT = (
    "'cbir verify --repair' (or the next 'cbir index') drops them so they are indexed again"
)


def _row_checks(db) -> tuple[list[str], list[str], bool]:
    """(problems, notes, meta_ok): every row of images, meta and indexes against its
    checksum; damaged meta makes every other check meaningless (next_id, dimension)."""
    if seals.unsealed(db):
        note = (
            "catalog rows carry no checksums yet (written before schema 5), so a changed "
            "value in them goes unseen; the next write ('cbir index', 'cbir build-index' or "
            "'cbir verify --repair') records them"
        )
        return [], [note], True
    problems = []
    if bad := seals.bad_rows(db, "meta"):
        return [seals.meta_damage_text([str(k) for k in bad])], [], False
    if bad := seals.bad_rows(db, "images"):
        problems.append(
            f"{len(bad)} catalog rows fail their checksum (ids {bad[:5]}): their path, label "
            f"or status was changed by damage; {REPAIR_HINT}"
        )
    if bad := seals.bad_rows(db, "indexes"):
        problems.append(seals.record_damage_text([str(n) for n in bad]))
    return problems, [], True


def _verify(coll: Collection) -> dict[str, Any]:
    db, index_dir = coll.db, coll.index_dir
    problems, notes, meta_ok = _row_checks(db)
    if not meta_ok:
        checked = {"images": 0, "vectors": 0, "indexes": 0}
        return {"ok": False, "problems": problems, "notes": notes, "checked": checked}
    dim, committed = coll.dim, coll.next_id
    vec_path = coll.vectors_path
    ids = reads.indexed_ids(db)
    checked = {"images": 0, "vectors": 0, "indexes": 0}
    vectors_complete = False

    torn = next(
        iter(db.query("select count(*) n, max(id) m from images where id >= ?", [committed]))
    )
    if torn["n"]:
        problems.append(
            f"{torn['n']} catalog rows (up to id {torn['m']}) are at or beyond next_id {committed}: "
            f"a torn commit; {REPAIR_HINT}"
        )
    for r in db.query("select path, count(*) n from images group by path having n > 1"):
        problems.append(f"path catalogued {r['n']} times: {r['path']}")
    bad_failed = next(
        iter(
            db.query(
                "select count(*) n from images where status = 'failed' and (error is null or error = '')"
            )
        )
    )["n"]
    if bad_failed:
        problems.append(f"{bad_failed} failed images have no error text")
    bad_status = next(
        iter(db.query("select count(*) n from images where status not in ('indexed', 'failed')"))
    )["n"]
    if bad_status:
        problems.append(f"{bad_status} images have an unknown status")
    checked["images"] = next(iter(db.query("select count(*) n from images")))["n"]

    if dim and committed:
        rows_on_disk = vectors.row_count(vec_path, dim)
        if rows_on_disk < committed:
            problems.append(
                f"vector file has {rows_on_disk} rows, the catalog committed {committed}; "
                f"images whose vectors are gone: {REPAIR_HINT}"
            )
        else:
            vectors_complete = True
            if rows_on_disk > committed:
                notes.append(
                    f"{rows_on_disk - committed} uncommitted vector rows from an interrupted job "
                    "(dropped at the next write)"
                )
            stored = coll.rows()
            for start in range(0, len(ids), 65536):
                chunk = np.asarray(stored[ids[start : start + 65536]], dtype=np.float32)
                with np.errstate(over="ignore", invalid="ignore"):  # a damaged row: inf, told below
                    norms = np.linalg.norm(chunk, axis=1)
                bad = ~np.isfinite(norms) | (np.abs(norms - 1) > 1e-3)
                if bad.any():
                    first = int(ids[start + int(np.flatnonzero(bad)[0])])
                    problems.append(
                        f"{int(bad.sum())} indexed vectors are not unit length (id {first})"
                    )
            crcs = reads.vector_crcs(db)
            bad = vectors.damaged(stored, ids, crcs)
            if bad:
                problems.append(
                    f"{len(bad)} vectors fail their checksum (ids {bad[:5]}): the vector file "
                    f"is damaged; {REPAIR_HINT}"
                )
            unknown = sum(c is None for c in crcs.values())
            if unknown:
                notes.append(f"{unknown} vectors have no checksum yet (recorded at the next write)")
            checked["vectors"] = len(ids)
    elif len(ids):
        problems.append("images are indexed but the catalog records no vector dimension")

    for rec in reads.index_records(db, check=False):
        if not rec.pop("intact"):
            continue  # told above: nothing in it can be trusted
        path = index_files.index_path(index_dir, rec["name"], rec)
        found, noted = whitening.check_files(rec)  # what a rebuild of a whitened one reads
        problems += found
        notes += noted
        if not path.exists():
            if rec["name"] == indexes.EXACT:  # derived and cheap: search rebuilds it
                notes.append(f"exact index file {path} is missing; it is rebuilt when needed")
            else:
                problems.append(f"index {rec['name']}: file {path} is missing")
            continue
        data = index_files.data_path(path)
        if index_files.is_ondisk(rec) and not data.exists():
            problems.append(
                f"index {rec['name']}: its inverted-list file {data} is missing; "
                f"run 'cbir build-index {rec['name']}'"
            )
            continue
        if index_files.is_ondisk(rec) and data.stat().st_size != rec["data_bytes"]:
            # Checked before FAISS maps it: reading past the end of a short one is a SIGBUS.
            problems.append(
                f"index {rec['name']}: its inverted-list file {data} is {data.stat().st_size:,} "
                f"bytes, its record says {rec['data_bytes']:,} (truncated or replaced); "
                f"run 'cbir build-index {rec['name']}'"
            )
            continue
        if not index_files.matches_file(rec, path):
            # Builds write new files and then commit the record, so a file of another size
            # than its record's was changed behind cbir's back (or by a much older cbir).
            message = (
                f"index {rec['name']}: the file does not match its record "
                f"(truncated or replaced); run 'cbir build-index {rec['name']}'"
            )
            if rec["name"] == indexes.EXACT:
                message += " (search rebuilds it in memory meanwhile)"
            problems.append(message)
            continue
        try:
            unchecked = index_files.check_digests(rec, path, full=True)
        except index_files.DamagedIndex as e:
            meanwhile = " (search rebuilds it in memory meanwhile)"
            problems.append(str(e) + (meanwhile if rec["name"] == indexes.EXACT else ""))
            continue
        if unchecked:
            notes.append(
                f"index {rec['name']}: no digest recorded for {', '.join(unchecked)} (built "
                f"before cbir kept them), so damage that keeps its size goes unseen; run "
                f"'cbir build-index {rec['name']}' to protect it"
            )
        try:
            index = index_files.read(path, ondisk=index_files.is_ondisk(rec))
        except (RuntimeError, MemoryError) as e:
            problems.append(f"index {rec['name']}: unreadable ({str(e).strip().splitlines()[-1]})")
            continue
        checked["indexes"] += 1
        if problem := indexes.unusable(index):
            problems.append(
                f"index {rec['name']}: its whitening is unusable ({problem}); "
                f"run 'cbir build-index {rec['name']}' to rebuild it"
            )
        if index.ntotal != rec["ntotal"]:
            problems.append(
                f"index {rec['name']}: file holds {index.ntotal} vectors, record says {rec['ntotal']}"
            )
        if indexes.is_stale(coll, rec):
            notes.append(f"index {rec['name']} is stale (catalog changed since it was built)")
            continue
        try:
            held = factories.stored_ids(index)  # IDMap2's map, or a bare IVF's inverted lists
        except (CbirError, RuntimeError) as e:
            problems.append(f"index {rec['name']}: cannot list its ids ({e})")
            continue
        if not np.array_equal(held, ids):
            missing = len(np.setdiff1d(ids, held))
            extra = len(np.setdiff1d(held, ids))
            problems.append(
                f"index {rec['name']}: {missing} catalog ids missing, {extra} unknown ids"
            )
        elif rec["factory"] == indexes.EXACT_FACTORY and len(ids) and vectors_complete:
            sample = ids[:: max(1, len(ids) // 1000)]
            inner = faiss.downcast_index(faiss.downcast_index(index).index)
            id_map = faiss.vector_to_array(faiss.downcast_index(index).id_map)
            pos = {int(i): p for p, i in enumerate(id_map)}
            got = np.stack([inner.reconstruct(pos[int(i)]) for i in sample])
            want = np.asarray(coll.rows()[sample])
            if not np.allclose(got, want, atol=1e-6):
                problems.append(f"index {rec['name']}: vectors differ from the vector file")
    known = set()
    for r in reads.index_records(db, check=False):
        path = index_files.index_path(index_dir, r["name"], r)
        known |= (
            {path.name, index_files.data_path(path).name}
            if index_files.is_ondisk(r)
            else {path.name}
        )
    if Path(index_dir).is_dir():
        for f in sorted([*Path(index_dir).glob("*.faiss"), *Path(index_dir).glob("*.ivfdata")]):
            if f.name not in known:
                notes.append(f"index file {f} is not recorded in this catalog")
    for problem in ModelCache(coll.models_dir).problems():
        problems.append(
            f"the int8 model kept in {coll.models_dir} is damaged ({problem}); the next "
            "'cbir index' rebuilds it from the model cache or the calibration images while "
            "either is still there"
        )
    return {"ok": not problems, "problems": problems, "notes": notes, "checked": checked}
