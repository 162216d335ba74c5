"""The reference embedder: Keras ResNet50 (ImageNet weights, no top), average or GeM pooling.

The only module (with `train`, which fine-tunes this network) that imports
TensorFlow, and only when a model is actually built.
"""

from __future__ import annotations

import hashlib
import os
import sys
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline import files
from pipeline.embed.descriptor import GEM_P, Descriptor
from pipeline.embed.interface import (
    DIM,
    KERAS_FP32,
    MapsEmbedder,
    gem,
    l2_normalize,
    preprocess,
)
from pipeline.errors import CbirError
from pipeline.inputs.decode import PREPROCESSING


@dataclass
class KerasEmbedder:
    """A loaded model and the fingerprint of what it produces."""

    model: Any  # outputs (n, 2048) for "avg" pooling, (n, 7, 7, 2048) for "gem"
    fingerprint: dict[str, Any]
    batch_size: int = 32
    source: str = "imagenet"  # what --weights named: "imagenet" or an absolute file path
    pooling: str = "avg"
    producer: dict[str, Any] = field(default_factory=lambda: dict(KERAS_FP32))
    descriptor: Descriptor = field(default_factory=Descriptor)

    def embed(self, pixels: np.ndarray | list[np.ndarray]) -> np.ndarray:
        """(n, 224, 224, 3) uint8 RGB -> (n, 2048) float32, each row of unit length."""
        pixels = np.asarray(pixels)
        n = len(pixels)
        out = np.empty((n, DIM), dtype=np.float32)
        for start in range(0, n, self.batch_size):
            chunk = pixels[start : start + self.batch_size]
            # Pad to a fixed batch so TensorFlow traces the graph once.
            batch = np.zeros((self.batch_size, *chunk.shape[1:]), dtype=np.float32)
            batch[: len(chunk)] = preprocess(chunk)
            features = np.asarray(self.model.predict_on_batch(batch))[: len(chunk)]
            if self.pooling == "gem":
                features = gem(features)
            out[start : start + len(chunk)] = l2_normalize(features)
        return out


def import_keras():
    """Import Keras with TensorFlow's C++ start-up chatter kept off the terminal.

    Some of it (oneDNN notices) is printed before TF_CPP_MIN_LOG_LEVEL is read,
    so stderr is pointed at /dev/null for the duration of the import only.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        sys.stderr.flush()
        os.dup2(devnull, 2)
        import keras
        import tensorflow  # noqa: F401  (its own import prints too)
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
    return keras


def _build_resnet50(weights: str, pooling: str = "avg", any_size: bool = False):
    """Keras ResNet50 without its classifier; GeM pools in numpy from the 7x7 maps.

    any_size: inputs of any height and width, feature maps out (a `Descriptor` pools them).
    """
    if weights != "imagenet":  # a FIFO or a device is refused, not waited on
        files.require_regular(weights, "weights", files.WEIGHTS_MAX)
    keras = import_keras()
    try:
        return keras.applications.ResNet50(
            weights=weights,
            include_top=False,
            pooling="avg" if pooling == "avg" and not any_size else None,
            input_shape=(None, None, 3) if any_size else (224, 224, 3),
        )
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if weights == "imagenet":
            raise CbirError(
                "cannot download the ImageNet weights (no internet?): pass a local weights file "
                f"with --weights PATH or CBIR_WEIGHTS=PATH ({first})"
            ) from None
        raise CbirError(f"cannot load weights from {weights}: {first}") from None


def weights_digest(model) -> str:
    """sha256 of the weight values in layer order.

    Hashing values rather than the file gives the same fingerprint for the
    official download and an equivalent local copy in another file format.
    """
    h = hashlib.sha256()
    for w in model.weights:
        h.update(np.ascontiguousarray(w.numpy(), dtype=np.float32).tobytes())
    return h.hexdigest()


def load(
    weights: str = "imagenet",
    batch_size: int = 32,
    pooling: str = "avg",
    descriptor: Descriptor | None = None,
) -> KerasEmbedder | MapsEmbedder:
    """Build ResNet50 (no top) with ImageNet or local weights, for `descriptor` (default:
    the classic 224 crop with `pooling`, pooled in the model or, for GeM, from its maps)."""
    d = descriptor or Descriptor(pooling=pooling)
    fast = d.classic and d.pooling in ("avg", "gem")
    model = _build_resnet50(str(weights), d.pooling, any_size=not fast)
    fingerprint = {
        "architecture": "keras.applications.ResNet50(include_top=False)",
        "pooling": "avg" if pooling == "avg" else f"gem-p{GEM_P:g}",
        "weights_sha256": weights_digest(model),
        "preprocessing": PREPROCESSING + ",caffe-bgr-mean",
        "dimension": DIM,
        "normalization": "l2",
        **d.fingerprint(),
    }
    source = "imagenet" if str(weights) == "imagenet" else os.path.abspath(weights)
    if fast:
        return KerasEmbedder(model, fingerprint, batch_size, source, d.pooling, descriptor=d)

    def maps(pixels: np.ndarray) -> np.ndarray:
        # Eager: one call per shape, without tracing a graph for every image size.
        return np.asarray(model(preprocess(pixels), training=False))

    return MapsEmbedder(maps, fingerprint, dict(KERAS_FP32), d, batch_size, source, model)
