"""`cbir search --explain DIR`: each result's pictures of why it matched, as files.

For each query, DIR/<query stem>/ (an id query: id-<N>) gets, per result,
<rank>-<id>-matches.png (query and result side by side, the verified matches and the
region), <rank>-<id>-heat.png (the result under its heat map; absent where the model
has no feature maps) and <rank>-<id>.json (`api.explain`'s answer). The folder is
checked before any search runs, so a bad one costs nothing.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from pipeline import api
from pipeline.errors import CbirError


def checked_folder(folder: str) -> Path:
    """DIR made if missing and writable, or a one-line CbirError naming what is wrong."""
    path = Path(folder)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CbirError(f"--explain {folder}: cannot make the folder ({e.strerror})") from None
    if not path.is_dir() or not os.access(path, os.W_OK | os.X_OK):
        raise CbirError(f"--explain {folder}: not a writable folder")
    return path


def _stem(answer: dict[str, Any], taken: set[str]) -> str:
    if answer["query_id"] is not None:
        stem = f"id-{answer['query_id']}"
    else:  # a file name, kept to safe characters
        stem = re.sub(r"[^\w.-]", "_", Path(answer["query"]).stem)[:100] or "query"
    name, n = stem, 1
    while name in taken:
        n += 1
        name = f"{stem}-{n}"
    taken.add(name)
    return name


def write_explanations(folder: Path, answers: list[dict[str, Any]], **options: Any) -> int:
    """The pictures and JSON of every result of every answer (not of failed queries);
    returns how many results were explained."""
    jobs, taken = [], set()
    for a in answers:
        if "error" in a or not a.get("results"):
            continue
        query = a["query_id"] if a["query_id"] is not None else a["query"]
        out = folder / _stem(a, taken)
        out.mkdir(exist_ok=True)
        jobs += [(out / f"{r['rank']}-{r['id']}", query, r["id"]) for r in a["results"]]
    pairs = [(query, image_id) for _, query, image_id in jobs]
    for (base, _, _), e in zip(jobs, api.explanations(pairs, **options), strict=True):
        base.with_name(base.name + "-matches.png").write_bytes(api.render_matches(e))
        heat = api.render_heatmap(e)
        if heat is not None:
            base.with_name(base.name + "-heat.png").write_bytes(heat)
        base.with_name(base.name + ".json").write_text(json.dumps(e.data, indent=1))
    return len(jobs)
