"""Growing an IVF index to the catalog without retraining (`cbir build-index NAME --update`).

New vectors are added under their ids and ids no longer indexed are
removed, into a new file: an index held in one file is read, changed in
memory and written anew; an on-disk index is merged with a shard of the
added vectors into a new .ivfdata (the live files are only read), and the
removed ids are taken out of that new, unpublished file. The result is
saved only if its recall@10, measured with the record's search parameters,
stays within RETRAIN_DROP of the recall the index had when it was last
trained; otherwise `RetrainDue` says a full build is due.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from pipeline.errors import CbirError
from pipeline.retrieval import autoindex, factories, index_files, indexes, shards
from pipeline.store import reads, writes

# An update may lose this much recall@10 against the recall measured when the index was
# trained; beyond it, the clusters no longer fit the vectors and a retrain is due.
RETRAIN_DROP = 0.01


class RetrainDue(CbirError):
    """Growing an index without retraining would cost more recall than RETRAIN_DROP."""

    def __init__(self, message: str):
        super().__init__(message, exit_code=1)


def update_and_save(coll, name: str, sharding: shards.Sharding | None = None) -> dict[str, Any]:
    """Grow an IVF index to the catalog without retraining; returns the new record.

    Adds the indexed ids the index lacks, removes the ids it holds that are no
    longer indexed, measures recall@10 with the record's search parameters,
    and saves a new file (an on-disk index: a new .ivfdata; the live files
    are only read) with the catalog's generation, unless the recall fell more
    than RETRAIN_DROP below the recall measured at the last full build: then
    nothing is saved and RetrainDue says to rebuild. The record returned also
    has `added`, `removed` and `timings`.
    """
    record = reads.index_record(coll.db, name)
    if record is None:
        known = ", ".join(r["name"] for r in reads.index_records(coll.db)) or "none"
        raise CbirError(f"no index named {name!r} to update (indexes: {known})")
    factory = record["factory"]
    path = index_files.index_path(coll.index_dir, name, record)
    ondisk = index_files.is_ondisk(record)
    rebuild = f"run 'cbir build-index {name}' for a full rebuild"
    if not index_files.matches_file(record, path):
        raise CbirError(
            f"the files of index {name!r} are missing or do not match its record; {rebuild}", 1
        )
    how = sharding or shards.Sharding()
    if not ondisk and (how.shards > 1 or how.engine != "local"):
        raise CbirError(
            f"index {name!r} is held in one file, so --update adds to it here: leave out --shards "
            f"and --engine (or rebuild it on disk: 'cbir build-index {name} --shards N')"
        )
    # In full, whatever this process saw before: the live lists are copied into the new
    # files, whose fresh digests would otherwise vouch for the damage.
    index_files.check_digests(record, path, full=True)
    gen = coll.generation
    started = time.perf_counter()
    try:
        current = index_files.read(path, mmap=False, ondisk=ondisk)
    except (RuntimeError, MemoryError):
        raise CbirError(f"the file of index {name!r} is damaged; {rebuild}", 1) from None
    if factories.ivf_core(current) is None:
        why = (
            "was built by an older cbir (IVF inside IDMap2)"
            if faiss.try_extract_index_ivf(current) is not None
            else "is not an IVF index"
        )
        raise CbirError(f"index {name!r} ({factory}) {why} and cannot grow; {rebuild}")
    held, want = factories.stored_ids(current), coll.indexed_ids()
    added, removed = np.setdiff1d(want, held), np.setdiff1d(held, want)
    trained = record.get("trained_recall")
    trained = record["recall_at_10"] if trained is None else trained
    counts = {"added": 0, "removed": 0, "timings": {}, "trained_recall": trained}
    if not len(added) and not len(removed):
        if record["generation"] != gen:  # nothing to add or remove: the same files are current
            record = {**record, "generation": gen}
            writes.save_index_record(coll.db, record)
        index_files.remove_leftovers(coll, name, record)  # an update that crashed after its commit
        return {**record, **counts}
    data, timings = None, {}
    try:
        if ondisk:
            index, data, timings = grow_ondisk(
                coll, name, factory, current, path, added, removed, how
            )
        else:
            index = current
            indexes.add_rows(index, coll.rows(), added, reads.vector_crcs(coll.db), factory)
            if len(removed):
                index.remove_ids(np.asarray(removed, dtype=np.int64))
        params = json.loads(record["params"] or "{}")
        recall = autoindex.measure_recall(index, autoindex.recall_probe(coll), params)
        if trained is not None and recall < trained - RETRAIN_DROP:
            raise RetrainDue(
                f"index {name!r}: a retrain is due: after adding {len(added)} and removing "
                f"{len(removed)} vectors its recall@10 would be {recall:.4f}, more than "
                f"{RETRAIN_DROP} below the {trained:.4f} it had when trained; run "
                f"'cbir build-index {name}' (without --update); the index was left as it was"
            )
        new = {
            **{k: record.get(k) for k in ("factory", "params", "note")},
            "generation": gen,
            "build_seconds": round(time.perf_counter() - started, 3),
            "built_at": writes.now(),
            "recall_at_10": round(recall, 4),
            "trained_recall": trained if trained is not None else round(recall, 4),
        }
        saved = indexes.save(coll, name, index, new, data)
    except RuntimeError as e:  # FAISS refusing an operation (remove_ids on IVFPQR, say)
        autoindex.discard_unpublished(coll, name, data)
        last = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise CbirError(f"index {name!r} cannot grow ({last}); {rebuild}") from None
    except BaseException:
        autoindex.discard_unpublished(coll, name, data)
        raise
    return {**saved, **counts, "added": len(added), "removed": len(removed), "timings": timings}


def describe_update(record: dict[str, Any]) -> str:
    """One line about an update's outcome (for the CLI and `api.update_indexes`)."""
    trained = record.get("trained_recall")
    return (
        f"updated index {record['name']} ({record['factory']}): added {record['added']}, "
        f"removed {record['removed']}, now {record['ntotal']} vectors, recall@10 "
        f"{record['recall_at_10']:.4f}"
        + (f" (when trained {trained:.4f})" if trained is not None else "")
    )


def empty_copy(path: Path) -> faiss.Index:
    """The trained, empty IVF index of an on-disk index file (its lists are not touched)."""
    index = index_files.read(path, ondisk=True)
    ivf = faiss.extract_index_ivf(index)
    lists = faiss.ArrayInvertedLists(ivf.nlist, ivf.code_size)
    ivf.replace_invlists(lists, True)
    lists.this.disown()  # the index owns it now
    ivf.ntotal = index.ntotal = 0
    return index


def grow_ondisk(
    coll,
    name: str,
    factory: str,
    current: faiss.Index,
    path: Path,
    added: np.ndarray,
    removed: np.ndarray,
    how: shards.Sharding,
) -> tuple[faiss.Index, Path, dict[str, Any]]:
    """A new on-disk index: [the live `current`, a shard of `added`] merged into a new .ivfdata,
    then `removed` taken out of that new file. The live files are only read."""
    tag = index_files.new_tag()
    trained = shards.temp_path(coll.index_dir, name, tag, "trained")
    timings: dict[str, Any] = {}
    try:
        shards.write_temp(empty_copy(path), trained)
    except BaseException:
        index_files.remove_files([trained])
        raise
    merged, data = shards.merge_shards(
        coll, name, tag, factory, trained, [current], added, how, timings
    )
    try:
        if len(removed):
            with index_files.quiet():
                merged.remove_ids(np.asarray(removed, dtype=np.int64))
        shards.fsync_data(data)
    except BaseException:
        index_files.remove_files([data])
        raise
    return merged, data, timings
