"""The Python API: the CLI, the web server and the benchmarks are clients of these functions.

Every function takes the same keyword options as the CLI flags (catalog,
index_dir, weights, k, index, ...), merged over a config file (`config=`),
CBIR_* variables and the defaults, exactly as the CLI merges them. The
`*_in` variants take an open `Collection` and an embedder instead, for
clients that keep them open (the web server).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import config, errors
from pipeline.config import DEFAULTS, Settings, load_settings
from pipeline.embed import descriptor
from pipeline.embed.descriptor import Descriptor
from pipeline.embed.interface import Embedder, load_embedder
from pipeline.errors import CbirError, NotFoundError
from pipeline.ingest import jobs
from pipeline.inputs.decode import DecodeError, decode_bytes, decode_file
from pipeline.inputs.scan import find, no_images, scan
from pipeline.retrieval import factories, index_files, indexes, ranking, rerank
from pipeline.store import catalog
from pipeline.store.collection import Collection, reading, writing

log = logging.getLogger("cbir")


@functools.lru_cache(maxsize=4)
def cached_embedder(
    weights: str,
    batch_size: int,
    pooling: str = "avg",
    runtime: str = "keras",
    precision: str = "fp32",
    calibration: tuple[str, ...] = (),
    descriptor: Descriptor | None = None,
) -> Embedder:
    """Load a model once per process (the CLI, a server and tests reuse it)."""
    return load_embedder(weights, batch_size, pooling, runtime, precision, calibration, descriptor)


def settings_for(config: str | None = None, **options: Any) -> Settings:
    return load_settings(config, options)


def open_collection(s: Settings) -> Collection:
    """The settings' collection, opened for reading."""
    return reading(s.catalog, s.index_dir)


def model_choice(s: Settings, coll: Collection | None) -> tuple[str, str]:
    """(weights, pooling): as given, or, left at their defaults, the ones the catalog was built with.

    So `cbir search q.jpg` after `cbir index --weights FILE` needs no --weights.
    """
    weights, pooling = s.weights, s.pooling
    if coll is not None:
        recorded = catalog.get_meta(coll.db, "weights_source")
        if weights == DEFAULTS["weights"] and recorded and os.path.isfile(recorded):
            weights = recorded
        stored = str((coll.fingerprint or {}).get("pooling", ""))
        if pooling == DEFAULTS["pooling"] and stored.startswith("gem"):
            pooling = "gem"
    return weights, pooling


def descriptor_for(s: Settings, coll: Collection | None) -> Descriptor:
    """The descriptor (input, image size, scales, pooling): each value as given, or, left at
    its default, the one the catalog was built with (so queries need no flags). A value
    given that differs from the catalog's makes a model the catalog then refuses."""
    from pipeline.embed import descriptor

    d = descriptor.from_fingerprint(coll.fingerprint if coll is not None else None)
    if d is None:
        return descriptor.make(s.input, s.image_size, s.scales, s.pooling)

    def pick(key: str, recorded: Any) -> Any:
        return recorded if getattr(s, key) == DEFAULTS[key] else getattr(s, key)

    return descriptor.make(
        pick("input", d.input),
        pick("image_size", d.size),
        pick("scales", d.scales),
        pick("pooling", d.pooling),
    )


def with_descriptor(s: Settings, coll: Collection | None) -> Settings:
    """Settings whose input, image size, scales and pooling are `descriptor_for`'s."""
    from pipeline.embed.descriptor import scales_text

    d = descriptor_for(s, coll)
    return s.replace(
        input=d.input, image_size=d.size, scales=scales_text(d.scales), pooling=d.pooling
    )


def producer_choice(s: Settings, coll: Collection | None) -> tuple[str, str]:
    """(runtime, precision): as given; "auto" means the catalog's recorded producer, or for a
    new catalog the fastest this machine offers (OpenVINO int8 with VNNI, then bf16, fp32)."""
    recorded = coll.producer if coll is not None else None
    runtime, precision = s.runtime, s.precision
    if runtime == "auto":
        runtime = recorded["runtime"] if recorded else _best_runtime()
    if precision == "auto":
        if recorded and recorded["runtime"] == runtime:
            precision = recorded["precision"]
        elif runtime == "keras":
            precision = "fp32"
        else:
            from pipeline.embed import cpu

            precision = cpu.fast_precisions()[0]
    return runtime, precision


def _best_runtime() -> str:
    import importlib.util

    if importlib.util.find_spec("openvino") is not None:
        return "openvino"
    log.warning("OpenVINO is not installed, so the model runs on Keras (about 4x slower): "
                "pip install -e '.[openvino]'")  # fmt: skip
    return "keras"


def calibration_for(s: Settings, coll: Collection | None, todo: list[str]):
    """int8 calibration (`embed_openvino.Calibration`): a folder the user names, else the
    catalog's recorded one, else a seeded sample of the images being indexed (or of the
    catalog's).

    A recorded calibration is named by the id recorded in the catalog's producer, so its
    model (kept beside the catalog, or in the model cache) loads without reading an
    image; its image paths are only read if the model must be built again. A folder
    (`--calibration DIR`) holding the recorded images (moved, say) gives them back by
    content; any other folder calibrates a new model on its images.
    """
    from pipeline.embed.runtime_openvino import Calibration, choose_calibration

    kept = str(coll.models_dir) if coll is not None else None
    recorded = (coll.producer or {}).get("calibration") if coll is not None else None
    if s.calibration:
        paths = [f.path for f in scan([s.calibration], labels="none")]
        if not paths:
            raise CbirError(f"no calibration images under {s.calibration}")
        found = _recorded_among(coll, paths) if recorded else None
        if found:
            return Calibration(recorded, found, kept)
        return Calibration.of(choose_calibration(paths), kept)
    if recorded:
        return Calibration(recorded, tuple(coll.calibration_paths), kept)
    if not todo and coll is not None:
        todo = [r["path"] for r in catalog.lookup(coll.db, coll.indexed_ids()).values()]
    if not todo:
        raise CbirError(
            "int8 needs calibration images: index some first, or pass --calibration DIR"
        )
    return Calibration.of(choose_calibration(todo), kept)


def _recorded_among(coll: Collection, paths: list[str]) -> tuple[str, ...] | None:
    """The catalog's recorded calibration images found by content among `paths`, in their
    recorded order (the order they were quantised in); None unless every one is there.

    Their sizes and sha256s are the catalog's rows of the recorded paths; only files of a
    wanted size are read. `embed_openvino` checks the result against the recorded id.
    """
    from pipeline.embed.modelcache import file_sha256

    rows = catalog.rows_by_path(coll.db)
    recorded = coll.calibration_paths
    wanted = {p: rows[p]["sha256"] for p in recorded if p in rows and rows[p]["sha256"]}
    if not recorded or len(wanted) != len(recorded):
        return None
    sizes = {rows[p]["size"] for p in recorded}
    by_digest: dict[str, str] = {}
    need = set(wanted.values())
    for path in paths:
        try:
            if os.path.getsize(path) in sizes and (digest := file_sha256(Path(path))) in need:
                by_digest.setdefault(digest, path)
        except OSError:
            continue
    if len(by_digest) != len(need):
        return None
    return tuple(by_digest[wanted[p]] for p in recorded)


def embedder_args(
    s: Settings, coll: Collection, batch_size: int = 0, todo: list[str] = ()
) -> tuple[Any, ...]:
    """The arguments of `cached_embedder` for this catalog's model (see `embedder_for`)."""
    weights, _ = model_choice(s, coll)
    d = descriptor_for(s, coll)
    runtime, precision = producer_choice(s, coll)
    calibration = calibration_for(s, coll, list(todo)) if precision == "int8" else ()
    return (
        weights, batch_size or s.batch_size, d.pooling, runtime, precision, calibration, d,
    )  # fmt: skip


def embedder_for(
    s: Settings, coll: Collection, batch_size: int = 0, todo: list[str] = ()
) -> Embedder:
    """The model for this catalog (weights, pooling, runtime, precision as `model_choice` and
    `producer_choice` pick them), checked against the catalog's family and producer.

    `todo` (the images a job is about to index) seeds int8 calibration on a new catalog.
    A writer keeps a copy of an int8 model beside the catalog (`embed_openvino.keep`), so
    the catalog never needs its calibration images, nor the model cache, again.
    """
    args = embedder_args(s, coll, batch_size, todo)
    embedder = cached_embedder(*args)
    calibration = args[5]
    coll.check_embedder(embedder, s.allow_mixed, list(calibration.paths) if calibration else [])
    if coll.writer and args[3] == "openvino" and args[4] == "int8":
        from pipeline.embed import runtime_openvino as embed_openvino

        embed_openvino.keep(coll.models_dir, args[0], "int8", calibration, args[6])
    return embedder


def index(
    paths: list[str | Path],
    config: str | None = None,
    progress=None,
    on_total=None,
    on_status=None,
    **options: Any,
) -> jobs.Summary:
    """Index image folders, files or manifest CSVs into the catalog; incremental.

    With engine="ray", decoding and the model run on Ray actors (`engine_ray`);
    `on_status(text)` then hears the cluster's state (live actors) now and then.
    """
    s = settings_for(config, **options)
    roots = [str(p) for p in (list(paths) or list(s.roots))]
    if not roots:
        raise CbirError("give at least one folder, image or manifest CSV (or 'roots' in a config)")
    # The options first (cheap), then the scan, every CSV read, before the catalog is
    # opened: bad input touches nothing. Nothing found is refused, except to prune an
    # existing catalog (never silently: the summary counts what was pruned).
    if s.engine == "ray":
        from pipeline import raycluster
        from pipeline.ingest import engine_ray

        raycluster.require()  # before the catalog is touched: one line, nothing written
    if s.weights != DEFAULTS["weights"]:  # a mistyped --weights would leave an empty catalog
        from pipeline import files

        files.require_regular(s.weights, "weights", files.WEIGHTS_MAX)
    exists = os.path.exists(s.catalog)
    found = find(
        roots,
        s.labels,
        s.split,
        allow_empty=s.prune and exists,
        hint="; add --prune to drop what the catalog holds there" if exists else "",
    )
    engine = None
    cluster: Any = contextlib.nullcontext()
    if s.engine == "ray" and raycluster.joins(s.ray_address or None):
        # Join first (bounded): an unreachable address is one line, nothing written.
        # A local Ray is started only when there is something to embed.
        cluster = raycluster.connected(s.ray_address or None)
    with cluster, writing(s.catalog, s.index_dir) as coll:
        s = with_descriptor(s, coll)  # a catalog's recorded descriptor, unless one is given
        if s.engine == "ray":
            # The actors build the very model the driver checked against the catalog:
            # the same cached_embedder arguments, taken after the driver's check.
            def loader(todo: list[str]) -> Callable[[], Embedder]:
                return functools.partial(cached_embedder, *embedder_args(s, coll, todo=todo))

            engine = engine_ray.RayEngine(
                loader, s.ray_address or None, s.actors, on_status, s.actor_cpus
            )
        summary = jobs.run_index(
            roots,
            coll,
            lambda todo: embedder_for(s, coll, todo=todo),
            s,
            progress=progress,
            on_total=on_total,
            engine=engine,
            found=found,
        )
        if s.update_indexes:
            summary.index_notes = update_indexes(coll)
        return summary


@dataclass(frozen=True)
class Upload:
    """An image sent as bytes (a web upload), queried like a file."""

    name: str
    data: bytes


@dataclass(frozen=True)
class Pixels:
    """An image already decoded to model input ((h, w, 3) uint8 as the catalog's descriptor
    decodes it: 224 x 224 for the paper's crop), queried like a file.

    The web server decodes uploads within its memory budget, then lets many
    decoded queries meet in one forward pass.
    """

    name: str
    pixels: np.ndarray


Query = int | str | Upload | Pixels


def _expand_queries(queries: list[Query]) -> list[Query]:
    """Folders become their image files (sorted); ids, files and uploads stay."""
    out: list[Query] = []
    for q in queries:
        if isinstance(q, Upload | Pixels):
            out.append(q)
        elif isinstance(q, int | np.integer):
            out.append(config.check("id", int(q), spec=config.ID))
        elif os.path.isdir(q):
            found = [f.path for f in scan([q], labels="none")]
            if not found:  # an answer with no queries in it would look like "no matches"
                raise no_images([q])
            out.extend(found)
        elif not os.path.exists(q):
            problem = errors.path_problem(q, folder=False)  # a symlink loop, a file on the way
            raise CbirError(f"query {problem}" if problem else f"query not found: {q}")
        else:
            out.append(os.path.abspath(q))
    return out


def _known_ids(coll: Collection, ids) -> np.ndarray:
    ids = [int(i) for i in config.check("relevant", list(ids), spec=config.FEEDBACK_IDS)]
    rows = catalog.lookup(coll.db, ids)
    missing = [i for i in ids if i not in rows or rows[i]["status"] != "indexed"]
    if missing:
        raise CbirError(f"feedback names ids that are not indexed: {missing[:5]}")
    return np.asarray(ids, dtype=np.int64)


def search_in(
    coll: Collection,
    queries: list[Query],
    s: Settings,
    embedder: Callable[[], Embedder],
    params: dict[str, float] | None = None,
    allow_stale: bool = False,
    relevant=(),
    not_relevant=(),
) -> list[dict[str, Any]]:
    """Top-k results of each query (catalog id, image file, upload or decoded pixels).

    Returns one dict per query: {"query", "query_id", "results": [...]} and,
    for an image that cannot be decoded, "error" instead of results.
    `embedder` is called only if some query is an image. `relevant` /
    `not_relevant` are ids the user marked (Rocchio feedback); settings
    `rerank` ("dba", "aqe", "dba+aqe") and `shortlist` re-rank.

    Setting `rotations` ("0,90,180,270"): every image query is also embedded
    turned by each angle (`decode_file` / `decode_bytes` rotate before the crop;
    decoded `Pixels` are turned as the 224 x 224 square), every turned vector
    ranks the collection, and each image keeps its best score
    (`ranking.best_over`): n angles cost n times the query's embedding and search.
    Id queries use their stored vector, unturned.
    """
    if not coll.dim:
        raise CbirError(f"catalog {coll.path} has no indexed images yet")
    index_obj, _, in_force = coll.index(s.index, params, allow_stale)
    angles = config.rotation_angles(s.rotations)
    d = descriptor_for(s, coll)  # images are decoded to the catalog's descriptor input
    answers: list[dict[str, Any]] = []
    # Per answer, its query's vectors (one per angle; an id has one), None if undecodable.
    vecs: list[np.ndarray | None] = []
    pixels, pixel_slots = [], []
    for q in _expand_queries(queries):
        if isinstance(q, int):
            row = catalog.lookup(coll.db, [q]).get(q)
            if row is None or row["status"] != "indexed":
                raise NotFoundError(f"no indexed image with id {q}")
            answers.append({"query": row["path"], "query_id": q})
            vecs.append(coll.checked_vectors([q]))  # a damaged row: one line, not garbage
            continue
        name = q.name if isinstance(q, Upload | Pixels) else q
        answers.append({"query": name, "query_id": None})
        try:
            if isinstance(q, Pixels):
                decoded = [np.rot90(q.pixels, a // 90) for a in angles]
            elif isinstance(q, Upload):
                decoded = [decode_bytes(q.data, s.max_pixels, a, **d.decode).pixels for a in angles]
            else:
                decoded = [decode_file(q, s.max_pixels, a, **d.decode).pixels for a in angles]
        except DecodeError as e:
            answers[-1]["error"] = f"cannot use query image {name}: {e}"
            vecs.append(None)
            continue
        pixels.extend(decoded)
        pixel_slots.append(len(vecs))
        vecs.append(None)
    if pixels:  # every angle of every image query in one call of the model
        embedded = embedder().embed(descriptor.batch(pixels))
        for n, slot in enumerate(pixel_slots):
            vecs[slot] = embedded[n * len(angles) : (n + 1) * len(angles)]
    good = [i for i, v in enumerate(vecs) if v is not None]
    if relevant or not_relevant:
        plus = coll.checked_vectors(_known_ids(coll, relevant))
        minus = coll.checked_vectors(_known_ids(coll, not_relevant))
        for i in good:
            vecs[i] = np.stack([rerank.rocchio(v, plus, minus) for v in vecs[i]])
    if good:
        found = ranking.search_vectors(
            coll,
            index_obj,
            np.concatenate([vecs[i] for i in good]),
            s.k,
            how=ranking.rerank_from(s),
            refine=int(in_force.get("refine", 1)),
            groups=[len(vecs[i]) for i in good] if len(angles) > 1 else None,
        )
        for i, results in zip(good, found, strict=True):
            answers[i]["results"] = results
    for a in answers:
        a.setdefault("results", [])
    return answers


def search(queries: list[Query] | Query | Path, config: str | None = None, **options: Any):
    """Top-k results for image files, folders of images, or catalog ids (see `search_in`).

    Options beyond the settings: `params` (search parameters, e.g.
    ["nprobe=16"]), `allow_stale`, `relevant` / `not_relevant`.
    """
    s = settings_for(config, **options)
    if isinstance(queries, str | int | Path | Upload):
        queries = [queries]
    coll = open_collection(s)
    try:
        return search_in(
            coll,
            [str(q) if isinstance(q, Path) else q for q in queries],
            s,
            lambda: embedder_for(s, coll),
            params=factories.parse_params(options.get("params")),
            allow_stale=bool(options.get("allow_stale")),
            relevant=options.get("relevant") or (),
            not_relevant=options.get("not_relevant") or (),
        )
    finally:
        coll.close()


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
    from pipeline import raycluster
    from pipeline.retrieval import autoindex, growing
    from pipeline.retrieval import shards as sharded
    from pipeline.retrieval import whitening as wh

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
            previous = catalog.index_record(coll.db, name)
        except catalog.DamagedRow:
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
            plan = wh.plan(coll, req)  # also writes req.save, and records its sha256
        return autoindex.build_and_save(
            coll, name, factory, parsed, target_recall, note, how if ondisk else None, plan
        )


def update_indexes(coll: Collection) -> list[str]:
    """Grow every stale approximate index of `coll` (open for writing) to the catalog.

    One line per index tried: updated (with counts and recall), retrain due,
    or not updatable (and why); an index that cannot grow is left as it was.
    The exact index is not among them: `cbir index` rebuilds it itself.
    """
    from pipeline.retrieval import growing

    if not coll.writer:
        raise CbirError("updating indexes needs the collection open for writing")
    lines: list[str] = []
    for record in catalog.index_records(coll.db, check=False):
        name = record["name"]
        if not record.pop("intact"):  # not updated: nothing in it can be trusted
            lines.append(catalog.record_damage_text([name]))
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


def info_in(coll: Collection) -> dict[str, Any]:
    from pipeline.api.checks import collection_info

    return collection_info(coll)


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
    from pipeline.api.checks import verify_collection
    from pipeline.store.collection import drop_damaged

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


def evaluate(
    queries: str | None = None,
    leave_one_out: bool = False,
    method: str = "resnet50",
    hybrid_weight: float = 0.5,
    config: str | None = None,
    groundtruth: str | None = None,
    **options: Any,
) -> dict[str, Any]:
    """mAP, P@1, P@10 and a per-class table of the catalog against labelled queries.

    `queries` is a manifest CSV (its split=query rows) or a folder of labelled
    images; or pass leave_one_out=True. `index` (an approximate index name)
    adds its recall@10 against exact search; `rerank` re-ranks as in search.

    `groundtruth` (a CSV of query,relevant file names of catalog images, as the
    Holidays and UKBench benchmarks give them) instead returns the instance
    figures of `instance_eval.evaluate_instances`: `map` (Holidays protocol),
    `ns_score` (UKBench protocol) and `per_query` with each relevant image's rank.
    """
    from pipeline.evaluation.labels import evaluate as run_evaluation

    s = settings_for(config, **options)
    coll = open_collection(s)
    try:
        s = with_descriptor(s, coll)  # queries decoded to the catalog's descriptor input
        return run_evaluation(
            coll,
            s,
            queries,
            leave_one_out,
            method,
            s.index if s.index != indexes.EXACT else None,
            hybrid_weight,
            lambda pixels: embedder_for(s, coll).embed(pixels),
            groundtruth=str(groundtruth) if groundtruth is not None else None,
        )
    finally:
        coll.close()


def train(
    out: str | Path,
    epochs: int = 15,
    val_fraction: float = 0.2,
    seed: int = 0,
    learning_rate: float = 1e-4,
    config: str | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Fine-tune ResNet50 on the catalog's labelled images; saves `out` (.weights.h5) + `out.json`."""
    from pipeline.evaluation.train import train as run_training

    s = settings_for(config, **options)
    coll = open_collection(s)
    try:
        coll.check_rows()  # it reads every labelled row's path and label
        return run_training(
            coll,
            s.replace(weights=model_choice(s, coll)[0]),
            out,
            epochs=epochs,
            val_fraction=val_fraction,
            seed=seed,
            learning_rate=learning_rate,
        )
    finally:
        coll.close()
