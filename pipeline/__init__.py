"""cbir: content-based image retrieval with ResNet50 features, FAISS and SQLite.

The Python API mirrors the CLI:

    import pipeline
    pipeline.index(["photos/"], weights="resnet50.weights.h5")
    for answer in pipeline.search(["query.jpg"], k=10):
        for r in answer["results"]:
            print(r["rank"], r["score"], r["path"])
"""

from pipeline.api import (
    build_index,
    duplicates,
    evaluate,
    index,
    info,
    search,
    train,
    verify,
    watch,
)
from pipeline.errors import CbirError

__all__ = [
    "CbirError",
    "build_index",
    "duplicates",
    "evaluate",
    "index",
    "info",
    "search",
    "train",
    "verify",
    "watch",
]
