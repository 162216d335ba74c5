"""`evaluate` and `train`: figures of a catalog against labelled queries, and fine-tuning.

Both read the catalog's labelled images and leave the catalog unchanged; `train`
writes new weights, to be indexed into a new catalog.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.api.models import (
    embedder_for,
    model_choice,
    open_collection,
    settings_for,
    with_descriptor,
)
from pipeline.evaluation.run import evaluate as run_evaluation
from pipeline.evaluation.train import train as run_training
from pipeline.retrieval import indexes


def evaluate(
    queries: str | None = None,
    leave_one_out: bool = False,
    method: str = "resnet50",
    hybrid_weight: float = 0.5,
    config: str | None = None,
    groundtruth: str | None = None,
    **options: Any,
) -> dict[str, Any]:
    """mAP, P@1, P@10 and a per-class table of the catalog against labelled queries.

    `queries` is a manifest CSV (its split=query rows) or a folder of labelled
    images; or pass leave_one_out=True. `index` (an approximate index name)
    adds its recall@10 against exact search; `rerank` re-ranks as in search.

    `groundtruth` (a CSV of query,relevant file names of catalog images, as the
    Holidays and UKBench benchmarks give them) instead returns the instance
    figures of `evaluation.instances.evaluate_instances`: `map` (Holidays protocol),
    `ns_score` (UKBench protocol) and `per_query` with each relevant image's rank.
    """
    s = settings_for(config, **options)
    coll = open_collection(s)
    try:
        s = with_descriptor(s, coll)  # queries decoded to the catalog's descriptor input
        return run_evaluation(
            coll,
            s,
            queries,
            leave_one_out,
            method,
            s.index if s.index != indexes.EXACT else None,
            hybrid_weight,
            lambda pixels: embedder_for(s, coll).embed(pixels),
            groundtruth=str(groundtruth) if groundtruth is not None else None,
        )
    finally:
        coll.close()


def train(
    out: str | Path,
    epochs: int = 15,
    val_fraction: float = 0.2,
    seed: int = 0,
    learning_rate: float = 1e-4,
    config: str | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Fine-tune ResNet50 on the catalog's labelled images; saves `out` (.weights.h5) + `out.json`."""
    s = settings_for(config, **options)
    coll = open_collection(s)
    try:
        coll.check_rows()  # it reads every labelled row's path and label
        return run_training(
            coll,
            s.replace(weights=model_choice(s, coll)[0]),
            out,
            epochs=epochs,
            val_fraction=val_fraction,
            seed=seed,
            learning_rate=learning_rate,
        )
    finally:
        coll.close()
