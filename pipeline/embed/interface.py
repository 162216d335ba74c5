"""The embedder interface: pixels in, unit vectors out, with a fingerprint of what made them.

Implementations are chosen by name (`loading.load_embedder(..., runtime=...)`);
only their own modules import their framework (Keras/TensorFlow:
`runtime_keras`; OpenVINO: `runtime_openvino`), so commands that need no model
(search by id, info, verify) start in a fraction of a second. Tests pass a
fake that satisfies the same Protocol. This module imports no runtime: they
import it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from pipeline.embed.descriptor import GEM_P, Descriptor, describe

DIM = 2048


class Embedder(Protocol):
    """What indexing, search, evaluation and the server need of a model.

    `fingerprint` is the model family (architecture, pooling, weights digest,
    preprocessing): vectors of different families never mix. `producer` is
    what computed them (runtime, version, precision, calibration): the same
    family from another producer gives nearly the same vectors (cosine about
    0.997 for int8), so mixing them in one catalog is allowed only on request.
    """

    fingerprint: dict[str, Any]
    producer: dict[str, Any]
    batch_size: int
    source: str  # what --weights named: "imagenet" or an absolute file path
    descriptor: Descriptor  # the input its pixels must be decoded to (`descriptor.decode`)

    def embed(self, pixels: np.ndarray | list[np.ndarray]) -> np.ndarray:
        """uint8 RGB images -> (n, dimension) float32, each row of unit length.

        (n, 224, 224, 3) for the classic descriptor; a list of (h, w, 3) arrays of
        any sizes for a whole-image descriptor (see `descriptor.py`).
        """
        ...


@dataclass
class MapsEmbedder:
    """Any runtime's ResNet50 without pooling (`maps`: uint8 (n, h, w, 3) -> (n, h', w', c)),
    pooled per the catalog's `Descriptor`: whole images, several scales, GeM or R-MAC."""

    maps: Callable[[np.ndarray], np.ndarray]
    fingerprint: dict[str, Any]
    producer: dict[str, Any]
    descriptor: Descriptor
    batch_size: int = 32
    source: str = "imagenet"
    model: Any = None  # the framework's model, for converting it to another runtime

    def embed(self, pixels: np.ndarray | list[np.ndarray]) -> np.ndarray:
        return describe(list(pixels), self.descriptor, self.maps, self.batch_size)


def maps_of(embedder: Any) -> Callable[[np.ndarray], np.ndarray] | None:
    """The embedder's ResNet50 without pooling (uint8 (n, h, w, 3) -> (n, h', w', 2048)), for
    the explain view's heat map; None where the model pools inside (the classic 224 crop:
    `KerasEmbedder`, OpenVINO's fast model): a second model only for a heat map is not
    worth its load time and memory on a descriptor that is not the default."""
    maps = getattr(embedder, "maps", None)  # a MicroBatcher passes its model's through
    return maps if callable(maps) else None


# What produced a catalog's vectors before producers were recorded.
KERAS_FP32 = {"runtime": "keras", "precision": "fp32", "calibration": None}


def same_producer(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Runtime, precision and calibration equal (a runtime's version may differ)."""
    keys = ("runtime", "precision", "calibration")
    return all(a.get(k) == b.get(k) for k in keys)


def describe_producer(p: dict[str, Any]) -> str:
    return f"{p.get('runtime')} {p.get('precision')}" + (
        f" (calibration {str(p['calibration'])[:12]})" if p.get("calibration") else ""
    )


# Keras' "caffe" preprocessing for ResNet50: RGB -> BGR, subtract the ImageNet mean.
BGR_MEAN = np.array([103.939, 116.779, 123.68], dtype=np.float32)


def preprocess(pixels: np.ndarray) -> np.ndarray:
    """uint8 RGB -> float32 BGR minus the ImageNet mean (Keras' ResNet50 preprocess_input)."""
    return pixels[..., ::-1].astype(np.float32) - BGR_MEAN


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


def fingerprint_json(fingerprint: dict[str, Any]) -> str:
    return json.dumps(fingerprint, sort_keys=True)


def describe_mismatch(stored: dict[str, Any], current: dict[str, Any]) -> str:
    """Name the fields that differ between two fingerprints, for error messages."""
    keys = sorted(k for k in set(stored) | set(current) if stored.get(k) != current.get(k))
    return ", ".join(
        f"{k}: catalog {stored.get(k)!s:.16} vs model {current.get(k)!s:.16}" for k in keys
    )
