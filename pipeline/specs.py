"""What each setting, option and variable accepts, and the checks that refuse the rest.

`SPEC` says what each settings key accepts, `OPTIONS` the flags of single
commands, `SEARCH_PARAMS` the --param values and `ENV_INTS` the integer
variables; values are checked where they enter (a config file, a variable,
the merged settings of a CLI or API call, a web form), so a bad one is refused
in one line before any work. The CLI builds its Click types from the same
specs: each range is written once, here. Parsing a checked value (re-ranking
names, rotation angles) is here too, next to its check.

Apart from `config` (the `Settings`, their defaults, and reading them from a
TOML file and the environment) because every layer checks values, while only
the entry points load settings; this module imports nothing of cbir but errors.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pipeline.errors import CbirError

# avg, GeM, R-MAC, or several summed (each normalised): see descriptor.py.
POOLINGS = ("avg", "gem", "rmac", "avg+gem", "avg+rmac", "gem+rmac", "avg+gem+rmac")
INPUTS = ("crop", "whole")
RUNTIMES = ("auto", "keras", "openvino")
PRECISIONS = ("auto", "fp32", "bf16", "int8")
ENGINES = ("local", "ray")
# In the order they apply: DBA first, then QE on its vectors, then local-feature
# verification (`retrieval.verify`) of the final order's top `verify_n`.
RERANK_METHODS = ("dba", "aqe", "verify")
VECTOR_RERANK = ("dba", "aqe")  # what `ranking.ranked` does on vectors
RERANK_TEXT = "'' (none), 'dba', 'aqe', 'dba+aqe', 'verify' or any of them +verify"
EVALUATION_METHODS = ("resnet50", "color", "hybrid")
# Query rotations: "0" = off; each other choice lists the angles (degrees counter-clockwise).
ROTATIONS = ("0", "0,90,180,270", "0,90,270")


@dataclass(frozen=True)
class Spec:
    """What one setting or option accepts.

    kind: "int", "float" (finite), "bool", "str", "path" (non-empty str or
    PathLike), "choice", "rerank" (names joined by '+'), "roots" (one path or
    a list of paths), "ids" (a list of catalog ids). lo/hi bound numbers;
    lo_open/hi_open exclude the bound itself.
    """

    kind: str
    lo: float | None = None
    hi: float | None = None
    choices: tuple[str, ...] = ()
    lo_open: bool = False
    hi_open: bool = False

    def allowed(self) -> str:
        """The accepted values in words, for error messages."""
        if self.kind in ("int", "float", "ids"):
            noun = {"int": "an integer", "float": "a finite number", "ids": "a list of ids"}
            lo, hi = _number(self.lo), _number(self.hi)
            if self.hi is None:
                return f"{noun[self.kind]} {'above' if self.lo_open else 'at least'} {lo}"
            if self.lo_open or self.hi_open:
                lo = f"above {lo}" if self.lo_open else f"at least {lo}"
                hi = f"below {hi}" if self.hi_open else f"at most {hi}"
                return f"{noun[self.kind]} {lo} and {hi}"
            return f"{noun[self.kind]} from {lo} to {hi}"
        return {
            "bool": "true or false",
            "str": "a string",
            "path": "a non-empty path (no NUL characters)",
            "choice": "one of " + ", ".join(self.choices),
            "rerank": RERANK_TEXT,
            "roots": "a folder, image or manifest CSV, or a list of them",
        }[self.kind]


# Catalog ids are SQLite integers (signed 64-bit).
ID = Spec("int", 0, 2**63 - 1)

SPEC: dict[str, Spec] = {
    "catalog": Spec("path"),
    "index_dir": Spec("path"),
    "weights": Spec("path"),
    "pooling": Spec("choice", choices=POOLINGS),
    "input": Spec("choice", choices=INPUTS),
    "image_size": Spec("int", 64, 1024),
    "scales": Spec("str"),  # descriptor.parse_scales checks it where the descriptor is made
    # A batch of 1024 is ~600 MB of float32 pixels plus the model's activations.
    "batch_size": Spec("int", 1, 1024),
    "runtime": Spec("choice", choices=RUNTIMES),
    "precision": Spec("choice", choices=PRECISIONS),
    "calibration": Spec("str"),
    "allow_mixed": Spec("bool"),
    "workers": Spec("int", 1, 64),
    "max_pixels": Spec("int", 1),
    "labels": Spec("path"),  # "folder", "none" or a CSV file
    "split": Spec("str"),
    "prune": Spec("bool"),
    "strict": Spec("bool"),
    "retry_failed": Spec("bool"),
    "engine": Spec("choice", choices=ENGINES),
    "ray_address": Spec("str"),
    "actors": Spec("int", 0, 4096),
    "actor_cpus": Spec("int", 1, 1024),
    "update_indexes": Spec("bool"),
    "k": Spec("int", 1, 10_000),
    "index": Spec("path"),  # an index name; index_path checks its characters
    "rerank": Spec("rerank"),
    "rerank_n": Spec("int", 1, 1000),
    # similarity ** alpha: beyond ~100 every weight but the query's own is 0.
    "rerank_alpha": Spec("float", 0, 100),
    "shortlist": Spec("int", 1, 10_000),
    # Candidates verified by local features (`--rerank verify`): ~2.4 ms each when cached,
    # ~10 ms each from the file (docs/usage.md); 1,000 is ~10 s of a cold query.
    "verify_n": Spec("int", 1, 1000),
    "rotations": Spec("choice", choices=ROTATIONS),
    "min_score": Spec("float", -1, 1),  # a cosine similarity
    "roots": Spec("roots"),
}
# Relevance feedback: ids the user marked (per query, not settings).
FEEDBACK_IDS = Spec("ids", ID.lo, ID.hi)

# Search parameters (--param NAME=VALUE). FAISS casts them to C integers, so
# NaN, infinities and huge values would become garbage; cbir's own `refine`
# multiplies k.
SEARCH_PARAMS: dict[str, Spec] = {
    "nprobe": Spec("int", 1, 1 << 20),
    "efSearch": Spec("int", 1, 1 << 16),
    "refine": Spec("int", 1, 1000),
}
OTHER_SEARCH_PARAM = Spec("float", 0, 2**31 - 1)
# More inverted lists than this cannot be sensible (FAISS suggests 2^20 at a billion vectors).
IVF_LISTS_MAX = 1 << 24

# Flags of single commands that are not settings.
OPTIONS: dict[str, Spec] = {
    "id": ID,
    "target_recall": Spec("float", 0, 1, lo_open=True),
    "hybrid_weight": Spec("float", 0, 1),
    "epochs": Spec("int", 1, 10_000),
    "val_fraction": Spec("float", 0, 1, lo_open=True, hi_open=True),
    "seed": Spec("int", 0, 2**32 - 1),  # what numpy and Keras seeding accept
    "learning_rate": Spec("float", 0, 1, lo_open=True),
    "limit": Spec("int", 1),
    "repeats": Spec("int", 1, 1000),
    "queries": Spec("int", 1, 100_000),
    "bench_size": Spec("int", 100, 10**9),
    "bench_kinds": Spec("choice", choices=("flat", "hnsw", "ivf", "ivfpq")),
    "port": Spec("int", 0, 65535),
    "max_upload_mb": Spec("float", 0, 4096, lo_open=True),
    "uploads": Spec("int", 1, 100_000),
    # cbir duplicates: cosine thresholds (a duplicate is at least this close to its group's centre)
    "near": Spec("float", 0, 1, lo_open=True),
    "similar": Spec("float", 0, 1, lo_open=True),
    "include": Spec("choice", choices=("exact", "near", "similar")),
    # cbir watch: seconds of quiet before a batch, the longest wait after its first event,
    # and between full rescans (0: none)
    "debounce": Spec("float", 0, 3600),
    "max_wait": Spec("float", 0, 86400, lo_open=True),
    "rescan": Spec("float", 0, 7 * 86400),
}


# Integer variables that are not settings, each read where it acts (runtime_openvino, faults)
# and checked when a command starts (cli/options.py check_environment): one line, no work done.
ENV_INTS: dict[str, Spec] = {
    "CBIR_THREADS": Spec("int", 1, 4096),  # the model's threads (a Ray actor's CPUs)
    "CBIR_CRASH_AFTER": Spec("int", 1),  # crash injection for tests (faults.py)
}


def env_int(var: str) -> int | None:
    """The value of an ENV_INTS variable: None when unset or blank, else checked (CbirError)."""
    text = os.environ.get(var, "").strip()
    if not text:
        return None
    spec = ENV_INTS[var]
    try:
        value: int | None = int(text)
    except ValueError:
        value = None
    if value is None or not _in_range(value, spec):
        raise CbirError(f"{var} must be {spec.allowed()}, got {_shown(text)}")
    return value


def rotation_angles(value: str) -> tuple[int, ...]:
    """The angles of a `rotations` setting: "0,90,180,270" -> (0, 90, 180, 270)."""
    check("rotations", value)
    return tuple(int(a) for a in value.split(","))


def parse_rerank(value: str | Sequence[str] | None) -> tuple[str, ...]:
    """'dba+aqe' or ['dba', 'aqe'] -> ('dba', 'aqe'); 'verify+dba' -> ('dba', 'verify');
    unknown names are an error."""
    if not value:
        return ()
    names = value.replace(",", "+").split("+") if isinstance(value, str) else list(value)
    names = [n.strip().lower() for n in names if n.strip() and n.strip().lower() != "none"]
    for n in names:
        if n not in RERANK_METHODS:
            raise CbirError(f"unknown re-ranking {n!r}: use {RERANK_TEXT}")
    return tuple(m for m in RERANK_METHODS if m in names)  # DBA, QE on its vectors, verify


def _number(x: float | None) -> str:
    return str(x) if isinstance(x, int | None) else f"{x:g}"


def _shown(value: Any) -> str:
    """A value as it appears in a message: its repr, one line, short."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _in_range(value: float, spec: Spec) -> bool:
    if spec.lo is not None and (value <= spec.lo if spec.lo_open else value < spec.lo):
        return False
    return spec.hi is None or (value < spec.hi if spec.hi_open else value <= spec.hi)


def _is_int(value: Any) -> bool:
    # bool is an int subclass, but `k = true` is a mistake, not 1.
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_path(value: Any) -> bool:
    # A NUL byte cannot be in a file name; os.stat would raise ValueError on it.
    return isinstance(value, str | os.PathLike) and str(value) != "" and "\0" not in str(value)


def _fits(value: Any, spec: Spec) -> bool:
    kind = spec.kind
    if kind == "int":
        return _is_int(value) and _in_range(value, spec)
    if kind == "float":
        ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
        return ok and math.isfinite(value) and _in_range(value, spec)
    if kind == "ids":
        many = isinstance(value, list | tuple)
        return many and all(_is_int(v) and _in_range(v, spec) for v in value)
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "str":
        return isinstance(value, str)
    if kind == "path":
        return _is_path(value)
    if kind == "choice":
        return value in spec.choices
    if kind == "rerank":
        many = isinstance(value, list | tuple) and all(isinstance(v, str) for v in value)
        return isinstance(value, str) or many
    if kind == "roots":
        return _is_path(value) or (isinstance(value, list) and all(map(_is_path, value)))
    raise AssertionError(kind)


def check(key: str, value: Any, where: str = "", spec: Spec | None = None) -> Any:
    """`value` if it fits the spec of `key` (a string root becomes a list); else CbirError.

    `where` prefixes the message with the value's source, e.g. "config file c.toml: ".
    """
    spec = spec or SPEC[key]
    if not _fits(value, spec):
        raise CbirError(f"{where}{key} must be {spec.allowed()}, got {_shown(value)}")
    if spec.kind == "rerank" and value:
        try:
            parse_rerank(value)
        except CbirError as e:
            raise CbirError(f"{where}{e}") from None
    if spec.kind == "roots" and not isinstance(value, list):
        return [value]  # `roots = "imgs"` is one root, not the letters i, m, g, s
    return float(value) if spec.kind == "float" else value


def search_param(key: str, value: Any) -> float:
    """A search parameter (nprobe, efSearch, refine, ...) as a float, if within its range."""
    spec = SEARCH_PARAMS.get(key, OTHER_SEARCH_PARAM)
    number: float | None = None
    if isinstance(value, str | numbers.Real) and not isinstance(value, bool):
        try:
            number = float(value)
        except (ValueError, OverflowError):
            number = None
    ok = number is not None and math.isfinite(number) and _in_range(number, spec)
    if not ok or (spec.kind == "int" and not number.is_integer()):
        raise CbirError(f"search parameter {key} must be {spec.allowed()}, got {_shown(value)}")
    return number


def validate(values: dict[str, Any], where: str = "") -> dict[str, Any]:
    """Check every known key of merged settings, and how they go together."""
    for key, value in values.items():
        if key in SPEC:
            values[key] = check(key, value, where)
    if (
        values.get("rerank")
        and values.get("shortlist", 0) < values.get("k", 0)
        # "none" re-ranks nothing; verification alone needs no shortlist of vectors
        and set(parse_rerank(values["rerank"])) & set(VECTOR_RERANK)
    ):
        raise CbirError(
            f"{where}shortlist ({values['shortlist']}) must be at least k ({values['k']}) "
            "when re-ranking: raise --shortlist or lower -k"
        )
    return values
