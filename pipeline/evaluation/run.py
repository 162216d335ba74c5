"""Which benchmark `cbir evaluate` runs: labelled queries (`labels`) or an instance
ground truth (`instances`).

The choice lives here, above both, so that neither benchmark imports the other.
"""

from __future__ import annotations

from typing import Any

from pipeline.config import Settings
from pipeline.errors import CbirError
from pipeline.evaluation.instances import evaluate_instances
from pipeline.evaluation.labels import evaluate_labels
from pipeline.specs import EVALUATION_METHODS
from pipeline.store.collection import Collection


def evaluate(
    coll: Collection,
    settings: Settings,
    source: str | None = None,
    leave_one_out: bool = False,
    method: str = "resnet50",
    index_name: str | None = None,
    hybrid_weight: float = 0.5,
    embed=None,
    groundtruth: str | None = None,
) -> dict[str, Any]:
    """Evaluate the catalog against labelled queries (`labels.evaluate_labels`); returns
    metrics and every ranking.

    With `groundtruth` (a CSV of query,relevant file names) it is an instance benchmark
    instead: `instances.evaluate_instances` (mAP, N-S score).
    """
    if method not in EVALUATION_METHODS:
        raise CbirError(f"unknown method {method!r}: use {', '.join(EVALUATION_METHODS)}")
    if not 0.0 <= float(hybrid_weight) <= 1.0:
        raise CbirError(f"hybrid weight must be between 0 and 1, got {hybrid_weight}")
    if groundtruth is not None:
        if source or leave_one_out:
            raise CbirError("give either QUERIES, --leave-one-out or --groundtruth, not several")
        return evaluate_instances(
            coll, settings, groundtruth, method, index_name, hybrid_weight, embed
        )
    return evaluate_labels(
        coll, settings, source, leave_one_out, method, index_name, hybrid_weight, embed
    )
