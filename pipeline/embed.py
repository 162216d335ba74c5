"""The model: ResNet50 weights, their fingerprint, and pixels -> unit vectors.

TensorFlow is imported only when a model is actually built, so commands that
need no model (search by id, info, verify) start in a fraction of a second.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.decode import PREPROCESSING
from pipeline.errors import CbirError

DIM = 2048
# Keras' "caffe" preprocessing for ResNet50: RGB -> BGR, subtract the ImageNet mean.
_BGR_MEAN = np.array([103.939, 116.779, 123.68], dtype=np.float32)


@dataclass
class Embedder:
    """A loaded model and the fingerprint of what it produces."""

    model: Any
    fingerprint: dict[str, Any]
    batch_size: int = 32
    source: str = "imagenet"  # what --weights named: "imagenet" or an absolute file path

    def embed(self, pixels: np.ndarray) -> np.ndarray:
        """(n, 224, 224, 3) uint8 RGB -> (n, 2048) float32, each row of unit length."""
        n = len(pixels)
        out = np.empty((n, DIM), dtype=np.float32)
        for start in range(0, n, self.batch_size):
            chunk = pixels[start : start + self.batch_size]
            # Pad to a fixed batch so TensorFlow traces the graph once.
            batch = np.zeros((self.batch_size, *chunk.shape[1:]), dtype=np.float32)
            batch[: len(chunk)] = chunk[..., ::-1]
            batch -= _BGR_MEAN
            features = np.asarray(self.model.predict_on_batch(batch))[: len(chunk)]
            out[start : start + len(chunk)] = l2_normalize(features)
        return out


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length, so inner product = cosine similarity."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


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


def _build_resnet50(weights: str):
    keras = import_keras()
    if weights != "imagenet" and not Path(weights).is_file():
        raise CbirError(f"weights file not found: {weights}")
    try:
        return keras.applications.ResNet50(
            weights=weights, include_top=False, pooling="avg", input_shape=(224, 224, 3)
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


def load_embedder(weights: str = "imagenet", batch_size: int = 32) -> Embedder:
    """Build ResNet50 (no top, average pooling) with ImageNet or local weights."""
    model = _build_resnet50(str(weights))
    fingerprint = {
        "architecture": "keras.applications.ResNet50(include_top=False)",
        "pooling": "avg",
        "weights_sha256": weights_digest(model),
        "preprocessing": PREPROCESSING + ",caffe-bgr-mean",
        "dimension": DIM,
        "normalization": "l2",
    }
    source = "imagenet" if str(weights) == "imagenet" else os.path.abspath(weights)
    return Embedder(model=model, fingerprint=fingerprint, batch_size=batch_size, source=source)


def fingerprint_json(fingerprint: dict[str, Any]) -> str:
    return json.dumps(fingerprint, sort_keys=True)


def describe_mismatch(stored: dict[str, Any], current: dict[str, Any]) -> str:
    """Name the fields that differ between two fingerprints, for error messages."""
    keys = sorted(k for k in set(stored) | set(current) if stored.get(k) != current.get(k))
    return ", ".join(
        f"{k}: catalog {stored.get(k)!s:.16} vs model {current.get(k)!s:.16}" for k in keys
    )
