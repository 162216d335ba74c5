"""`index`: images into the catalog, incremental, here or on a Ray cluster.

Its own module because it is the one job that embeds many files: the checks
before the catalog is touched, the Ray engine, and then growing the stale
indexes (`building.update_indexes`) when asked.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline import files, raycluster
from pipeline.api.building import update_indexes
from pipeline.api.models import embedder_for, model_loader, settings_for, with_descriptor
from pipeline.config import DEFAULTS, Settings
from pipeline.embed.interface import Embedder
from pipeline.errors import CbirError
from pipeline.ingest import engine_ray, jobs
from pipeline.inputs.scan import find
from pipeline.store.collection import Collection, writing


def index(
    paths: list[str | Path],
    config: str | None = None,
    progress=None,
    on_total=None,
    on_status=None,
    embedder: Embedder | None = None,
    **options: Any,
) -> jobs.Summary:
    """Index image folders, files or manifest CSVs into the catalog; incremental.

    With engine="ray", decoding and the model run on Ray actors (`engine_ray`);
    `on_status(text)` then hears the cluster's state (live actors) now and then.
    `embedder`: a model already loaded (a server's, `api.session`), checked against the
    catalog like a loaded one, instead of loading another (local engine only).
    """
    s = settings_for(config, **options)
    if embedder is not None and s.engine != "local":
        raise CbirError("a model passed in runs here: leave the engine at 'local'")
    roots = [str(p) for p in (list(paths) or list(s.roots))]
    if not roots:
        raise CbirError("give at least one folder, image or manifest CSV (or 'roots' in a config)")
    # The options first (cheap), then the scan, every CSV read, before the catalog is
    # opened: bad input touches nothing. Nothing found is refused, except to prune an
    # existing catalog (never silently: the summary counts what was pruned).
    if s.engine == "ray":
        raycluster.require()  # before the catalog is touched: one line, nothing written
    if s.weights != DEFAULTS["weights"]:  # a mistyped --weights would leave an empty catalog
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
                return model_loader(s, coll, todo)

            engine = engine_ray.RayEngine(
                loader, s.ray_address or None, s.actors, on_status, s.actor_cpus
            )
        summary = jobs.run_index(
            roots,
            coll,
            (lambda todo: embedder_for(s, coll, todo=todo))
            if embedder is None
            else (lambda todo: _checked(embedder, coll, s)),
            s,
            progress=progress,
            on_total=on_total,
            engine=engine,
            found=found,
        )
        if s.update_indexes:
            summary.index_notes = update_indexes(coll)
        return summary


def _checked(embedder: Embedder, coll: Collection, s: Settings) -> Embedder:
    """A model passed in, held to the catalog's family and producer as `embedder_for` holds
    one it loads."""
    coll.check_embedder(embedder, s.allow_mixed)
    return embedder
