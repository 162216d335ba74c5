"""Which model a command uses, loaded once per process.

The weights and descriptor (as given, or the catalog's own), the runtime and
precision ("auto": the catalog's, else the fastest here), the int8 calibration
images, and `cached_embedder`, the one place the API loads a model. Every other
API module asks `embedder_for` or `model_loader`, so the name is looked up here
only: a test that patches `pipeline.api.models.cached_embedder` stands in for
every model the API loads. Also the settings and the collection every call opens.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.config import DEFAULTS, Settings, load_settings
from pipeline.embed import cpu, descriptor, openvino_convert
from pipeline.embed.calibration import Calibration, choose_calibration
from pipeline.embed.descriptor import Descriptor, scales_text
from pipeline.embed.interface import Embedder
from pipeline.embed.loading import load_embedder
from pipeline.embed.modelcache import file_sha256
from pipeline.errors import CbirError
from pipeline.inputs.scan import scan
from pipeline.store import reads
from pipeline.store.collection import Collection, reading

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
        recorded = reads.get_meta(coll.db, "weights_source")
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
            precision = cpu.fast_precisions()[0]
    return runtime, precision


def _best_runtime() -> str:
    if importlib.util.find_spec("openvino") is not None:
        return "openvino"
    log.warning("OpenVINO is not installed, so the model runs on Keras (about 4x slower): "
                "pip install -e '.[openvino]'")  # fmt: skip
    return "keras"


def calibration_for(s: Settings, coll: Collection | None, todo: list[str]):
    """int8 calibration (`calibration.Calibration`): a folder the user names, else the
    catalog's recorded one, else a seeded sample of the images being indexed (or of the
    catalog's).

    A recorded calibration is named by the id recorded in the catalog's producer, so its
    model (kept beside the catalog, or in the model cache) loads without reading an
    image; its image paths are only read if the model must be built again. A folder
    (`--calibration DIR`) holding the recorded images (moved, say) gives them back by
    content; any other folder calibrates a new model on its images.
    """
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
        todo = [r["path"] for r in reads.lookup(coll.db, coll.indexed_ids()).values()]
    if not todo:
        raise CbirError(
            "int8 needs calibration images: index some first, or pass --calibration DIR"
        )
    return Calibration.of(choose_calibration(todo), kept)


def _recorded_among(coll: Collection, paths: list[str]) -> tuple[str, ...] | None:
    """The catalog's recorded calibration images found by content among `paths`, in their
    recorded order (the order they were quantised in); None unless every one is there.

    Their sizes and sha256s are the catalog's rows of the recorded paths; only files of a
    wanted size are read. `openvino_convert` checks the result against the recorded id.
    """
    rows = reads.rows_by_path(coll.db)
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
    A writer keeps a copy of an int8 model beside the catalog (`openvino_convert.keep`), so
    the catalog never needs its calibration images, nor the model cache, again.
    """
    args = embedder_args(s, coll, batch_size, todo)
    embedder = cached_embedder(*args)
    calibration = args[5]
    coll.check_embedder(embedder, s.allow_mixed, list(calibration.paths) if calibration else [])
    if coll.writer and args[3] == "openvino" and args[4] == "int8":
        openvino_convert.keep(coll.models_dir, args[0], "int8", calibration, args[6])
    return embedder


def model_loader(s: Settings, coll: Collection, todo: list[str] = ()) -> Callable[[], Embedder]:
    """`cached_embedder` bound to this catalog's model arguments (`embedder_args`), unloaded:
    what a Ray actor calls to build the very model the driver checked against the catalog."""
    return functools.partial(cached_embedder, *embedder_args(s, coll, todo=todo))
