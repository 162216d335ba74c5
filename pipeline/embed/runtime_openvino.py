"""The same ResNet50 run by OpenVINO: fp32, bf16 or int8, converted once and cached on disk.

The network is converted in-process from the Keras model that `embed_keras`
builds from the same weights (so the family fingerprint, weights digest
included, is the Keras one), with the caffe preprocessing (RGB->BGR, minus
the ImageNet mean) folded into the graph: it takes uint8 RGB pixels as they
come from `decode`. Average pooling is in the graph; GeM is computed in
numpy from the 7x7 maps with `embed.gem`, exactly as `embed_keras` does.
int8 is NNCF post-training quantisation on caller-chosen calibration images.

The converted model goes into the model cache (`modelcache`); when its entry
is present, building an embedder imports neither TensorFlow nor NNCF. An int8
model is also kept beside its catalog (`keep`, in the catalog's own
`ModelCache`) and loaded from there first, so a catalog never needs its
calibration images again, nor the same NNCF or OpenVINO version.

OpenVINO's own compiled-blob cache (CACHE_DIR) is not used: measured here it
saved 0.04-0.21 s per load (compile 0.12-0.42 s) for a 24-94 MB blob per model
and setting that nothing checked, and a damaged blob gave wrong vectors. Every
file a model is loaded from is in a checksummed entry.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import math
import os
import shutil
import threading
import time
import warnings
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import files
from pipeline.config import env_int
from pipeline.embed import cpu
from pipeline.embed.descriptor import Descriptor
from pipeline.embed.interface import _BGR_MEAN, DIM, MapsEmbedder, gem, l2_normalize
from pipeline.embed.modelcache import MANIFEST, Entry, ModelCache, file_sha256, make_key
from pipeline.errors import CbirError
from pipeline.inputs.decode import PREPROCESSING

log = logging.getLogger("cbir")

PRECISIONS = ("fp32", "bf16", "int8")
# Bumped whenever the conversion below changes what is saved: part of the cache key.
CONVERSION = 1
CALIBRATION_SIZE = 300
MODEL_FILE = "model.xml"  # and model.bin beside it
# What each precision asks of the CPU plugin. fp32 is pinned: OpenVINO would
# otherwise pick bf16 by itself on AMX machines. int8's unquantised layers stay f32.
INFERENCE_PRECISION = {"fp32": "f32", "bf16": "bf16", "int8": "f32"}


def import_openvino():
    """openvino, or a one-line CbirError saying how to install it."""
    try:
        import openvino
    except ImportError:
        raise CbirError(
            "the OpenVINO runtime is not installed: pip install -e '.[openvino]'"
        ) from None
    return openvino


@dataclass
class OpenVINOEmbedder:
    """A compiled OpenVINO model, the family fingerprint, and what produced the vectors."""

    compiled: Any  # openvino.CompiledModel: uint8 RGB in; (n, 2048) or (n, 7, 7, 2048) out
    fingerprint: dict[str, Any]  # the family: same keys and values as embed_keras'
    producer: dict[str, Any]  # runtime, version, precision, calibration
    batch_size: int = 32
    source: str = "imagenet"
    pooling: str = "avg"
    descriptor: Descriptor = field(default_factory=Descriptor)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        ov = import_openvino()
        # THROUGHPUT runs one stream per request: keep them all busy at once (LATENCY: 1).
        self.requests = int(self.compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
        self._queue = ov.AsyncInferQueue(self.compiled, self.requests)
        self._queue.set_callback(self._done)
        self._out: np.ndarray | None = None
        self._error: BaseException | None = None

    def _done(self, request: Any, start: int) -> None:
        """Runs on an OpenVINO thread: pool one sub-batch into the output rows."""
        try:
            features = request.get_output_tensor(0).data  # reused by the request: copy out
            if self.pooling == "gem":
                features = gem(features)
            self._out[start : start + len(features)] = l2_normalize(features)
        except BaseException as e:  # raised in embed(), not lost in a C++ thread
            self._error = e

    def embed(self, pixels: np.ndarray | list[np.ndarray]) -> np.ndarray:
        """(n, 224, 224, 3) uint8 RGB -> (n, 2048) float32, each row of unit length."""
        pixels = np.ascontiguousarray(np.asarray(pixels), dtype=np.uint8)
        # Each batch is shared among the parallel requests (dynamic batch: no padding).
        step = max(1, math.ceil(self.batch_size / self.requests))
        with self._lock:  # one queue per model: concurrent callers take turns
            self._out = out = np.empty((len(pixels), DIM), dtype=np.float32)
            self._error = None
            try:
                for start in range(0, len(pixels), step):
                    self._queue.start_async({0: pixels[start : start + step]}, start)
            finally:  # no request may still write into `out` once we return or raise
                self._queue.wait_all()
                self._out = None
            if self._error is not None:
                raise self._error
        return out


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


def calibration_id(paths: list[str]) -> str:
    """sha256 of the sorted sha256s of the calibration files' contents (order and place free)."""
    try:
        digests = [file_sha256(Path(p)) for p in paths]
    except OSError as e:
        raise CbirError(f"cannot read calibration image {e.filename}: {e.strerror}") from None
    return digests_id(digests)


def digests_id(digests: list[str]) -> str:
    """The calibration id of files with these sha256s (`calibration_id` without reading them)."""
    return hashlib.sha256("\n".join(sorted(digests)).encode()).hexdigest()


@dataclass(frozen=True)
class Calibration:
    """What an int8 model is quantised on, and where a copy of the model is kept.

    `id` (`calibration_id` of the images) names the model in every cache key, so a
    catalog's recorded id finds its model without reading an image. `paths` are
    the images to quantise on should the model have to be built (checked against
    `id` first); `kept` is the catalog's own model folder (`keep`), tried first.
    Hashable: it is an argument of `api.cached_embedder`.
    """

    id: str
    paths: tuple[str, ...] = ()
    kept: str | None = None

    @classmethod
    def of(cls, paths: list[str] | tuple[str, ...], kept: str | None = None) -> Calibration:
        """The calibration of these image files (reads each once for its id)."""
        return cls(calibration_id(list(paths)), tuple(paths), kept)


class CalibrationGone(CbirError):
    """An int8 model that is in no cache and whose calibration images are gone or changed."""


def choose_calibration(paths: list[str], n: int = CALIBRATION_SIZE, seed: int = 0) -> list[str]:
    """A deterministic sample of `n` paths: the same collection gives the same choice.

    Ranked by a seeded hash of each path, so the choice depends neither on the
    order the paths come in nor on a random generator's implementation.
    """
    # os.fsencode: a file name that is not UTF-8 is hashed as the bytes it is.
    ranked = sorted(
        set(paths), key=lambda p: hashlib.sha256(f"{seed}:".encode() + os.fsencode(p)).digest()
    )
    return sorted(ranked[:n])


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
    steps.mean([float(m) for m in _BGR_MEAN])
    return ppp.build()


def _check_images(calibration: Calibration) -> list[str]:
    """The calibration's image files, once their contents are checked against its id."""
    hint = (
        "put them back, or pass --calibration DIR (a folder holding them, or other images: "
        "those make a slightly different model, which indexing accepts with --allow-mixed)"
    )
    if not calibration.paths:
        raise CalibrationGone(
            f"the int8 model of calibration {calibration.id[:12]} is in no model cache and its "
            f"calibration images are not recorded: pass --calibration DIR"
        )
    try:
        digests = [file_sha256(Path(p)) for p in calibration.paths]
    except OSError as e:
        raise CalibrationGone(
            f"cannot rebuild the int8 model: calibration image {e.filename} is unreadable "
            f"({e.strerror}; {len(calibration.paths)} recorded); {hint}"
        ) from None
    if digests_id(digests) != calibration.id:
        raise CalibrationGone(
            f"cannot rebuild the int8 model: its {len(calibration.paths)} calibration images "
            f"have changed since it was made; {hint}"
        )
    return list(calibration.paths)


def _calibration_pixels(paths: list[str]) -> list[np.ndarray]:
    """Decoded calibration images, one (1, 224, 224, 3) uint8 batch each; undecodable ones skipped."""
    from pipeline.config import Settings
    from pipeline.inputs.decode import DecodeError, decode_file

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
    from pipeline.embed import runtime_keras as embed_keras

    ov = import_openvino()
    # Checked before the (slow) conversion: missing or changed images fail at once.
    paths = _check_images(calibration) if precision == "int8" and calibration else []
    log.info("converting ResNet50 to OpenVINO %s, once (cached in %s)", precision, folder.parent)
    started = time.perf_counter()
    if any_size:
        keras_embedder = embed_keras.load(
            weights, 1, pooling, Descriptor("whole", 224, (1.0,), pooling)
        )
    else:
        keras_embedder = embed_keras.load(weights, 1, pooling)
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


def _as_calibration(
    calibration: Calibration | list[str] | tuple[str, ...] | None,
) -> Calibration | None:
    """A `Calibration` as given, or that of these image paths (None without any)."""
    if isinstance(calibration, Calibration) or not calibration:
        return calibration or None
    return Calibration.of(calibration)


def _entry(
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


def load(
    weights: str = "imagenet",
    batch_size: int = 32,
    pooling: str = "avg",
    precision: str = "fp32",
    calibration_paths: Calibration | list[str] | None = None,
    cache_dir: str | None = None,
    descriptor: Descriptor | None = None,
) -> OpenVINOEmbedder | MapsEmbedder:
    """An OpenVINO embedder for these weights; converted on first use, then from the cache.

    int8 needs its calibration: image paths (e.g. `choose_calibration(collection
    paths)`), whose contents identify the quantised model, or a `Calibration`
    (a catalog's recorded id, its images and its kept model).
    A `descriptor` other than the classic crop (whole images, scales, R-MAC) gets a
    model of any input size with feature maps out, pooled by `descriptor.describe`.
    """
    d = descriptor or Descriptor(pooling=pooling)
    pooling = d.pooling
    from pipeline.config import POOLINGS

    if pooling not in POOLINGS:
        raise CbirError(f"unknown pooling {pooling!r}: use {', '.join(POOLINGS)}")
    if precision not in PRECISIONS:
        raise CbirError(f"unknown precision {precision!r}: use {', '.join(PRECISIONS)}")
    ov = import_openvino()
    features = cpu.detect()
    if precision == "bf16" and not features.bf16:
        raise CbirError(
            f"bf16 needs a CPU with AVX512-BF16 or AMX, not this {features.model}: use fp32 or int8"
        )
    if precision == "int8" and not calibration_paths:
        raise CbirError("int8 needs calibration images (a few hundred from the collection)")
    weights = str(weights)
    cal = _as_calibration(calibration_paths) if precision == "int8" else None
    entry, fast = _entry(weights, d, precision, cal, cache_dir)
    config = {
        # A batch of 1 is someone waiting for one answer (the server): all cores on one
        # image halves its latency. Otherwise one stream per core or two, kept busy.
        # Inputs of many sizes run one call at a time: LATENCY, all cores on each.
        "PERFORMANCE_HINT": "LATENCY" if batch_size == 1 or not fast else "THROUGHPUT",
        "INFERENCE_PRECISION_HINT": INFERENCE_PRECISION[precision],
    }
    if threads := env_int("CBIR_THREADS"):  # checked: a whole number from 1
        # A Ray actor granted N CPUs: N threads, not every core of the node; and no
        # pinning, or every 1-thread actor on a node pins itself to the same core 0
        # (measured: two such processes ran 53 img/s each, together what one ran alone).
        config["INFERENCE_NUM_THREADS"] = max(1, int(threads))
        config["ENABLE_CPU_PINNING"] = False
    try:
        # From the model object read out of the verified entry; no CACHE_DIR (see above).
        core = ov.Core()
        compiled = core.compile_model(core.read_model(entry.path / MODEL_FILE), "CPU", config)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CbirError(f"OpenVINO cannot compile {entry.path / MODEL_FILE}: {first}") from None
    producer = {
        "runtime": "openvino",
        "version": ov.__version__,
        "precision": precision,
        "calibration": cal.id if cal else None,
    }
    source = "imagenet" if weights == "imagenet" else os.path.abspath(weights)
    # The cached model serves every descriptor of its kind: its stored fingerprint's
    # descriptor fields are replaced by this descriptor's.
    base = {k: v for k, v in entry.meta["fingerprint"].items() if k not in ("input", "scales")}
    base["preprocessing"] = PREPROCESSING + ",caffe-bgr-mean"
    fingerprint = {**base, **d.fingerprint()}
    if fast:
        return OpenVINOEmbedder(
            compiled, fingerprint, producer, batch_size, source, pooling, descriptor=d
        )
    lock = threading.Lock()

    def maps(pixels: np.ndarray) -> np.ndarray:
        with lock:  # one compiled model, callers from many threads take turns
            return np.array(compiled({0: np.ascontiguousarray(pixels, dtype=np.uint8)})[0])

    return MapsEmbedder(maps, fingerprint, producer, d, batch_size, source)
