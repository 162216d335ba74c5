"""FAISS factory strings and search parameters: what cbir lets FAISS build, and how.

Every index is an inner-product index over catalog ids, made from a factory
string checked before FAISS sees it (`check_factory`). IVF indexes (also
under a pre-transform such as OPQ or PCA) are kept bare: they store catalog
ids in their inverted lists, so they can grow and shrink (`add_with_ids`,
`remove_ids`) and be merged on disk (`shards`); every other type is wrapped
in `IndexIDMap2`. `stored_ids` reads the ids back from either. `ivf_lists`
is the number of inverted lists for n vectors, here so that both
`autoindex.choose` and `indexes.train` (which suggests it) can use it.
Imports nothing of cbir but `specs` and `errors`.
"""

from __future__ import annotations

import math
import re
from typing import Any

import faiss
import numpy as np

from pipeline import specs
from pipeline.errors import CbirError


def parse_params(
    items: str | list[str] | tuple[str, ...] | dict[str, Any] | None,
) -> dict[str, float]:
    """`["nprobe=16", "efSearch=64"]` -> {"nprobe": 16, "efSearch": 64}; values range-checked."""
    if not items:
        return {}
    if isinstance(items, dict):
        return {str(k): specs.search_param(str(k), v) for k, v in items.items()}
    if isinstance(items, str):
        items = [items]  # one "name=value", not its letters
    out: dict[str, float] = {}
    for item in items:
        key, sep, value = item.partition("=") if isinstance(item, str) else ("", "", "")
        if not sep or not key.strip():
            raise CbirError(f"search parameter must look like name=number, got {item!r}")
        out[key.strip()] = specs.search_param(key.strip(), value.strip())
    return out


# Parameters cbir applies itself rather than FAISS: `refine` = how many times k
# candidates the index returns for exact re-scoring from the vector file.
OWN_PARAMS = ("refine",)


def apply_params(index: faiss.Index, params: dict[str, float]) -> None:
    """Set search-time parameters (nprobe, efSearch, ...) through FAISS' ParameterSpace."""
    space = faiss.ParameterSpace()
    for key, value in params.items():
        # Checked here too: stored records and API dicts reach FAISS without parse_params,
        # and FAISS casts NaN or 1e12 to a C int without complaint.
        value = specs.search_param(key, value)
        if not isinstance(index, faiss.Index) and key not in OWN_PARAMS:
            raise CbirError(f"exact search has no search parameter {key!r}")
        if key in OWN_PARAMS:
            continue
        try:
            space.set_index_parameter(index, key, value)
        except RuntimeError:
            raise CbirError(f"this index has no search parameter {key!r}") from None


def ivf_core(index: Any) -> faiss.IndexIVF | None:
    """The IVF index `index` is, directly or under a pre-transform (OPQ, PCA); else None.

    None also for an IVF wrapped in IndexIDMap2 (built by an older cbir): its
    ids live in the wrapper, so it cannot grow or be merged on disk.
    """
    if not isinstance(index, faiss.Index):
        return None
    idx = faiss.downcast_index(index)
    if isinstance(idx, faiss.IndexPreTransform):
        idx = faiss.downcast_index(idx.index)
    return idx if isinstance(idx, faiss.IndexIVF) else None


def ivf_lists(n: int) -> int:
    """About sqrt(n) inverted lists, a power of two, with at least 39 training points each.

    (autofaiss uses ~4 sqrt(n); on two cores k-means over 2048-d vectors with
    that many centroids takes many minutes at a million vectors, and nprobe
    makes up the difference in recall.)
    """
    want = 2 ** round(math.log2(max(16, math.sqrt(n))))
    return int(max(1, min(want, 65536, 2 ** int(math.log2(max(1, n // 39))))))


# Numbers in a factory string that FAISS takes without checking, and the range cbir allows
# each: out of it FAISS kills the process (HNSW1: a segfault, HNSW0: an assertion, PQ8x0 or
# OPQ8_0: SIGFPE, RR0: a segfault), hangs (NSG4), builds a useless index (PCA0, SQ0) or
# allocates without bound (HNSW100000: 800 KB a vector; IMI2x16: 2^32 lists). (pattern,
# what it is, lowest, highest; None: the vectors' dimension.) Every other number must be
# at least 1. tests/retrieval/test_trust_indexes.py holds the table of strings tried.
_FACTORY_LIMITS: tuple[tuple[re.Pattern[str], str, int, int | None], ...] = (
    (re.compile(r"HNSW(\d+)"), "number of HNSW links", 2, 256),
    (re.compile(r"NSG(\d+)"), "NSG graph degree", 8, 256),
    (re.compile(r"IVF(\d+)"), "number of inverted lists", 1, specs.IVF_LISTS_MAX),
    (re.compile(r"IMI2x(\d+)"), "number of bits per IMI quantizer", 1, 12),
    (re.compile(r"(?:PQ|RQ|LSQ)\d+x(\d+)"), "number of bits per code", 1, 16),
    (re.compile(r"PRQ\d+x\d+x(\d+)"), "number of bits per code", 1, 16),
    (re.compile(r"(?:^|[,_(])O?PQ(\d+)"), "number of PQ sub-quantizers", 1, None),
    (re.compile(r"OPQ\d+_(\d+)"), "number of output dimensions", 1, None),
    (re.compile(r"(?:PCAW?R?|RR)(\d+)"), "number of output dimensions", 1, None),
)


def check_factory(factory: str, dim: int) -> None:
    """Refuse, in one line and before any work, a factory string whose numbers would crash
    FAISS, hang it or build a useless index (see _FACTORY_LIMITS); FAISS itself judges
    the rest (an unknown component, a PQ size that does not divide the dimension)."""
    if not isinstance(factory, str) or not factory.strip() or len(factory) > 200:
        raise CbirError(f"invalid FAISS factory string {factory!r}")
    if re.search(r"\bIDMap2?\b", factory):
        raise CbirError(
            f"invalid FAISS factory string {factory!r}: leave out IDMap/IDMap2, "
            "cbir maps catalog ids itself"
        )
    for pattern, what, low, high in _FACTORY_LIMITS:
        top = dim if high is None else high
        for found in pattern.finditer(factory):
            value = int(found.group(1))
            if value > top and what == "number of inverted lists":
                # FAISS would allocate every list up front: a MemoryError, or worse, swapping.
                raise CbirError(
                    f"{factory!r} asks for {value:,} inverted lists, more than cbir allows "
                    f"({top:,}); use about sqrt(number of vectors)"
                )
            if not low <= value <= top:
                raise CbirError(
                    f"invalid FAISS factory string {factory!r}: in "
                    f"{found.group(0).lstrip(',_(')!r} the {what} must be from {low} to "
                    f"{top:,}, not {value:,}"
                )
    if zero := re.search(r"[A-Za-z_](0+)(?!\d)", factory):
        raise CbirError(
            f"invalid FAISS factory string {factory!r}: a count of 0 at "
            f"{factory[max(0, zero.start() - 6) : zero.end()]!r}; every number must be at least 1"
        )


def make_index(factory: str, dim: int) -> faiss.Index:
    """An empty inner-product index from a factory string, holding catalog ids.

    IVF indexes stay bare (their inverted lists hold the ids; FAISS'
    IndexIDMap.remove_ids is wrong for IVF); every other type is wrapped in
    IndexIDMap2, which gives it add_with_ids and reconstruct by id.
    """
    check_factory(factory, dim)
    try:
        inner = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[-1] if str(e).strip() else ""
        raise CbirError(f"invalid FAISS factory string {factory!r}: {first}") from None
    except MemoryError:
        raise CbirError(f"not enough memory to create a {factory!r} index", 1) from None
    if ivf_core(inner) is not None:
        return inner
    return faiss.IndexIDMap2(inner)


def stored_ids(index: faiss.Index) -> np.ndarray:
    """The catalog ids an index holds, sorted: from IndexIDMap2's map, or an IVF's lists."""
    outer = faiss.downcast_index(index)
    if isinstance(outer, faiss.IndexPreTransform):  # a whitened index: IDMap2 inside
        inner = faiss.downcast_index(outer.index)
        if isinstance(inner, faiss.IndexIDMap | faiss.IndexIDMap2):
            outer = inner
    if isinstance(outer, faiss.IndexIDMap | faiss.IndexIDMap2):
        return np.sort(faiss.vector_to_array(outer.id_map))
    ivf = ivf_core(index)
    if ivf is None:
        raise CbirError(f"cannot list the ids of a {type(outer).__name__} index", 1)
    invlists = ivf.invlists
    parts = [np.zeros(0, dtype=np.int64)]
    for lst in range(ivf.nlist):
        size = invlists.list_size(lst)
        if size:
            ptr = invlists.get_ids(lst)
            parts.append(faiss.rev_swig_ptr(ptr, size).copy())
            invlists.release_ids(lst, ptr)
    return np.sort(np.concatenate(parts))
