"""The OpenVINO model files: their cache key, conversion from Keras, int8 quantisation, kept copies.

The network is converted in-process from the Keras model that `runtime_keras`
builds from the same weights (so the family fingerprint, weights digest
included, is the Keras one), with the caffe preprocessing (RGB->BGR, minus
the ImageNet mean) folded into the graph: it takes uint8 RGB pixels as they
come from `decode`. int8 is NNCF post-training quantisation on caller-chosen
calibration images (`calibration`).

The converted model goes into the model cache (`modelcache`); when its entry
is present, building an embedder imports neither TensorFlow nor NNCF. An int8
model is also kept beside its catalog (`keep`, in the catalog's own
`ModelCache`) and loaded from there first, so a catalog never needs its
calibration images again, nor the same NNCF or OpenVINO version.

Apart from `runtime_openvino` (which compiles and runs the model) because
this is the part that makes and finds the files: `model_entry` hands the
runtime a verified cache entry, built here on first use.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import shutil
import time
import warnings
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import files
from pipeline.config import Settings
from pipeline.embed import runtime_keras
from pipeline.embed.calibration import Calibration, check_images
from pipeline.embed.descriptor import Descriptor
from pipeline.embed.interface import BGR_MEAN
from pipeline.embed.modelcache import MANIFEST, Entry, ModelCache, file_sha256, make_key
from pipeline.errors import CbirError
from pipeline.inputs.decode import DecodeError, decode_file

log = logging.getLogger("cbir")

# Bumped whenever the conversion below changes what is saved: part of the cache key.
CONVERSION = 1
MODEL_FILE = "model.xml"  # and model.bin beside it


def import_openvino():
    """openvino, or a one-line CbirError saying how to install it."""
    try:
        import openvino
    except ImportError:
        raise CbirError(
            "the OpenVINO runtime is not installed: pip install -e '.[openvino]'"
        ) from None
    return openvino


# -- the cache key's ingredients, computed without TensorFlow


def weights_id(weights: str) -> str:
    """What identifies the weights for the cache key: "imagenet" or the file's sha256.

    The fingerprint's `weights_sha256` (a digest of the weight values) needs
    TensorFlow to compute, so it is stored in the cache entry instead.
    """
    if weights == "imagenet":
        return "imagenet"  # Keras' published file, checked against its hash on download
    files.require_regular(weights, "weights", files.WEIGHTS_MAX)  # no FIFO, no device
    return "sha256:" + file_sha256(Path(weights))


def cache_parts(
    weights: str, pooling: str, precision: str, calibration: str | None
) -> dict[str, Any]:
    """Everything that decides the converted files (bf16 shares the fp32 model: it is a compile option)."""
    ov = import_openvino()
    parts = {
        "model": "keras.applications.ResNet50(include_top=False)",
        "weights": weights_id(weights),
        "pooling": pooling,
        "precision": "int8" if precision == "int8" else "fp32",
        "runtime": "openvino",
        "runtime_version": ov.__version__,
        "conversion": CONVERSION,
        "calibration": calibration if precision == "int8" else None,
    }
    if precision == "int8":
        try:  # another NNCF may quantise differently
            parts["nncf"] = metadata.version("nncf")
        except metadata.PackageNotFoundError:  # a kept model loads without it; _quantize says
            parts["nncf"] = None
    return parts


# -- conversion (needs TensorFlow; runs only when the cache lacks the entry)


def _with_preprocessing(model: Any) -> Any:
    """Fold Keras' caffe preprocessing into the graph: uint8 RGB in, as `decode` gives.

    Measured a little faster than numpy's (and a quarter of the bytes per request).
    """
    ov = import_openvino()
    from openvino.preprocess import PrePostProcessor

    ppp = PrePostProcessor(model)
    ppp.input().tensor().set_element_type(ov.Type.u8).set_layout(ov.Layout("NHWC"))
    ppp.input().model().set_layout(ov.Layout("NHWC"))
    steps = ppp.input().preprocess().convert_element_type(ov.Type.f32).reverse_channels()
    steps.mean([float(m) for m in BGR_MEAN])
    return ppp.build()


def _calibration_pixels(paths: list[str]) -> list[np.ndarray]:
    """Decoded calibration images, one (1, 224, 224, 3) uint8 batch each; undecodable ones skipped."""
    batches = []
    for path in paths:
        try:
            batches.append(decode_file(path, Settings.max_pixels).pixels[None])
        except DecodeError:
            continue
    if len(batches) < min(len(paths), 10):
        raise CbirError(f"only {len(batches)} of {len(paths)} calibration images could be decoded")
    return batches


def _quantize(model: Any, paths: list[str]) -> tuple[Any, int]:
    """(NNCF post-training int8 model, images used); its progress bars kept off the terminal.

    NNCF measured deterministic: the same images in the same order give the same
    model.bin, byte for byte (model.xml differs only in generated node names).
    """
    try:
        import nncf
    except ImportError:
        raise CbirError("int8 needs NNCF: pip install -e '.[openvino]'") from None
    batches = _calibration_pixels(paths)
    nncf.set_log_level(logging.ERROR)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        quantized = nncf.quantize(model, nncf.Dataset(batches), subset_size=len(batches))
    return quantized, len(batches)


def _convert(
    folder: Path,
    weights: str,
    pooling: str,
    precision: str,
    calibration: Calibration | None,
    any_size: bool = False,
) -> dict[str, Any]:
    """Build the Keras model, convert (and quantise) it, save it into `folder`; return the metadata.

    any_size: a model of any input height and width with feature maps out.
    """
    ov = import_openvino()
    # Checked before the (slow) conversion: missing or changed images fail at once.
    paths = check_images(calibration) if precision == "int8" and calibration else []
    log.info("converting ResNet50 to OpenVINO %s, once (cached in %s)", precision, folder.parent)
    started = time.perf_counter()
    if any_size:
        keras_embedder = runtime_keras.load(
            weights, 1, pooling, Descriptor("whole", 224, (1.0,), pooling)
        )
    else:
        keras_embedder = runtime_keras.load(weights, 1, pooling)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Keras 3 warns about the input structure; harmless
        model = _with_preprocessing(ov.convert_model(keras_embedder.model))
    meta: dict[str, Any] = {
        "fingerprint": keras_embedder.fingerprint,
        "conversion_seconds": round(time.perf_counter() - started, 2),
    }
    if precision == "int8":
        started = time.perf_counter()
        model, meta["calibration_images"] = _quantize(model, paths)
        meta["quantization_seconds"] = round(time.perf_counter() - started, 2)
    ov.save_model(model, str(folder / MODEL_FILE), compress_to_fp16=False)
    return meta


# -- finding (or building) the verified entry, and keeping a catalog's copy

# What a kept model's key leaves out: an IR file is read by later runtimes, and
# the kept model is the one the catalog's vectors came from, whatever NNCF does now.
_VERSIONS = ("runtime_version", "nncf")


def _parts(
    weights: str, d: Descriptor, precision: str, calibration: Calibration | None
) -> tuple[dict[str, Any], bool]:
    """(model cache parts, fast path?) for these weights, descriptor and precision."""
    fast = d.classic and d.pooling in ("avg", "gem")
    parts = cache_parts(
        weights, d.pooling if fast else "maps", precision, calibration.id if calibration else None
    )
    if not fast:
        parts["input"] = "any-size"
    return parts, fast


def kept_parts(parts: dict[str, Any]) -> dict[str, Any]:
    """The parts of a model kept beside a catalog: the cache's, runtime versions left out."""
    return {k: v for k, v in parts.items() if k not in _VERSIONS}


def model_entry(
    weights: str,
    d: Descriptor,
    precision: str,
    calibration: Calibration | None,
    cache_dir: str | None,
) -> tuple[Entry, bool]:
    """(the verified cache entry to load, fast path?): the catalog's kept int8 model if
    it is intact, else the model cache's, converted (and quantised) if missing."""
    parts, fast = _parts(weights, d, precision, calibration)
    if calibration is not None and calibration.kept:
        kept = ModelCache(calibration.kept)
        entry = kept.load(kept_parts(parts))
        if entry is not None:
            return entry, fast
        if kept.path(make_key(kept_parts(parts))).exists():
            log.warning(
                "the int8 model kept in %s is damaged; using the model cache", calibration.kept
            )
    entry = ModelCache(cache_dir).get_or_build(
        parts,
        lambda folder: _convert(folder, weights, d.pooling, precision, calibration, not fast),
    )
    return entry, fast


def keep(
    folder: str | Path,
    weights: str,
    precision: str,
    calibration: Calibration,
    descriptor: Descriptor,
    cache_dir: str | None = None,
) -> bool:
    """Keep a copy of this int8 model in `folder` (beside its catalog), if it has none yet.

    Written as a model cache entry (temporary folder, fsync, rename, checksums), so
    the catalog can rebuild nothing and still load its model when the calibration
    images, the model cache or this NNCF are gone. True if a copy was written.
    """
    parts, _ = _parts(str(weights), descriptor, precision, calibration)
    kept = ModelCache(folder)
    if kept.load(kept_parts(parts)) is not None:
        return False
    source = ModelCache(cache_dir).load(parts)
    if source is None:
        return False  # loaded from a damaged kept copy's fallback: kept next time

    def copy(dest: Path) -> dict[str, Any]:
        manifest = json.loads((source.path / MANIFEST).read_text())
        for name, want in manifest["files"].items():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source.path / name, dest / name)
            if file_sha256(dest / name) != want["sha256"]:  # changed while being copied
                raise CbirError(f"model cache entry {source.path} changed while being copied")
        return source.meta

    try:
        kept.get_or_build(kept_parts(parts), copy)
    except (CbirError, OSError) as e:  # the model still runs from the cache: a notice
        log.warning("could not keep the int8 model in %s: %s", folder, e)
        return False
    return True
