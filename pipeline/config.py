"""Settings: code defaults, then a TOML file, then CBIR_* variables, then flags.

Every option of every command is a key here, so a config file can hold any of
them. `configs/default.toml` lists the same defaults as `DEFAULTS` (a test
keeps the two equal). What each key accepts (`SPEC`) and the checks are in
`specs`, which every layer uses; values are checked where they enter (a config
file, a variable, the merged settings of a CLI or API call), so a bad one is
refused in one line before any work.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline import files
from pipeline.errors import CbirError
from pipeline.specs import SPEC, check, validate


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
    # `rerank` "verify": candidates of the first pass checked by local features
    verify_n: int = 50
    # query-time rotations (degrees) of image queries, for photos stored sideways without an
    # EXIF tag: each image keeps its best score; 4 angles = 4x the query embedding and search
    rotations: str = "0"
    # results whose score (cosine similarity, after re-ranking) is below this are left
    # out; -1 keeps every result
    min_score: float = -1.0
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
MAX_MEMORY = "2GB"  # build-index --auto's default memory budget
MAX_UPLOAD_MB = 20.0  # cbir serve's default upload limit

# Variables that scripts rely on; each maps to one settings key.
ENV_VARS = {
    "CBIR_CATALOG": "catalog",
    "CBIR_INDEX_DIR": "index_dir",
    "CBIR_WEIGHTS": "weights",
    "CBIR_CONFIG": None,  # names the config file itself
}


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
