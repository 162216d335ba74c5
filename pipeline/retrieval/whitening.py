"""PCA-whitening of an index: the transform, its files, and the whitened index it makes.

A transform is learned from the collection's own vectors, or read from a file,
and validated on held-out queries before any index uses it; that fitting and
its guard read the collection and are in `whitening_fit`. This module holds
what needs no collection: the checked request, the record's factory and note,
reading, checking and writing transform files, and wrapping an index.

Whitening is an option of a derived index; the stored vectors stay raw. A
whitened index is a FAISS `IndexPreTransform`: PCAMatrix (centring, projection
to D dimensions, each component scaled by eigenvalue ** eigen_power) ->
NormalizationTransform (L2, so inner product is cosine again) ->
IndexIDMap2(the inner index of `--factory`, over D dimensions). Its record's
factory is `WhitenD,INNER` and its note a JSON object with D, the shrinkage and
the validation figures.

Shrinkage S in [0, 1] softens the whitening: eigen_power = -0.5 * (1 - S), so
S = 0 is full whitening (every component scaled to unit variance), S = 1 a
plain PCA projection, and S = 0.5 (the default) scales by eigenvalue ** -0.25.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from pipeline import files
from pipeline.errors import CbirError
from pipeline.retrieval import index_files
from pipeline.specs import Spec, check

DIM_SPEC = Spec("int", 1, 2048)
SHRINKAGE_SPEC = Spec("float", 0, 1)
DEFAULT_DIM = 512
DEFAULT_SHRINKAGE = 0.5
PREFIX = "Whiten"
_FACTORY_RE = re.compile(rf"^{PREFIX}(\d+),(.+)$")
SUGGEST = "try a smaller --whiten-dim, more --shrinkage (up to 1), or a fitted --whitening FILE"


def eigen_power(shrinkage: float) -> float:
    """The PCAMatrix eigen_power of a shrinkage: -0.5 (full whitening) at 0, 0 (plain PCA) at 1."""
    return -0.5 * (1.0 - shrinkage)


def shrinkage_of(pca: faiss.PCAMatrix) -> float:
    return round(1.0 + 2.0 * float(pca.eigen_power), 6)


def factory_name(dim: int, inner: str) -> str:
    """The record's factory of a whitened index: 'Whiten512,Flat' (not a FAISS string)."""
    return f"{PREFIX}{dim},{inner}"


def split_factory(factory: str | None) -> tuple[int, str] | None:
    """'Whiten512,Flat' -> (512, 'Flat'); None for any other factory."""
    m = _FACTORY_RE.match(factory or "")
    return (int(m.group(1)), m.group(2)) if m else None


@dataclass(frozen=True)
class Request:
    """What the user asked for: learn (dim, shrinkage) or read `file`; how to validate."""

    dim: int | None = None
    shrinkage: float | None = None
    file: str | None = None
    validate: str | None = None  # "labels", a ground-truth CSV, or None: labels if usable
    save: str | None = None
    digest: str | None = None  # a rebuild: the sha256 `file` had when the index was built


def request(
    whiten: bool = False,
    dim: int | None = None,
    shrinkage: float | None = None,
    file: str | None = None,
    validate: str | None = None,
    save: str | None = None,
) -> Request | None:
    """The checked request of build-index's whitening options; None when none is given."""
    if not (whiten or file):
        given = [
            flag
            for flag, value in (
                ("--whiten-dim", dim),
                ("--shrinkage", shrinkage),
                ("--validate", validate),
                ("--save-whitening", save),
            )
            if value is not None
        ]
        if given:
            raise CbirError(f"{', '.join(given)} only apply with --whiten (or --whitening FILE)")
        return None
    if dim is not None:
        dim = check("whiten_dim", dim, spec=DIM_SPEC)
    if shrinkage is not None:
        shrinkage = check("shrinkage", shrinkage, spec=SHRINKAGE_SPEC)
    if file is not None:
        if dim is not None or shrinkage is not None:
            raise CbirError(
                "--whitening FILE fixes the dimension and shrinkage: leave out --whiten-dim "
                "and --shrinkage"
            )
        check("whitening", file, spec=Spec("path"))
        if save is not None:
            raise CbirError("--save-whitening writes a learned transform: leave out --whitening")
    for key, value in (("validate", validate), ("save_whitening", save)):
        if value is not None:
            check(key, value, spec=Spec("path"))
    return Request(dim, shrinkage, file, validate, save)


def from_record(record: dict[str, Any] | None) -> Request | None:
    """The request that rebuilds a whitened index the way it was built; None if not whitened."""
    if record is None or split_factory(record.get("factory")) is None:
        return None
    dim, _ = split_factory(record["factory"])  # type: ignore[misc]
    info = (read_note(record.get("note")) or {}).get("whitening", {})
    if info.get("file"):
        return Request(
            file=info["file"], validate=info.get("validate_arg"), digest=info.get("file_sha256")
        )
    return Request(dim, info.get("shrinkage", DEFAULT_SHRINKAGE), None, info.get("validate_arg"))


def resolve_dim(req: Request, d_in: int) -> int:
    """The dimension a learned whitening keeps: --whiten-dim, else 512 (at most d_in)."""
    return req.dim or min(DEFAULT_DIM, d_in or DEFAULT_DIM)


def check_files(record: dict[str, Any]) -> tuple[list[str], list[str]]:
    """`verify` of a whitened index's files outside the index folder: (problems, notes).

    The file it was built from (`--whitening FILE`) is what a rebuild reads again: a change
    is a problem (the rebuild refuses it), a missing file a note. The file it saved
    (`--save-whitening`) is the user's to keep or replace: a change is only noted.
    """
    info = (read_note(record.get("note")) or {}).get("whitening", {})
    name, problems, notes = record["name"], [], []
    for key, digest_key, role in (
        ("file", "file_sha256", "built from"),
        ("saved_file", "saved_sha256", "saved"),
    ):
        path, want = info.get(key), info.get(digest_key)
        if not path or not want:
            continue
        try:
            got = index_files.file_digest(Path(path))
        except OSError:
            notes.append(f"index {name}: the whitening file it {role}, {path}, is gone")
            continue
        if got == want:
            continue
        if key == "file":
            problems.append(
                f"index {name}: the whitening file it was built from, {path}, has changed "
                f"(checksum mismatch), so 'cbir build-index {name}' refuses it: restore it, "
                f"or run 'cbir build-index {name} --whitening {path}' to validate the new one"
            )
        else:
            notes.append(f"index {name}: the whitening file it saved, {path}, has changed since")
    return problems, notes


def read_note(note: str | None) -> dict[str, Any] | None:
    """The JSON note of a whitened index, or None."""
    try:
        value = json.loads(note) if note else None
    except ValueError:
        return None
    return value if isinstance(value, dict) and "whitening" in value else None


def describe(info: dict[str, Any]) -> str:
    """One line about an index's whitening, for build-index's output."""
    line = f"whitening: PCA {info['d_in']}->{info['dim']}, shrinkage {info['shrinkage']:g}, " + (
        f"from {info['file']}" if info.get("file") else f"learned on {info['fit_vectors']} vectors"
    )
    if info.get("validation"):
        line += (
            f"; validation mAP {info['map_whitened']:.4f} whitened vs "
            f"{info['map_unwhitened']:.4f} unwhitened ({info['validation']}, "
            f"{info['queries']} queries)"
        )
    else:
        line += "; not validated (no labels or ground truth)"
    return line


# --- the transform -------------------------------------------------------------------------


# The most a transform may scale a unit vector's component by (|A_i| + |b_i|): far above
# any whitening learned from real vectors (full whitening of a 1e-10 eigenvalue is 1e5),
# far below where whitened components overflow float32 or swamp all others.
MAX_GAIN = 1e8


def transform_problem(pca: faiss.PCAMatrix) -> str | None:
    """Why a fitted PCAMatrix cannot be used (arrays of the wrong size, a non-finite value,
    a gain over MAX_GAIN), or None. Every array is checked, not just A: a NaN in the
    bias b makes every whitened vector NaN, and an index of them answers nothing."""
    d_in, d_out = int(pca.d_in), int(pca.d_out)
    arrays = {
        "A": faiss.vector_to_array(pca.A),
        "b": faiss.vector_to_array(pca.b),
        "mean": faiss.vector_to_array(pca.mean),
        "eigenvalues": faiss.vector_to_array(pca.eigenvalues),
    }
    sizes = {"A": d_in * d_out, "b": d_out, "mean": d_in}
    for key, want in sizes.items():
        if arrays[key].size != want:
            return f"its {key} holds {arrays[key].size} values, not {want}"
    for key, values in arrays.items():
        if not np.isfinite(values).all():
            return f"its {key} holds non-finite values"
    a = arrays["A"].astype(np.float64).reshape(d_out, d_in)
    gain = float((np.linalg.norm(a, axis=1) + np.abs(arrays["b"])).max())
    if not gain <= MAX_GAIN:
        return f"it scales a unit vector by up to {gain:.3g} (more than {MAX_GAIN:g})"
    return None


def read_transform(path: str, d_in: int, expect: str | None = None) -> faiss.PCAMatrix:
    """A fitted PCAMatrix from a file written by --save-whitening, checked for `d_in`."""
    return load_transform(path, d_in, expect)[0]


def load_transform(path: str, d_in: int, expect: str | None = None) -> tuple[faiss.PCAMatrix, str]:
    """(the checked PCAMatrix of a whitening file, the sha256 of the bytes read).

    `expect`: the sha256 recorded when an index was built from the file; other bytes are
    refused (a rebuild never silently takes up a changed or swapped file).
    """
    try:  # a FIFO, a device or a huge file is refused before it is read
        data = files.read_regular(path, "whitening", files.WHITENING_MAX)
    except FileNotFoundError:
        raise CbirError(f"whitening file not found: {path}") from None
    except OSError as e:
        raise CbirError(f"cannot read whitening file {path}: {e.strerror}") from None
    digest = hashlib.sha256(data).hexdigest()
    if expect and digest != expect:
        raise CbirError(
            f"whitening file {path} has changed since the index was built from it (checksum "
            "mismatch), so a rebuild does not take it up: restore it, or give it again "
            "with --whitening to validate and use the new file"
        )
    reader = faiss.VectorIOReader()
    faiss.copy_array_to_vector(np.frombuffer(data, dtype=np.uint8), reader.data)
    try:
        vt = faiss.read_VectorTransform(reader)  # comes back as its own type, owned
    except (RuntimeError, MemoryError):
        vt = None
    if not isinstance(vt, faiss.PCAMatrix):
        raise CbirError(
            f"{path} is not a PCA whitening transform (write one with "
            "'cbir build-index NAME --whiten --save-whitening FILE')"
        )
    if vt.d_in != d_in:
        raise CbirError(
            f"{path} transforms {vt.d_in}-d vectors, but the catalog's are {d_in}-d: "
            "it was fitted on another model's vectors"
        )
    if not vt.is_trained or not 1 <= vt.d_out <= DIM_SPEC.hi:
        raise CbirError(f"{path} is not a fitted transform to 1..{DIM_SPEC.hi:g} dimensions")
    if problem := transform_problem(vt):
        raise CbirError(f"{path} is not a usable whitening transform: {problem}")
    return vt, digest


def write_transform(pca: faiss.PCAMatrix, path: str) -> str:
    """Write the fitted transform atomically (as index files are written); its sha256."""
    target = Path(path)
    index_files.write_atomic(
        pca, target, faiss.write_VectorTransform, f"whitening file {target.name}"
    )
    # Temporaries of writes of this file that were killed before their rename.
    for stale in target.parent.glob(f".{glob.escape(target.name)}.*.tmp"):
        with contextlib.suppress(OSError):
            stale.unlink()
    return index_files.file_digest(target)


def wrap(pca: faiss.PCAMatrix, inner: faiss.Index) -> faiss.IndexPreTransform:
    """PCA -> L2 normalisation -> IndexIDMap2(inner): the whitened index.

    The inner index is always under IndexIDMap2 (a bare IVF included), which
    is also how `transform_of` tells a whitened index from a factory's own
    pre-transform (make_index never puts IDMap2 inside one).
    """
    if not isinstance(faiss.downcast_index(inner), faiss.IndexIDMap | faiss.IndexIDMap2):
        inner = faiss.IndexIDMap2(inner)
    index = faiss.IndexPreTransform(faiss.NormalizationTransform(pca.d_out, 2.0), inner)
    index.prepend_transform(pca)
    return index


def transform_of(index: Any) -> Callable[[np.ndarray], np.ndarray] | None:
    """For a whitened index, the function raw vectors -> whitened unit vectors; else None."""
    if not isinstance(index, faiss.Index):
        return None
    outer = faiss.downcast_index(index)
    if not isinstance(outer, faiss.IndexPreTransform) or outer.chain.size() < 2:
        return None
    if not isinstance(faiss.downcast_index(outer.index), faiss.IndexIDMap | faiss.IndexIDMap2):
        return None
    pca = faiss.downcast_VectorTransform(outer.chain.at(0))
    norm = faiss.downcast_VectorTransform(outer.chain.at(1))
    if not isinstance(pca, faiss.PCAMatrix) or not isinstance(norm, faiss.NormalizationTransform):
        return None
    return _Space(index, pca, norm)


class _Space:
    """Raw vectors -> whitened unit vectors; `owner` (the index, which owns the transforms)
    is held so that they live as long as this function."""

    def __init__(self, owner, pca, norm):
        self.owner, self.pca, self.norm = owner, pca, norm
        self.dim = int(pca.d_out)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim != 2 or len(x) == 0:
            return np.zeros((len(x), self.dim), dtype=np.float32)
        return self.norm.apply(self.pca.apply(x))


def whitened(pca: faiss.PCAMatrix) -> Callable[[np.ndarray], np.ndarray]:
    """raw vectors -> whitened unit vectors through a bare PCAMatrix."""
    return _Space(pca, pca, faiss.NormalizationTransform(pca.d_out, 2.0))


class TransformedRows:
    """rows[...] seen through a transform: exact.top_k over the whitened space, in chunks."""

    def __init__(self, rows: np.ndarray, space: Callable[[np.ndarray], np.ndarray]):
        self.rows, self.space = rows, space

    def __getitem__(self, key) -> np.ndarray:
        return self.space(np.asarray(self.rows[key], dtype=np.float32))
