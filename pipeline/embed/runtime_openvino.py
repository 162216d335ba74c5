"""The same ResNet50 run by OpenVINO: fp32, bf16 or int8, converted once and cached on disk.

This module compiles and runs the model; `openvino_convert` makes its files
(converted from the Keras model of the same weights, with the caffe
preprocessing folded into the graph, so it takes uint8 RGB pixels as they come
from `decode`; int8 quantised by NNCF on a `calibration`) and finds the
verified cache entry to load. Average pooling is in the graph; GeM is computed
in numpy from the 7x7 maps with `interface.gem`, exactly as `runtime_keras`
does. Other descriptors get a model of any input size with feature maps out.

OpenVINO's own compiled-blob cache (CACHE_DIR) is not used: measured here it
saved 0.04-0.21 s per load (compile 0.12-0.42 s) for a 24-94 MB blob per model
and setting that nothing checked, and a damaged blob gave wrong vectors. Every
file a model is loaded from is in a checksummed entry.
"""

from __future__ import annotations

import math
import os
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.embed import cpu
from pipeline.embed.calibration import Calibration, as_calibration
from pipeline.embed.descriptor import Descriptor
from pipeline.embed.interface import DIM, MapsEmbedder, gem, l2_normalize
from pipeline.embed.openvino_convert import MODEL_FILE, import_openvino, model_entry
from pipeline.errors import CbirError
from pipeline.inputs.decode import PREPROCESSING
from pipeline.specs import POOLINGS, env_int

PRECISIONS = ("fp32", "bf16", "int8")
# What each precision asks of the CPU plugin. fp32 is pinned: OpenVINO would
# otherwise pick bf16 by itself on AMX machines. int8's unquantised layers stay f32.
INFERENCE_PRECISION = {"fp32": "f32", "bf16": "bf16", "int8": "f32"}


@dataclass
class OpenVINOEmbedder:
    """A compiled OpenVINO model, the family fingerprint, and what produced the vectors."""

    compiled: Any  # openvino.CompiledModel: uint8 RGB in; (n, 2048) or (n, 7, 7, 2048) out
    fingerprint: dict[str, Any]  # the family: same keys and values as runtime_keras'
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

    int8 needs its calibration: image paths (e.g. `calibration.choose_calibration(collection
    paths)`), whose contents identify the quantised model, or a `Calibration`
    (a catalog's recorded id, its images and its kept model).
    A `descriptor` other than the classic crop (whole images, scales, R-MAC) gets a
    model of any input size with feature maps out, pooled by `descriptor.describe`.
    """
    d = descriptor or Descriptor(pooling=pooling)
    pooling = d.pooling
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
    cal = as_calibration(calibration_paths) if precision == "int8" else None
    entry, fast = model_entry(weights, d, precision, cal, cache_dir)
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
