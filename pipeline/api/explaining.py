"""`explain`: why a result matched its query (issue 21's "Why this match").

Two kinds of evidence, for a query (an image file, an upload's bytes or an indexed id)
and one indexed result:

- the local-feature verification that `--rerank verify` ranks by (`retrieval.verify`):
  the matched points, inliers and a few rejected ones, in each picture's own pixels
  (`local_features.feature_image`: the image decoded whole, its longer side at most
  `max_side`), the homography query -> result and the query's outline mapped into the
  result;
- a heat map: the cosine of each location of the RESULT's ResNet50 feature map (its
  catalog descriptor's input, scale 1) to the QUERY's global vector, so the user sees
  which regions agree with the query's descriptor. Runtimes that pool inside the model
  (the classic 224 crop) have no maps: the answer says so instead (`interface.maps_of`).

`explanation_in` keeps the pictures for `explain_pictures` to draw; `explain_in` and
`explain` give the JSON-able dict only.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline import errors, specs
from pipeline.api.models import descriptor_for, embedder_for, open_collection, settings_for
from pipeline.api.searching import Upload
from pipeline.config import Settings
from pipeline.embed.descriptor import Descriptor
from pipeline.embed.interface import Embedder, maps_of
from pipeline.errors import CbirError, NotFoundError
from pipeline.inputs.decode import DecodeError, decode_bytes, decode_file
from pipeline.retrieval import local_features, verify
from pipeline.store import reads
from pipeline.store.collection import Collection

MAX_REJECTED = 30  # rejected matches drawn (faded) and returned: enough to show what failed


@dataclass
class Explanation:
    """The JSON-able answer (`data`) and the pictures it speaks of: the query's and the
    result's feature images (RGB, the sizes `data` states) and the heat grid (0..1)."""

    data: dict[str, Any]
    query_pixels: np.ndarray
    result_pixels: np.ndarray
    heat: np.ndarray | None


def _result_row(coll: Collection, image_id: int) -> dict[str, Any]:
    image_id = specs.check("id", int(image_id), spec=specs.ID)
    row = reads.lookup(coll.db, [image_id]).get(image_id)
    if row is None or row["status"] != "indexed":
        raise NotFoundError(f"no indexed image with id {image_id}")
    return {**row, **reads.details(coll.db, [image_id])[image_id], "id": image_id}


def _query_source(coll: Collection, query: int | str | Upload) -> tuple[str, int | None, Any]:
    """(name shown, id or None, what to decode: a path or bytes) of a query."""
    if isinstance(query, Upload):
        return query.name, None, query.data
    if isinstance(query, int | np.integer):
        row = _result_row(coll, int(query))
        return row["path"], row["id"], row["path"]
    if os.path.isdir(query):
        raise CbirError(f"explain takes one query image, not a folder: {query}")
    if not os.path.exists(query):
        problem = errors.path_problem(query, folder=False)
        raise CbirError(f"query {problem}" if problem else f"query not found: {query}")
    path = os.path.abspath(query)
    return path, None, path


def _decode(src: str | bytes, max_pixels: int, **kwargs: Any) -> np.ndarray:
    if isinstance(src, bytes):
        return decode_bytes(src, max_pixels, **kwargs).pixels
    return decode_file(src, max_pixels, **kwargs).pixels


KEPT_QUERIES = 32  # query images whose vectors a collection keeps for explanations


def _query_vector(
    coll: Collection, src: str | bytes, max_pixels: int, d: Descriptor, embedder
) -> np.ndarray:
    """The vector of a query image (a file or an upload), kept by the sha256 of its bytes:
    a results page asks for one heat map per result, and would otherwise run the model
    once for each (the catalog's model and descriptor are fixed, so the bytes decide)."""
    decoded = (
        decode_bytes(src, max_pixels, **d.decode)
        if isinstance(src, bytes)
        else (decode_file(src, max_pixels, **d.decode))
    )
    lock, kept = coll.cached(("explain-queries",), lambda: (threading.Lock(), OrderedDict()))
    with lock:
        if decoded.sha256 in kept:
            kept.move_to_end(decoded.sha256)
            return kept[decoded.sha256]
    vector = embedder().embed([decoded.pixels])[0]
    with lock:
        kept[decoded.sha256] = vector
        while len(kept) > KEPT_QUERIES:
            kept.popitem(last=False)
    return vector


def _pairs(a: np.ndarray, b: np.ndarray) -> list[list[float]]:
    return [[round(float(v), 1) for v in (*p, *q)] for p, q in zip(a, b, strict=True)]


def verification_data(
    v: verify.Verification, query_size: tuple[int, int], result_size: tuple[int, int],
    params: verify.Params,
) -> dict[str, Any]:  # fmt: skip
    """A `Verification` as JSON: pairs [qx, qy, rx, ry] in each picture's pixels."""
    rejected = np.flatnonzero(~v.inlier_mask)[:MAX_REJECTED]
    region = v.region(query_size)
    return {
        "geometry": v.geometry,
        "inliers": v.inliers,
        "matches": len(v.inlier_mask),
        "verified": v.inliers > params.floor,
        "floor": params.floor,
        "query_size": list(query_size),
        "result_size": list(result_size),
        "inlier_pairs": _pairs(v.query_points[v.inlier_mask], v.candidate_points[v.inlier_mask]),
        "rejected_pairs": _pairs(v.query_points[rejected], v.candidate_points[rejected]),
        "region": None if region is None else [[round(float(x), 1) for x in p] for p in region],
        "homography": None if v.model is None else [[float(x) for x in r] for r in v.model],
    }


def heat_grid(maps: np.ndarray, query_vector: np.ndarray) -> np.ndarray:
    """(h, w) cosine of each location's feature (maps (h, w, c)) to a unit vector."""
    norms = np.linalg.norm(maps, axis=-1)
    return (maps @ query_vector) / np.maximum(norms, 1e-12)


def heat_area(d: Descriptor, size: tuple[int, int]) -> list[int]:
    """What part of the result's feature image (width, height) the maps cover: the whole
    image, or for a crop descriptor its central square."""
    w, h = size
    if d.input != "crop":
        return [0, 0, w, h]
    side = min(w, h)
    x0, y0 = (w - side) // 2, (h - side) // 2
    return [x0, y0, x0 + side, y0 + side]


def _heat(
    embedder: Embedder, d: Descriptor, src: str, max_pixels: int, q: np.ndarray
) -> tuple[np.ndarray | None, np.ndarray | None, str | None]:
    """(raw grid, 0..1 grid, None) or (None, None, why not)."""
    maps = maps_of(embedder)
    if maps is None:
        return None, None, "this catalog's model pools inside the network (classic 224 crop)"
    pixels = _decode(src, max_pixels, **d.decode)
    raw = heat_grid(np.asarray(maps(pixels[None]))[0].astype(np.float64), q.astype(np.float64))
    lo, hi = float(raw.min()), float(raw.max())
    norm = (raw - lo) / (hi - lo) if hi > lo else np.zeros_like(raw)
    return raw, norm, None


def explanation_in(
    coll: Collection,
    query: int | str | Upload,
    image_id: int,
    s: Settings,
    embedder: Callable[[], Embedder],
    params: verify.Params = verify.DEFAULT,
    matches: bool = True,
) -> Explanation:
    """Why `image_id` answers `query` (see the module's docstring). A query image that cannot
    be decoded is a DecodeError-worded CbirError; a result whose file changed since it was
    indexed gets no verification nor heat map (a note says why), never another image's.
    `matches=False`: the heat map only (a page's overlay on every result), no SIFT."""
    if not coll.dim:
        raise CbirError(f"catalog {coll.path} has no indexed images yet")
    row = _result_row(coll, image_id)
    name, query_id, src = _query_source(coll, query)
    d = descriptor_for(s, coll)
    q_image = None
    try:
        if not matches:  # a heat map needs only the query's vector
            pass
        elif isinstance(src, bytes):
            q_image = local_features.bytes_image(src, s.max_pixels, params)
        else:
            q_image = local_features.feature_image(src, s.max_pixels, params)
        # An id's stored vector is of its indexed bytes: a changed file would have its
        # matches explained under another picture's cosine.
        if (
            q_image is not None
            and query_id is not None
            and q_image.sha256 != _result_row(coll, query_id)["sha256"]
        ):
            raise DecodeError("its file changed since it was indexed (run cbir index)")
        q_vec = (
            coll.checked_vectors([query_id])[0]
            if query_id is not None
            else _query_vector(coll, src, s.max_pixels, d, embedder)
        )
    except DecodeError as e:
        raise CbirError(f"cannot use query image {os.path.basename(name)}: {e}") from None
    r_vec = coll.checked_vectors([row["id"]])[0]
    data: dict[str, Any] = {
        "query": name,
        "query_id": query_id,
        "result": {"id": row["id"], "path": row["path"], "label": row["label"]},
        "cosine": round(float(np.dot(q_vec, r_vec)), 6),
        "verification": None,
        "heat": None,
    }
    q_pixels = q_image.pixels if q_image is not None else np.zeros((1, 1, 3), np.uint8)
    r_pixels = np.zeros((1, 1, 3), np.uint8)
    heat = None
    try:
        r_image = local_features.feature_image(row["path"], s.max_pixels, params)
        if r_image.sha256 != row["sha256"]:
            raise DecodeError("it changed since it was indexed")
    except (DecodeError, OSError) as e:
        data["note"] = f"the result's file cannot be explained: {e}"
        return Explanation(data, q_pixels, r_pixels, None)
    r_pixels = r_image.pixels
    q_size, r_size = (q_pixels.shape[1], q_pixels.shape[0]), (r_pixels.shape[1], r_pixels.shape[0])
    if matches:
        qf, rf = local_features.extract(q_pixels, params), local_features.extract(r_pixels, params)
        v = verify.match(qf, rf, params)
        data["verification"] = verification_data(v, q_size, r_size, params)
    try:
        raw, heat, why = _heat(embedder(), d, row["path"], s.max_pixels, q_vec)
    except DecodeError as e:
        raw, heat, why = None, None, f"cannot decode the result: {e}"
    if heat is None:
        data["heat_note"] = why
    else:
        data["heat"] = {
            "rows": int(heat.shape[0]),
            "cols": int(heat.shape[1]),
            "area": heat_area(d, r_size),  # in the result's pixels (result_size)
            "values": [[round(float(x), 4) for x in r] for r in heat],
            "raw": [[round(float(x), 4) for x in r] for r in raw],
        }
    return Explanation(data, q_pixels, r_pixels, heat)


def explain_in(
    coll: Collection,
    query: int | str | Upload,
    image_id: int,
    s: Settings,
    embedder: Callable[[], Embedder],
) -> dict[str, Any]:
    """`explanation_in`'s JSON-able dict."""
    return explanation_in(coll, query, image_id, s, embedder).data


def explain(
    query: int | str | Upload, image_id: int, config: str | None = None, **options: Any
) -> dict[str, Any]:
    """Why `image_id` answers `query` (a file, an upload or an id), opening the collection
    and its model as `search` does."""
    s = settings_for(config, **options)
    coll = open_collection(s)
    try:
        return explain_in(coll, query, image_id, s, lambda: embedder_for(s, coll))
    finally:
        coll.close()


def explanations(
    pairs: list[tuple[int | str | Upload, int]], config: str | None = None, **options: Any
) -> Iterator[Explanation]:
    """`explanation_in` of each (query, result id), the collection and model opened once
    (`cbir search --explain` draws each)."""
    s = settings_for(config, **options)
    coll = open_collection(s)
    try:
        for query, image_id in pairs:
            yield explanation_in(coll, query, image_id, s, lambda: embedder_for(s, coll))
    finally:
        coll.close()
