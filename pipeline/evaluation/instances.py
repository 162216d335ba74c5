"""Instance-retrieval benchmarks (INRIA Holidays, UKBench): ground truth as query,relevant pairs.

The ground truth is a CSV with a `query,relevant` header and one row per pair
of file names, as the benchmarks' `groundtruth.csv` files give it (read and
matched to catalog ids by `inputs.groundtruth`). Every query is an image of
the catalog. Each is ranked against the whole catalog by `ranking.ranked` over
the exact index (the ranking `cbir search` returns), in blocks of queries so
that memory stays bounded, and scored under each benchmark's own protocol:

- mAP (Holidays): the query is left out of its own ranking; AP over all of its
  relevant images (one that is not ranked at all adds precision 0).
- N-S score (UKBench): the query stays in; how many of its group (the query and
  its relevant images) are in the top 4, averaged over the queries (4.0 at best).

With the setting `rotations` on, each query's file is decoded again, turned by
every angle and embedded, and its rankings are merged by `ranking.best_over`,
as `cbir search FILE --rotations ...` does; the database vectors stay as stored.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np
from tqdm import tqdm

from pipeline.config import Settings
from pipeline.embed import descriptor
from pipeline.errors import CbirError
from pipeline.evaluation import common
from pipeline.evaluation.verifying import Verifying
from pipeline.inputs.decode import DecodeError, decode_file
from pipeline.inputs.groundtruth import load_groundtruth
from pipeline.retrieval import indexes, metrics
from pipeline.retrieval.ranking import merge_variants, ranked, rerank_from
from pipeline.specs import rotation_angles
from pipeline.store import reads
from pipeline.store.collection import Collection

NS_DEPTH = 4  # UKBench counts the group's images in the top 4
TOP = 10  # results kept per query for the report

MAP_PROTOCOL = (
    "Holidays: each query ranks every other catalog image (itself excluded); "
    "AP over all its relevant images, mean over queries"
)
NS_PROTOCOL = (
    "UKBench N-S: each query ranks the whole catalog (itself included); "
    "images of its group (query and relevant) in the top 4, mean over queries, 4.0 at best"
)


def score_query(
    query: int, ranking: np.ndarray, scores: np.ndarray, relevant: list[int], paths: dict[int, str]
) -> dict[str, Any]:
    """One query's figures from its full ranking (query included): AP, N-S, ranks, top 10."""
    ns = metrics.hits_at(ranking, [query, *relevant], NS_DEPTH)
    others = ranking != query  # Holidays: the query is not a result of itself
    ranking, scores = ranking[others], scores[others]
    is_rel = np.isin(ranking, relevant)
    return {
        "query": paths[query],
        "id": query,
        "ap": metrics.average_precision(is_rel, len(relevant)),
        "ns": ns,
        "relevant": [
            {"id": r, "path": paths[r], "rank": rank}
            for r, rank in zip(relevant, metrics.ranks_of(ranking, relevant), strict=True)
        ],
        "top10": [
            {"id": int(i), "path": paths[int(i)], "score": round(float(s), 6), "relevant": bool(m)}
            for i, s, m in zip(ranking[:TOP], scores[:TOP], is_rel[:TOP], strict=True)
        ],
    }


def rotated_queries(
    paths: list[str],
    angles: tuple[int, ...],
    embed,
    max_pixels: int,
    shape: dict[str, Any] | None = None,
) -> np.ndarray:
    """The query files decoded again, turned by each angle, embedded in one call:
    (len(paths) * len(angles), d), each query's angles together."""
    pixels = []
    for path in paths:
        for a in angles:
            try:
                pixels.append(decode_file(path, max_pixels, a, **(shape or {})).pixels)
            except DecodeError as e:
                raise CbirError(f"query image {path} cannot be decoded again: {e}") from None
    return embed(descriptor.batch(pixels))


def evaluate_instances(
    coll: Collection,
    settings: Settings,
    groundtruth: str,
    method: str = "resnet50",
    index_name: str | None = None,
    hybrid_weight: float = 0.5,
    embed=None,
) -> dict[str, Any]:
    """mAP (Holidays protocol) and N-S score (UKBench protocol) of the catalog's queries."""
    if index_name and index_name != indexes.EXACT:
        raise CbirError("--groundtruth ranks the whole catalog by exact search: leave out --index")
    angles = rotation_angles(settings.rotations)
    if len(angles) > 1 and method != "resnet50":
        raise CbirError("--rotations turns the queries for the model: use --method resnet50")
    how = rerank_from(settings)
    verify = Verifying(coll.db, settings)  # `--rerank verify`: after `ranked`, per query
    coll.refuse_damaged()  # a figure over fewer images than indexed is a wrong answer
    ids = coll.indexed_ids()
    if not len(ids):
        raise CbirError("the catalog has no indexed images")
    rows = reads.lookup(coll.db, ids)
    paths = {int(i): rows[int(i)]["path"] for i in ids}
    truth = load_groundtruth(groundtruth, paths)

    if method == "resnet50":  # the stored vectors and the exact index `cbir search` uses
        index, lookup = indexes.loaded(coll, indexes.EXACT)[0], coll.vectors
    else:  # colour or hybrid descriptors, decoded again, in a flat index of their own
        db_paths = [paths[int(i)] for i in ids]
        desc, ok = common.descriptors(
            method, db_paths, coll.vectors(ids), embed, settings.max_pixels, hybrid_weight,
            common.decode_shape(settings),
        )  # fmt: skip
        undecoded = set(truth.queries) - set(ids[ok].tolist())
        if undecoded:
            q_paths = [paths[q] for q in truth.queries]
            usable = [i for i, q in enumerate(truth.queries) if q not in undecoded]
            raise CbirError(common.unusable_queries(q_paths, usable))
        index, lookup = common.flat_ranker(desc, ids[ok])
    n = int(index.ntotal)

    per_query: list[dict[str, Any]] = []
    # With rotations, each query is one ranking per angle (merged after ranking).
    per_block = common.BLOCK_ENTRIES // max(n * len(angles), 1)
    block = max(1, min(len(truth.queries), per_block))
    starts = range(0, len(truth.queries), block)
    for b in tqdm(starts, desc="evaluating", unit="block", disable=None, file=sys.stderr):
        q_ids = np.array(truth.queries[b : b + block], dtype=np.int64)
        if len(angles) > 1:  # the query files turned and embedded again; the database as stored
            q_paths = [paths[q] for q in q_ids.tolist()]
            q_vecs = rotated_queries(
                q_paths, angles, embed, settings.max_pixels, common.decode_shape(settings)
            )
            found, found_scores = ranked(index, lookup, q_vecs, n, how)
            found, found_scores = merge_variants(found, found_scores, [len(angles)] * len(q_ids))
        else:
            found, found_scores = ranked(index, lookup, lookup(q_ids), n, how)
        for q, row, sc in zip(q_ids.tolist(), found, found_scores, strict=True):
            keep = row >= 0
            row, sc = verify(q, row[keep], sc[keep])
            per_query.append(score_query(q, row, sc, truth.relevant[q], paths))

    result: dict[str, Any] = {"method": method, "rerank": "+".join(how.methods) or "none"}
    if how.methods:
        result["rerank_n"], result["rerank_alpha"] = how.n, how.alpha
    verify.describe(result)
    result.update(
        {
            "rotations": settings.rotations,
            "groundtruth": str(groundtruth),
            "protocol": f"instance ground truth from {groundtruth}",
            "queries": len(per_query),
            "database": n,
            "pairs": truth.pairs,
            "map": float(np.mean([q["ap"] for q in per_query])),
            "map_protocol": MAP_PROTOCOL,
            "ns_score": float(np.mean([q["ns"] for q in per_query])),
            "ns_best": float(np.mean([min(NS_DEPTH, 1 + len(g)) for g in truth.relevant.values()])),
            "ns_protocol": NS_PROTOCOL,
            "per_query": per_query,
        }
    )
    return result
