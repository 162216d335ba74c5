"""Settings: code defaults, then a TOML file, then CBIR_* variables, then flags.

Every option of every command is a key here, so a config file can hold any of
them. `configs/default.toml` lists the same defaults as `DEFAULTS` (a test
keeps the two equal). `SPEC` says what each key accepts; values are checked
where they enter (a config file, a variable, the merged settings of a CLI or
API call), so a bad one is refused in one line before any work. The CLI
builds its Click types from the same specs: each range is written once, here.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline import files
from pipeline.errors import CbirError


@dataclass(frozen=True)
class Settings:
    """Every setting of every command, typed, with its one default.

    Loaded by `load_settings` (defaults < TOML file < CBIR_* variables <
    flags, each value checked against `SPEC`); the CLI, the API, the server and
    the benchmarks all read this one object. `configs/default.toml` lists the
    same defaults (a test keeps the two equal).
    """

    # where things live
    catalog: str = "catalog.db"
    index_dir: str = "index"
    # the model
    weights: str = "imagenet"
    # The descriptor (see descriptor.py and docs/benchmarks.md, "Instance retrieval"):
    # the whole image, shorter side 224, average and GeM pooling summed. Chosen on the dev
    # data over the paper's 224 crop with average pooling: Holidays-150 mAP 0.765 -> 0.817,
    # UKBench N-S 3.929 -> 3.952, Corel-1K 0.906 -> 0.904, at 0.67x the indexing speed.
    pooling: str = "avg+gem"  # avg, gem, rmac (R-MAC), or several summed ("avg+gem")
    # "crop" (shorter side image_size, central square; the paper) or "whole" (shorter
    # side image_size, the whole image at its aspect ratio), at these scales (summed)
    input: str = "whole"
    image_size: int = 224
    scales: str = "1"
    batch_size: int = 64  # measured: OpenVINO int8 end to end 4.3x Keras at 64, 3.8x at 32
    # the inference runtime: "auto" = the catalog's recorded producer, or for a new
    # catalog the fastest this machine supports (OpenVINO int8 with VNNI)
    runtime: str = "auto"
    precision: str = "auto"
    calibration: str = ""  # int8: a folder of calibration images ("" = 300 of the collection)
    allow_mixed: bool = False  # add vectors of another producer of the same model family
    # decoding
    workers: int = 2
    max_pixels: int = 89_478_485
    # indexing
    labels: str = "folder"
    split: str = ""
    prune: bool = False
    strict: bool = False
    retry_failed: bool = False
    # where decode + embed run: "local" (this process) or "ray" (Ray Data on a cluster;
    # ray_address "" starts a local Ray, "auto" joins `ray start`, or HOST:PORT)
    engine: str = "local"
    ray_address: str = ""
    actors: int = 0  # Ray model actors; 0 = as many as the cluster's CPUs allow
    actor_cpus: int = 1  # CPUs (and model threads) each Ray actor is granted
    # after indexing, grow stale IVF indexes (new vectors added, removed ones removed)
    update_indexes: bool = False
    # search
    k: int = 10
    index: str = "exact"
    rerank: str = ""
    rerank_n: int = 10
    rerank_alpha: float = 3.0
    shortlist: int = 100
    # query-time rotations (degrees) of image queries, for photos stored sideways without an
    # EXIF tag: each image keeps its best score; 4 angles = 4x the query embedding and search
    rotations: str = "0"
    # the folders a config file indexes when `cbir index` is given none
    roots: tuple[str, ...] = ()

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# The defaults as a dict (without roots), as configs/default.toml writes them.
DEFAULTS: dict[str, Any] = {
    f.name: f.default for f in dataclasses.fields(Settings) if f.name != "roots"
}
# avg, GeM, R-MAC, or several summed (each normalised): see descriptor.py.
POOLINGS = ("avg", "gem", "rmac", "avg+gem", "avg+rmac", "gem+rmac", "avg+gem+rmac")
INPUTS = ("crop", "whole")
RUNTIMES = ("auto", "keras", "openvino")
PRECISIONS = ("auto", "fp32", "bf16", "int8")
ENGINES = ("local", "ray")
RERANK_METHODS = ("dba", "aqe")  # in the order they apply: DBA first, then QE on its vectors
EVALUATION_METHODS = ("resnet50", "color", "hybrid")
# Query rotations: "0" = off; each other choice lists the angles (degrees counter-clockwise).
ROTATIONS = ("0", "0,90,180,270", "0,90,270")
MAX_MEMORY = "2GB"  # build-index --auto's default memory budget
MAX_UPLOAD_MB = 20.0  # cbir serve's default upload limit

# Variables that scripts rely on; each maps to one settings key.
ENV_VARS = {
    "CBIR_CATALOG": "catalog",
    "CBIR_INDEX_DIR": "index_dir",
    "CBIR_WEIGHTS": "weights",
    "CBIR_CONFIG": None,  # names the config file itself
}


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
            "rerank": "'' (none), 'dba', 'aqe' or 'dba+aqe'",
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
    "rotations": Spec("choice", choices=ROTATIONS),
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
}


# Integer variables that are not settings, each read where it acts (embed_openvino, faults)
# and checked when a command starts (cli_options.check_environment): one line, no work done.
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
        from pipeline.retrieval.ranking import parse_rerank  # imports FAISS: only when asked for

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
    if values.get("rerank") and values.get("shortlist", 0) < values.get("k", 0):
        from pipeline.retrieval.ranking import parse_rerank

        if parse_rerank(values["rerank"]):  # "none" re-ranks nothing
            raise CbirError(
                f"{where}shortlist ({values['shortlist']}) must be at least k ({values['k']}) "
                "when re-ranking: raise --shortlist or lower -k"
            )
    return values


def read_toml(path: str | Path) -> dict[str, Any]:
    """Read a config file; unknown keys and wrong types are errors so typos don't pass silently."""
    path = Path(path)
    try:
        # utf-8-sig: a byte-order mark, as some Windows editors write, is not TOML.
        # A FIFO, a device or a huge file is refused before it is read (files.py).
        text = files.read_regular(path, "config", files.CONFIG_MAX).decode("utf-8-sig")
        data = tomllib.loads(text)
    except FileNotFoundError:
        raise CbirError(f"config file not found: {path}") from None
    except UnicodeDecodeError as e:
        raise CbirError(f"config file {path} is not UTF-8 text (byte {e.start})") from None
    except tomllib.TOMLDecodeError as e:
        raise CbirError(f"config file {path} is not valid TOML: {e}") from None
    except RecursionError:  # tomllib recurses per level of nested arrays and tables
        raise CbirError(f"config file {path} nests arrays or tables too deeply") from None
    except OSError as e:
        raise CbirError(f"cannot read config file {path}: {e.strerror}") from None
    unknown = sorted(set(data) - set(DEFAULTS) - {"roots"})
    if unknown:
        raise CbirError(f"config file {path}: unknown keys {', '.join(unknown)}")
    # Relative paths in a config file are relative to the working directory,
    # like the same paths given as flags.
    return {key: check(key, value, f"config file {path}: ") for key, value in data.items()}


def load_settings(
    config_file: str | Path | None = None, flags: dict[str, Any] | None = None
) -> Settings:
    """Merge defaults < config file < CBIR_* variables < flags (None = not given), then check.

    Flags that are not settings (a command's own options) are ignored here.
    """
    values = dict(DEFAULTS)
    config_file = config_file or os.environ.get("CBIR_CONFIG")
    if config_file:
        values.update(read_toml(config_file))
    for var, key in ENV_VARS.items():
        if key and os.environ.get(var):
            values[key] = check(key, os.environ[var], f"{var}: ")
    for key, value in (flags or {}).items():
        if key in SPEC and value is not None and value != ():
            values[key] = value
    values = validate(values)
    values["roots"] = tuple(str(r) for r in values.get("roots", ()))
    return Settings(**values)
