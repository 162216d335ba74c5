"""`build-index`: a named FAISS index built, rebuilt, whitened or grown from the stored vectors.

`update_indexes` grows every stale one after `index --update-indexes`. No model
runs here: an index is made from the vectors the catalog already holds.
"""

from __future__ import annotations

import contextlib
import json
from typing import Any

from pipeline import config, raycluster
from pipeline.api.models import settings_for
from pipeline.errors import CbirError
from pipeline.retrieval import autoindex, factories, growing, index_files, indexes, whitening_fit
from pipeline.retrieval import shards as sharded
from pipeline.retrieval import whitening as wh
from pipeline.store import reads, seals
from pipeline.store.collection import Collection, writing


def build_index(
    name: str,
    factory: str | None = None,
    params: list[str] | dict[str, float] | None = None,
    auto: bool = False,
    max_memory: str | int = config.MAX_MEMORY,
    target_recall: float | None = None,
    config: str | None = None,
    engine: str | None = None,
    shards: int | None = None,
    update: bool = False,
    whiten: bool = False,
    whiten_dim: int | None = None,
    shrinkage: float | None = None,
    whitening: str | None = None,
    validate: str | None = None,
    save_whitening: str | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Build (or refresh, reusing its factory and parameters) a named index.

    auto=True chooses the factory for the collection size and `max_memory`
    and tunes nprobe / efSearch to `target_recall` (default 0.95). Every build
    measures recall@10 against exact search and records it in the catalog.

    `shards` > 1 or engine="ray" build an IVF index in that many shards (Ray
    tasks with "ray", else one after another here) merged into an on-disk
    index; rebuilding an on-disk index keeps it on disk unless shards=1.
    update=True grows an IVF index to the catalog without retraining (see
    `growing.update_and_save`); it raises `growing.RetrainDue` when the
    recall has fallen too far. `ray_address` (a setting) says which cluster.

    whiten=True (or `whitening`, a fitted transform file) builds a PCA-whitened
    index (see `pipeline.retrieval.whitening`): PCA to `whiten_dim` dimensions (default
    512) with `shrinkage` (default 0.5), L2, then the `factory` index (default
    the stored one, else Flat). The transform is validated first (`validate`:
    "labels", a query,relevant CSV, or labels when the catalog has them) and
    refused (CbirError, exit 1) when it lowers the validation mAP.
    `save_whitening` writes the learned transform to a file. Rebuilding a
    whitened index without options whitens it again the same way.
    """
    req = wh.request(whiten, whiten_dim, shrinkage, whitening, validate, save_whitening)
    s = settings_for(config, **options)
    how = sharded.sharding(1 if shards is None else shards, engine or "local", s.ray_address)
    cluster: Any = contextlib.nullcontext()
    if how.engine == "ray" and raycluster.joins(how.address):
        # Join first (bounded), as `index` does: an unreachable address is one line before
        # the catalog is locked or anything is trained; the shard tasks reuse this Ray.
        cluster = raycluster.connected(how.address)
    with cluster, writing(s.catalog, s.index_dir, create=False) as coll:
        try:
            previous = reads.index_record(coll.db, name)
        except seals.DamagedRow:
            if name != indexes.EXACT and (update or not (factory or auto)):
                raise  # what to rebuild cannot be read from it
            previous = None  # built anew from the options given; its record is replaced
        prev_white = wh.split_factory(previous["factory"]) if previous else None
        if update:
            if factory or auto or params or target_recall or req:
                raise CbirError(
                    "--update keeps the index's factory and search parameters: leave out "
                    "--factory, --auto, --param, --target-recall and the whitening options"
                )
            if name == indexes.EXACT:  # a plain copy of the vectors: rebuilding is the update
                return autoindex.build_and_save(coll, name, indexes.EXACT_FACTORY)
            if prev_white:
                raise CbirError(
                    f"index {name!r} is whitened and cannot grow: run 'cbir build-index {name}' "
                    "to rebuild it (its whitening is learned and validated again)"
                )
            return growing.update_and_save(coll, name, how)
        if req is None and factory is None and not auto and prev_white:
            req = wh.from_record(previous)  # a plain rebuild keeps the whitening
        if req is not None and name == indexes.EXACT:
            raise CbirError("the exact index is never whitened: give the whitened index a name")
        note = None
        parsed = factories.parse_params(params)
        white_dim = None
        if req is not None:
            if req.file is not None:
                white_dim = int(wh.read_transform(req.file, coll.dim, req.digest).d_out)
            else:
                white_dim = wh.resolve_dim(req, coll.dim)
        if auto:
            if factory:
                raise CbirError("give either --factory or --auto, not both")
            choice = autoindex.choose(
                len(coll.indexed_ids()), white_dim or coll.dim, autoindex.parse_size(max_memory)
            )
            factory, note = choice.factory, choice.reason
            parsed = {**choice.params, **parsed}
            target_recall = target_recall or 0.95
        elif factory is None:
            if name == indexes.EXACT:
                factory = indexes.EXACT_FACTORY
            elif prev_white:
                factory = prev_white[1]
                note = (wh.read_note(previous.get("note")) or {}).get("chosen")
            elif previous is not None:
                factory, note = previous["factory"], previous.get("note")
            elif req is not None:
                factory = indexes.EXACT_FACTORY
            else:
                raise CbirError(
                    f"index {name!r} does not exist yet: give --factory (e.g. 'IVF256,Flat') or --auto"
                )
        if name == indexes.EXACT and factory != indexes.EXACT_FACTORY:
            raise CbirError("the name 'exact' is reserved for the flat index; pick another name")
        recorded = wh.factory_name(white_dim, factory) if white_dim else factory
        if not parsed and previous and previous["factory"] == recorded:
            parsed = json.loads(previous["params"] or "{}")
        ondisk = how.shards > 1 or how.engine == "ray"
        if ondisk and req is not None:
            raise CbirError("a whitened index is one file: leave out --shards and --engine ray")
        if shards is None and index_files.is_ondisk(previous) and previous["factory"] == recorded:
            ondisk = True  # a rebuild stays on disk
        if ondisk and name == indexes.EXACT:
            raise CbirError("the exact index is one file: leave out --shards and --engine ray")
        plan = None
        if req is not None:
            factories.make_index(factory, white_dim)  # a bad factory is refused before any work
            plan = whitening_fit.plan(coll, req)  # also writes req.save, and records its sha256
        return autoindex.build_and_save(
            coll, name, factory, parsed, target_recall, note, how if ondisk else None, plan
        )


def update_indexes(coll: Collection) -> list[str]:
    """Grow every stale approximate index of `coll` (open for writing) to the catalog.

    One line per index tried: updated (with counts and recall), retrain due,
    or not updatable (and why); an index that cannot grow is left as it was.
    The exact index is not among them: `cbir index` rebuilds it itself.
    """
    if not coll.writer:
        raise CbirError("updating indexes needs the collection open for writing")
    lines: list[str] = []
    for record in reads.index_records(coll.db, check=False):
        name = record["name"]
        if not record.pop("intact"):  # not updated: nothing in it can be trusted
            lines.append(seals.record_damage_text([name]))
            continue
        if name == indexes.EXACT or not indexes.is_stale(coll, record):
            continue
        try:
            lines.append(growing.describe_update(growing.update_and_save(coll, name)))
        except growing.RetrainDue as e:
            lines.append(str(e))
        except CbirError as e:
            lines.append(f"index {name!r} not updated: {e}")
    return lines
