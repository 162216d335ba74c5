"""The Python API; the CLI is a thin shell over these functions.

Every function takes the same keyword options as the CLI flags (catalog,
index_dir, weights, k, index, ...), merged over a config file (`config=`),
CBIR_* variables and the defaults, exactly as the CLI merges them.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import catalog, collection, config, indexes, jobs, rerank, vectors
from pipeline import search as search_mod
from pipeline.config import DEFAULTS, load_settings
from pipeline.decode import DecodeError, decode_file
from pipeline.embed import Embedder, describe_mismatch, fingerprint_json, load_embedder
from pipeline.errors import CbirError
from pipeline.scan import scan


@functools.lru_cache(maxsize=4)
def cached_embedder(weights: str, batch_size: int, pooling: str = "avg") -> Embedder:
    """Load a model once per process (the CLI, a server and tests reuse it)."""
    return load_embedder(weights, batch_size, pooling)


def settings_for(config: str | None = None, **options: Any) -> dict[str, Any]:
    return load_settings(config, options)


def weights_for(s: dict[str, Any]) -> str:
    """The weights to use: as given, or, when left at the default, the file the catalog was built with.

    So `cbir search q.jpg` after `cbir index --weights FILE` needs no --weights.
    """
    weights = str(s["weights"])
    if weights != DEFAULTS["weights"] or not os.path.exists(s["catalog"]):
        return weights
    recorded = catalog.get_meta(catalog.open_reader(s["catalog"]), "weights_source")
    return recorded if recorded and os.path.isfile(recorded) else weights


def pooling_for(s: dict[str, Any]) -> str:
    """The pooling asked for; left at the default, the one the catalog was built with."""
    pooling = str(s["pooling"])
    if pooling != DEFAULTS["pooling"] or not os.path.exists(s["catalog"]):
        return pooling
    stored = catalog.fingerprint(catalog.open_reader(s["catalog"])) or {}
    return "gem" if str(stored.get("pooling", "")).startswith("gem") else pooling


def embedder_for(s: dict[str, Any]) -> Embedder:
    return cached_embedder(weights_for(s), int(s["batch_size"]), pooling_for(s))


def index(
    paths: list[str | Path],
    config: str | None = None,
    progress=None,
    on_total=None,
    **options: Any,
) -> jobs.Summary:
    """Index image folders, files or manifest CSVs into the catalog; incremental."""
    s = settings_for(config, **options)
    paths = list(paths) or list(s.get("roots", []))
    if not paths:
        raise CbirError("give at least one folder, image or manifest CSV (or 'roots' in a config)")
    return jobs.run_index(
        [str(p) for p in paths],
        s["catalog"],
        s["index_dir"],
        lambda: embedder_for(s),
        s,
        progress=progress,
        on_total=on_total,
    )


def _query_embedder(db, s: dict[str, Any]) -> Embedder:
    embedder = embedder_for(s)
    stored = catalog.fingerprint(db)
    if stored and fingerprint_json(stored) != fingerprint_json(embedder.fingerprint):
        raise CbirError(
            "the query model differs from the one that built the catalog "
            f"({describe_mismatch(stored, embedder.fingerprint)}); pass the catalog's --weights"
        )
    return embedder


def _expand_queries(queries: list[str | int]) -> list[str | int]:
    """Folders become their image files (sorted); ids and files stay."""
    out: list[str | int] = []
    for q in queries:
        if isinstance(q, int | np.integer):
            out.append(config.check("id", int(q), spec=config.ID))
        elif os.path.isdir(q):
            out.extend(f.path for f in scan([q], labels="none"))
        elif not os.path.exists(q):
            raise CbirError(f"query not found: {q}")
        else:
            out.append(os.path.abspath(q))
    return out


def _known_ids(db, ids) -> np.ndarray:
    ids = [int(i) for i in ids]
    rows = catalog.lookup(db, ids)
    missing = [i for i in ids if i not in rows or rows[i]["status"] != "indexed"]
    if missing:
        raise CbirError(f"feedback names ids that are not indexed: {missing[:5]}")
    return np.asarray(ids, dtype=np.int64)


def search(queries: list[str | int] | str | int, config: str | None = None, **options: Any):
    """Top-k results for image files, folders of images, or catalog ids.

    Returns one dict per query: {"query", "query_id", "results": [...]} and,
    for an image that cannot be decoded, "error" instead of results.
    Options beyond the settings: `params` (search parameters), `allow_stale`,
    `relevant` / `not_relevant` (ids marked by the user: Rocchio feedback).
    Settings `rerank` ("dba", "aqe", "dba+aqe") and `shortlist` re-rank.
    """
    s = settings_for(config, **options)
    if isinstance(queries, str | int | Path):
        queries = [queries]
    db = collection.open_reader(s["catalog"])
    dim = catalog.dimension(db)
    if not dim:
        raise CbirError(f"catalog {s['catalog']} has no indexed images yet")
    index_obj, _, in_force = indexes.load(
        db,
        s["catalog"],
        s["index_dir"],
        s["index"],
        params=indexes.parse_params(options.get("params")),
        allow_stale=bool(options.get("allow_stale")),
    )
    expanded = _expand_queries([str(q) if isinstance(q, Path) else q for q in queries])
    answers: list[dict[str, Any]] = []
    vecs: list[np.ndarray] = []
    pixels, pixel_slots = [], []
    for q in expanded:
        if isinstance(q, int):
            rows = catalog.lookup(db, [q])
            if q not in rows or rows[q]["status"] != "indexed":
                raise CbirError(f"no indexed image with id {q}")
            answers.append({"query": rows[q]["path"], "query_id": q})
            vecs.append(
                vectors.read(vectors.vectors_path(s["catalog"]), dim, catalog.next_id(db), [q])[0]
            )
            continue
        answers.append({"query": q, "query_id": None})
        try:
            pixels.append(decode_file(q, int(s["max_pixels"])).pixels)
            pixel_slots.append(len(vecs))
            vecs.append(np.zeros(dim, dtype=np.float32))
        except DecodeError as e:
            answers[-1]["error"] = f"cannot use query image {q}: {e}"
            vecs.append(None)
    if pixels:
        embedded = _query_embedder(db, s).embed(np.stack(pixels))
        for slot, v in zip(pixel_slots, embedded, strict=True):
            vecs[slot] = v
    good = [i for i, v in enumerate(vecs) if v is not None]
    relevant, not_relevant = options.get("relevant") or [], options.get("not_relevant") or []
    if relevant or not_relevant:
        lookup = search_mod.catalog_lookup(db, s["catalog"])
        for i in good:
            vecs[i] = rerank.rocchio(
                vecs[i], lookup(_known_ids(db, relevant)), lookup(_known_ids(db, not_relevant))
            )
    if good:
        found = search_mod.search_vectors(
            db,
            s["catalog"],
            index_obj,
            np.stack([vecs[i] for i in good]),
            int(s["k"]),
            how=search_mod.rerank_from(s),
            refine=int(in_force.get("refine", 1)),
        )
        for i, results in zip(good, found, strict=True):
            answers[i]["results"] = results
    for a in answers:
        a.setdefault("results", [])
    return answers


def build_index(
    name: str,
    factory: str | None = None,
    params: list[str] | dict[str, float] | None = None,
    auto: bool = False,
    max_memory: str | int = "2GB",
    target_recall: float | None = None,
    config: str | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Build (or refresh, reusing its factory and parameters) a named index.

    auto=True chooses the factory for the collection size and `max_memory`
    and tunes nprobe / efSearch to `target_recall` (default 0.95). Every build
    measures recall@10 against exact search and records it in the catalog.
    """
    from pipeline import autoindex

    s = settings_for(config, **options)
    with catalog.write_lock(s["catalog"]):
        db = collection.open_writer(s["catalog"], create=False)
        previous = catalog.index_record(db, name)
        note = None
        parsed = indexes.parse_params(params)
        if auto:
            if factory:
                raise CbirError("give either --factory or --auto, not both")
            choice = autoindex.choose(
                len(catalog.indexed_ids(db)),
                catalog.dimension(db),
                autoindex.parse_size(max_memory),
            )
            factory, note = choice.factory, choice.reason
            parsed = {**choice.params, **parsed}
            target_recall = target_recall or 0.95
        elif factory is None:
            if name == indexes.EXACT:
                factory = indexes.EXACT_FACTORY
            elif previous is None:
                raise CbirError(
                    f"index {name!r} does not exist yet: give --factory (e.g. 'IVF256,Flat') or --auto"
                )
            else:
                factory, note = previous["factory"], previous.get("note")
        if name == indexes.EXACT and factory != indexes.EXACT_FACTORY:
            raise CbirError("the name 'exact' is reserved for the flat index; pick another name")
        if not parsed and previous and previous["factory"] == factory:
            parsed = json.loads(previous["params"] or "{}")
        return indexes.build_and_save(
            db, s["catalog"], s["index_dir"], name, factory, parsed, target_recall, note
        )


def info(config: str | None = None, **options: Any) -> dict[str, Any]:
    """Counts by status and label, fingerprint, indexes (with staleness), last run."""
    from pipeline.checks import collection_info

    s = settings_for(config, **options)
    return collection_info(s["catalog"], s["index_dir"])


def verify(config: str | None = None, repair: bool = False, **options: Any) -> dict[str, Any]:
    """Check catalog, vector file and indexes against each other.

    repair=True first takes the write lock and repairs what can be repaired
    (migrates an old schema, drops rows left by a torn commit or whose vectors
    are gone or fail their checksum, cuts uncommitted vector bytes); the
    report's "repaired" lists what was done.
    """
    from pipeline.checks import verify_collection

    s = settings_for(config, **options)
    done: list[str] = []
    if repair:
        with catalog.write_lock(s["catalog"]):
            db = catalog.open_writer(s["catalog"], create=False)
            done = collection.repair(db, s["catalog"])
            bad = collection.damaged_ids(db, s["catalog"])
            if bad:
                catalog.delete_rows(db, bad)
                done.append(
                    f"dropped {len(bad)} images whose vectors fail their checksum (ids {bad[:5]}); "
                    "the next 'cbir index' embeds them again"
                )
            db.conn.close()
    report = verify_collection(s["catalog"], s["index_dir"])
    report["repaired"] = done
    return report


def evaluate(
    queries: str | None = None,
    leave_one_out: bool = False,
    method: str = "resnet50",
    hybrid_weight: float = 0.5,
    config: str | None = None,
    **options: Any,
) -> dict[str, Any]:
    """mAP, P@1, P@10 and a per-class table of the catalog against labelled queries.

    `queries` is a manifest CSV (its split=query rows) or a folder of labelled
    images; or pass leave_one_out=True. `index` (an approximate index name)
    adds its recall@10 against exact search; `rerank` re-ranks as in search.
    """
    from pipeline.evaluation import evaluate as run_evaluation

    s = settings_for(config, **options)

    def embed(pixels: np.ndarray) -> np.ndarray:
        db = catalog.open_reader(s["catalog"])
        return _query_embedder(db, s).embed(pixels)

    index_name = s["index"] if s["index"] != indexes.EXACT else None
    return run_evaluation(s, queries, leave_one_out, method, index_name, hybrid_weight, embed)


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
    from pipeline.train import train as run_training

    s = settings_for(config, **options)
    s["weights"] = weights_for(s)
    return run_training(
        s, out, epochs=epochs, val_fraction=val_fraction, seed=seed, learning_rate=learning_rate
    )
