"""`search`: the top-k images for query files, folders, ids, uploads or decoded pixels.

`search_in` takes an open collection and a model, for clients that keep them
open (the web server); `search` opens them for one call, as `cbir search` does.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import errors, specs
from pipeline.api.models import descriptor_for, embedder_for, open_collection, settings_for
from pipeline.config import Settings
from pipeline.embed import descriptor
from pipeline.embed.interface import Embedder
from pipeline.errors import CbirError, NotFoundError
from pipeline.inputs.decode import DecodeError, decode_bytes, decode_file
from pipeline.inputs.scan import no_images, scan
from pipeline.retrieval import factories, filters, indexes, ranking, rerank, verified
from pipeline.retrieval.filters import Filter, make_filter
from pipeline.retrieval.local_features import FeatureCache
from pipeline.retrieval.restricted import Restricted
from pipeline.store import reads
from pipeline.store.collection import Collection

log = logging.getLogger("cbir")
# The options of `search` that make its filter (`filters.make_filter`), as `cbir search` names them.
FILTER_OPTIONS = ("under", "label", "since", "until")


@dataclass(frozen=True)
class Upload:
    """An image sent as bytes (a web upload), queried like a file."""

    name: str
    data: bytes


@dataclass(frozen=True)
class Pixels:
    """An image already decoded to model input ((h, w, 3) uint8 as the catalog's descriptor
    decodes it: 224 x 224 for the paper's crop), queried like a file.

    The web server decodes uploads within its memory budget, then lets many
    decoded queries meet in one forward pass.
    """

    name: str
    pixels: np.ndarray
    # The image's own bytes, if the caller kept them: `--rerank verify` finds its local
    # features there (the model's 224 x 224 input holds too few); without them, in `pixels`.
    source: bytes | None = None


Query = int | str | Upload | Pixels


def _expand_queries(queries: list[Query]) -> list[Query]:
    """Folders become their image files (sorted); ids, files and uploads stay."""
    out: list[Query] = []
    for q in queries:
        if isinstance(q, Upload | Pixels):
            out.append(q)
        elif isinstance(q, int | np.integer):
            out.append(specs.check("id", int(q), spec=specs.ID))
        elif os.path.isdir(q):
            found = [f.path for f in scan([q], labels="none")]
            if not found:  # an answer with no queries in it would look like "no matches"
                raise no_images([q])
            out.extend(found)
        elif not os.path.exists(q):
            problem = errors.path_problem(q, folder=False)  # a symlink loop, a file on the way
            raise CbirError(f"query {problem}" if problem else f"query not found: {q}")
        else:
            out.append(os.path.abspath(q))
    return out


def _known_ids(coll: Collection, ids) -> np.ndarray:
    ids = [int(i) for i in specs.check("relevant", list(ids), spec=specs.FEEDBACK_IDS)]
    rows = reads.lookup(coll.db, ids)
    missing = [i for i in ids if i not in rows or rows[i]["status"] != "indexed"]
    if missing:
        raise CbirError(f"feedback names ids that are not indexed: {missing[:5]}")
    return np.asarray(ids, dtype=np.int64)


def search_in(
    coll: Collection,
    queries: list[Query],
    s: Settings,
    embedder: Callable[[], Embedder],
    params: dict[str, float] | None = None,
    allow_stale: bool = False,
    relevant=(),
    not_relevant=(),
    within: Filter | None = None,
    features: FeatureCache | None = None,
) -> list[dict[str, Any]]:
    """Top-k results of each query (catalog id, image file, upload or decoded pixels).

    Returns one dict per query: {"query", "query_id", "results": [...]} and,
    for an image that cannot be decoded, "error" instead of results.
    `embedder` is called only if some query is an image. `relevant` /
    `not_relevant` are ids the user marked (Rocchio feedback); settings
    `rerank` ("dba", "aqe", "dba+aqe") and `shortlist` re-rank; "verify" (alone or
    after them) re-orders the top `verify_n` by matched local features
    (`retrieval.verified`: scores stay cosines, checked results get "inliers" and
    "verified", lines about unverified files go in "notices"). `features` caches indexed
    images' local features; None: the process's own (`verified.shared_cache`).

    Setting `rotations` ("0,90,180,270"): every image query is also embedded
    turned by each angle (`decode_file` / `decode_bytes` rotate before the crop;
    decoded `Pixels` are turned as the 224 x 224 square), every turned vector
    ranks the collection, and each image keeps its best score
    (`ranking.best_over`): n angles cost n times the query's embedding and search.
    Id queries use their stored vector, unturned.

    `within` (a `Filter`: folders, labels, dates) restricts the results to the images
    that pass it, inside the search (`restricted`); each answer then carries "filter"
    (what it is, and "matching": how many images pass it), and "notice" when an index
    that cannot filter inside the search returned fewer than k of them. Setting
    `min_score` leaves out results scoring below it.
    """
    if not coll.dim:
        raise CbirError(f"catalog {coll.path} has no indexed images yet")
    index_obj, _, in_force = indexes.loaded(coll, s.index, params, allow_stale)
    restricted = None
    if within is not None and within.active:
        restricted = Restricted(index_obj, filters.matching(coll, within), coll.vectors)
    angles = specs.rotation_angles(s.rotations)
    d = descriptor_for(s, coll)  # images are decoded to the catalog's descriptor input
    answers: list[dict[str, Any]] = []
    # Per answer, its query's vectors (one per angle; an id has one), None if undecodable.
    vecs: list[np.ndarray | None] = []
    pixels, pixel_slots = [], []
    expanded = _expand_queries(queries)
    for q in expanded:
        if isinstance(q, int):
            row = reads.lookup(coll.db, [q]).get(q)
            if row is None or row["status"] != "indexed":
                raise NotFoundError(f"no indexed image with id {q}")
            answers.append({"query": row["path"], "query_id": q})
            vecs.append(coll.checked_vectors([q]))  # a damaged row: one line, not garbage
            continue
        name = q.name if isinstance(q, Upload | Pixels) else q
        answers.append({"query": name, "query_id": None})
        try:
            if isinstance(q, Pixels):
                decoded = [np.rot90(q.pixels, a // 90) for a in angles]
            elif isinstance(q, Upload):
                decoded = [decode_bytes(q.data, s.max_pixels, a, **d.decode).pixels for a in angles]
            else:
                decoded = [decode_file(q, s.max_pixels, a, **d.decode).pixels for a in angles]
        except DecodeError as e:
            answers[-1]["error"] = f"cannot use query image {name}: {e}"
            vecs.append(None)
            continue
        pixels.extend(decoded)
        pixel_slots.append(len(vecs))
        vecs.append(None)
    if pixels:  # every angle of every image query in one call of the model
        embedded = embedder().embed(descriptor.batch(pixels))
        for n, slot in enumerate(pixel_slots):
            vecs[slot] = embedded[n * len(angles) : (n + 1) * len(angles)]
    good = [i for i, v in enumerate(vecs) if v is not None]
    if relevant or not_relevant:
        plus = coll.checked_vectors(_known_ids(coll, relevant))
        minus = coll.checked_vectors(_known_ids(coll, not_relevant))
        for i in good:
            vecs[i] = np.stack([rerank.rocchio(v, plus, minus) for v in vecs[i]])
    if good:
        found = ranking.search_vectors(
            coll,
            index_obj,
            np.concatenate([vecs[i] for i in good]),
            verified.first_k(s),
            how=ranking.rerank_from(s),
            refine=int(in_force.get("refine", 1)),
            groups=[len(vecs[i]) for i in good] if len(angles) > 1 else None,
            within=restricted,
            min_score=s.min_score if s.min_score > -1 else None,
        )
        for i, results in zip(good, found, strict=True):
            answers[i]["results"] = results
        if verified.wanted(s):
            _verify(coll, [(answers[i], expanded[i]) for i in good], s, features)
    notice = _short_notice(restricted, s) if restricted is not None else None
    if notice:
        log.warning("%s", notice)
    for a in answers:
        a.setdefault("results", [])
        if restricted is not None and within is not None:
            a["filter"] = {**within.describe(), "matching": restricted.ntotal}
        if notice:
            a["notice"] = notice
    return answers


def _verify(
    coll: Collection, pairs: list[tuple[dict, Query]], s: Settings, features: FeatureCache | None
) -> None:
    """`--rerank verify` of each answer's results, from its query's image (see `verified`)."""
    cache = features if features is not None else verified.shared_cache(s)
    for answer, q in pairs:
        if isinstance(q, Upload):
            source: verified.Source = q.data
        elif isinstance(q, Pixels):
            source = q.source if q.source is not None else q.pixels
        else:
            source = q  # an indexed id (its file, checked against its row) or a file
        notices: list[str] = []
        answer["results"] = verified.rerank_results(
            coll.db, source, str(answer["query"]), answer["results"], s, cache, notices
        )
        for line in dict.fromkeys(notices):  # once each, as the filter's notice
            log.warning("%s", line)
        if notices:
            answer["notices"] = list(dict.fromkeys(notices))


def _short_notice(restricted: Restricted, s: Settings) -> str | None:
    """One line when the index returned fewer than k of the images that pass the filter."""
    if not restricted.short:
        return None
    why = (
        "it cannot filter inside its search, and its nearest candidates held no more"
        if restricted.how == "over-fetch"
        else "its search reaches only so far from the query"
    )
    return (
        f"index {s.index!r} returned fewer than {s.k} of the {restricted.ntotal} images that "
        f"pass the filter ({why}); --index exact finds them all"
    )


def search(queries: list[Query] | Query | Path, config: str | None = None, **options: Any):
    """Top-k results for image files, folders of images, or catalog ids (see `search_in`).

    Options beyond the settings: `params` (search parameters, e.g.
    ["nprobe=16"]), `allow_stale`, `relevant` / `not_relevant`, and a filter: `under`
    (folders), `label` (labels), each a string or a list; `since`, `until` (ISO dates or
    times as strings, `datetime.date` or `datetime.datetime`; see `retrieval.filters`).
    """
    s = settings_for(config, **options)
    within = make_filter(*(options.get(key) for key in FILTER_OPTIONS))
    if isinstance(queries, str | int | Path | Upload):
        queries = [queries]
    coll = open_collection(s)
    try:
        return search_in(
            coll,
            [str(q) if isinstance(q, Path) else q for q in queries],
            s,
            lambda: embedder_for(s, coll),
            params=factories.parse_params(options.get("params")),
            allow_stale=bool(options.get("allow_stale")),
            relevant=options.get("relevant") or (),
            not_relevant=options.get("not_relevant") or (),
            within=within,
        )
    finally:
        coll.close()
