"""The same ResNet50 run by OpenVINO: fp32, bf16 or int8, converted once and cached on disk.

The network is converted in-process from the Keras model that `embed_keras`
builds from the same weights (so the family fingerprint, weights digest
included, is the Keras one), with the caffe preprocessing (RGB->BGR, minus
the ImageNet mean) folded into the graph: it takes uint8 RGB pixels as they
come from `decode`. Average pooling is in the graph; GeM is computed in
numpy from the 7x7 maps with `embed.gem`, exactly as `embed_keras` does.
int8 is NNCF post-training quantisation on caller-chosen calibration images.

The converted model goes into the model cache (`modelcache`); when its entry
is present, building an embedder imports neither TensorFlow nor NNCF, and
OpenVINO's own compiled-model cache (CACHE_DIR, beside it) skips most of the
compilation too.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import math
import os
import threading
import time
import warnings
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import cpu
from pipeline.decode import PREPROCESSING
from pipeline.descriptor import Descriptor
from pipeline.embed import _BGR_MEAN, DIM, MapsEmbedder, gem, l2_normalize
from pipeline.errors import CbirError
from pipeline.modelcache import ModelCache, file_sha256

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
    if not Path(weights).is_file():
        raise CbirError(f"weights file not found: {weights}")
    return "sha256:" + file_sha256(Path(weights))


def calibration_id(paths: list[str]) -> str:
    """sha256 of the sorted sha256s of the calibration files' contents (order and place free)."""
    try:
        digests = sorted(file_sha256(Path(p)) for p in paths)
    except OSError as e:
        raise CbirError(f"cannot read calibration image {e.filename}: {e.strerror}") from None
    return hashlib.sha256("\n".join(digests).encode()).hexdigest()


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
        except metadata.PackageNotFoundError:
            raise CbirError("int8 needs NNCF: pip install -e '.[openvino]'") from None
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


def _calibration_pixels(paths: list[str]) -> list[np.ndarray]:
    """Decoded calibration images, one (1, 224, 224, 3) uint8 batch each; undecodable ones skipped."""
    from pipeline.config import Settings
    from pipeline.decode import DecodeError, decode_file

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
    """(NNCF post-training int8 model, images used); its progress bars kept off the terminal."""
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
    calibration_paths: list[str] | None,
    any_size: bool = False,
) -> dict[str, Any]:
    """Build the Keras model, convert (and quantise) it, save it into `folder`; return the metadata.

    any_size: a model of any input height and width with feature maps out.
    """
    from pipeline import embed_keras

    ov = import_openvino()
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
        model, meta["calibration_images"] = _quantize(model, calibration_paths or [])
        meta["quantization_seconds"] = round(time.perf_counter() - started, 2)
    ov.save_model(model, str(folder / MODEL_FILE), compress_to_fp16=False)
    return meta


def load(
    weights: str = "imagenet",
    batch_size: int = 32,
    pooling: str = "avg",
    precision: str = "fp32",
    calibration_paths: list[str] | None = None,
    cache_dir: str | None = None,
    descriptor: Descriptor | None = None,
) -> OpenVINOEmbedder | MapsEmbedder:
    """An OpenVINO embedder for these weights; converted on first use, then from the cache.

    int8 needs `calibration_paths` (e.g. `choose_calibration(collection paths)`):
    their contents identify the quantised model, so pass the same ones each time.
    A `descriptor` other than the classic crop (whole images, scales, R-MAC) gets a
    model of any input size with feature maps out, pooled by `descriptor.describe`.
    """
    d = descriptor or Descriptor(pooling=pooling)
    pooling = d.pooling
    fast = d.classic and pooling in ("avg", "gem")
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
    calibration = calibration_id(calibration_paths) if precision == "int8" else None
    cache = ModelCache(cache_dir)
    parts = cache_parts(weights, pooling if fast else "maps", precision, calibration)
    if not fast:
        parts["input"] = "any-size"
    entry = cache.get_or_build(
        parts,
        lambda folder: _convert(
            folder, weights, pooling, precision, calibration_paths, any_size=not fast
        ),
    )
    config = {
        # A batch of 1 is someone waiting for one answer (the server): all cores on one
        # image halves its latency. Otherwise one stream per core or two, kept busy.
        # Inputs of many sizes run one call at a time: LATENCY, all cores on each.
        "PERFORMANCE_HINT": "LATENCY" if batch_size == 1 or not fast else "THROUGHPUT",
        "INFERENCE_PRECISION_HINT": INFERENCE_PRECISION[precision],
        "CACHE_DIR": str(cache.root / "openvino"),
    }
    if threads := os.environ.get("CBIR_THREADS", "").strip():
        # A Ray actor granted N CPUs: N threads, not every core of the node; and no
        # pinning, or every 1-thread actor on a node pins itself to the same core 0
        # (measured: two such processes ran 53 img/s each, together what one ran alone).
        config["INFERENCE_NUM_THREADS"] = max(1, int(threads))
        config["ENABLE_CPU_PINNING"] = False
    try:
        # Compiled from the model object, not the path: OpenVINO then keys its own
        # cache on the model's contents, not on the file's path, size and mtime.
        core = ov.Core()
        compiled = core.compile_model(core.read_model(entry.path / MODEL_FILE), "CPU", config)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CbirError(f"OpenVINO cannot compile {entry.path / MODEL_FILE}: {first}") from None
    producer = {
        "runtime": "openvino",
        "version": ov.__version__,
        "precision": precision,
        "calibration": calibration,
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
