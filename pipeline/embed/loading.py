"""Choosing and loading an embedder: the runtime named ("keras" or "openvino") at a precision.

Apart from `interface` because it imports both runtimes, and they import the
interface (the Protocol, pooling and fingerprint helpers): the factory sits
above all three, so nothing in embed imports in a circle. The runtimes import
their frameworks (TensorFlow, OpenVINO, NNCF) only when a model is built, so
importing this module costs no framework start-up.
"""

from __future__ import annotations

from typing import Any

from pipeline.embed import runtime_keras, runtime_openvino
from pipeline.embed.descriptor import Descriptor
from pipeline.embed.interface import Embedder
from pipeline.errors import CbirError
from pipeline.specs import POOLINGS


def load_embedder(
    weights: str = "imagenet",
    batch_size: int = 32,
    pooling: str = "avg",
    runtime: str = "keras",
    precision: str = "fp32",
    calibration_paths: Any = (),
    descriptor: Descriptor | None = None,
) -> Embedder:
    """The embedder of `runtime` ("keras" or "openvino") at `precision` for these weights,
    making `descriptor`'s vectors (default: the classic 224 crop with `pooling`).

    `calibration_paths` (int8): image paths, or a `calibration.Calibration`."""
    if pooling not in POOLINGS:
        raise CbirError(f"unknown pooling {pooling!r}: use {', '.join(POOLINGS)}")
    descriptor = descriptor or Descriptor(pooling=pooling)
    if runtime == "keras":
        if precision != "fp32":
            raise CbirError(f"the keras runtime runs fp32 only, not {precision}: use openvino")
        return runtime_keras.load(weights, batch_size, descriptor.pooling, descriptor)
    if runtime == "openvino":
        return runtime_openvino.load(
            weights,
            batch_size,
            descriptor.pooling,
            precision,
            calibration_paths or None,
            descriptor=descriptor,
        )
    raise CbirError(f"unknown runtime {runtime!r}: use keras or openvino")
