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

    model: Any  # outputs (n, 2048) for "avg" pooling, (n, 7, 7, 2048) for "gem"
    fingerprint: dict[str, Any]
    batch_size: int = 32
    source: str = "imagenet"  # what --weights named: "imagenet" or an absolute file path
    pooling: str = "avg"

    def embed(self, pixels: np.ndarray) -> np.ndarray:
        """(n, 224, 224, 3) uint8 RGB -> (n, 2048) float32, each row of unit length."""
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


def preprocess(pixels: np.ndarray) -> np.ndarray:
    """uint8 RGB -> float32 BGR minus the ImageNet mean (Keras' ResNet50 preprocess_input)."""
    return pixels[..., ::-1].astype(np.float32) - _BGR_MEAN


GEM_P = 3.0


def gem(feature_maps: np.ndarray, p: float = GEM_P) -> np.ndarray:
    """Generalised-mean pooling (Radenovic et al.): (mean x^p)^(1/p) over positions.

    p = 1 is average pooling; larger p leans towards max pooling, which
    favours the strongest local evidence of each channel.
    """
    x = np.clip(feature_maps, 1e-6, None).astype(np.float64)
    return (np.mean(x**p, axis=(1, 2)) ** (1.0 / p)).astype(np.float32)


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


POOLINGS = ("avg", "gem")


def _build_resnet50(weights: str, pooling: str = "avg"):
    """Keras ResNet50 without its classifier; GeM pools in numpy from the 7x7 maps."""
    keras = import_keras()
    if weights != "imagenet" and not Path(weights).is_file():
        raise CbirError(f"weights file not found: {weights}")
    try:
        return keras.applications.ResNet50(
            weights=weights,
            include_top=False,
            pooling="avg" if pooling == "avg" else None,
            input_shape=(224, 224, 3),
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


def load_embedder(
    weights: str = "imagenet", batch_size: int = 32, pooling: str = "avg"
) -> Embedder:
    """Build ResNet50 (no top; average or GeM pooling) with ImageNet or local weights."""
    if pooling not in POOLINGS:
        raise CbirError(f"unknown pooling {pooling!r}: use {' or '.join(POOLINGS)}")
    model = _build_resnet50(str(weights), pooling)
    fingerprint = {
        "architecture": "keras.applications.ResNet50(include_top=False)",
        "pooling": "avg" if pooling == "avg" else f"gem-p{GEM_P:g}",
        "weights_sha256": weights_digest(model),
        "preprocessing": PREPROCESSING + ",caffe-bgr-mean",
        "dimension": DIM,
        "normalization": "l2",
    }
    source = "imagenet" if str(weights) == "imagenet" else os.path.abspath(weights)
    return Embedder(model, fingerprint, batch_size, source, pooling)


def fingerprint_json(fingerprint: dict[str, Any]) -> str:
    return json.dumps(fingerprint, sort_keys=True)


def describe_mismatch(stored: dict[str, Any], current: dict[str, Any]) -> str:
    """Name the fields that differ between two fingerprints, for error messages."""
    keys = sorted(k for k in set(stored) | set(current) if stored.get(k) != current.get(k))
    return ", ".join(
        f"{k}: catalog {stored.get(k)!s:.16} vs model {current.get(k)!s:.16}" for k in keys
    )
