"""Settings: code defaults, then a TOML file, then CBIR_* variables, then flags.

Every option of every command is a key here, so a config file can hold any of
them. `configs/default.toml` lists the same defaults as `DEFAULTS` (a test
keeps the two equal).
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

from pipeline.errors import CbirError

DEFAULTS: dict[str, Any] = {
    # where things live
    "catalog": "catalog.db",
    "index_dir": "index",
    # the model
    "weights": "imagenet",
    "pooling": "avg",
    "batch_size": 32,
    # decoding
    "workers": 2,
    "max_pixels": 89_478_485,
    # indexing
    "labels": "folder",
    "split": "",
    "prune": False,
    "strict": False,
    "retry_failed": False,
    # search
    "k": 10,
    "index": "exact",
    "rerank": "",
    "rerank_n": 10,
    "rerank_alpha": 3.0,
    "shortlist": 100,
}

# Variables that scripts rely on; each maps to one settings key.
ENV_VARS = {
    "CBIR_CATALOG": "catalog",
    "CBIR_INDEX_DIR": "index_dir",
    "CBIR_WEIGHTS": "weights",
    "CBIR_CONFIG": None,  # names the config file itself
}


def read_toml(path: str | Path) -> dict[str, Any]:
    """Read a config file; unknown keys are an error so typos don't pass silently."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise CbirError(f"config file not found: {path}") from None
    except tomllib.TOMLDecodeError as e:
        raise CbirError(f"config file {path} is not valid TOML: {e}") from None
    unknown = sorted(set(data) - set(DEFAULTS) - {"roots"})
    if unknown:
        raise CbirError(f"config file {path}: unknown keys {', '.join(unknown)}")
    # Relative paths in a config file are relative to the working directory,
    # like the same paths given as flags.
    return data


def load_settings(
    config_file: str | Path | None = None, flags: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Merge defaults < config file < CBIR_* variables < flags (None = not given)."""
    settings = dict(DEFAULTS)
    config_file = config_file or os.environ.get("CBIR_CONFIG")
    if config_file:
        settings.update(read_toml(config_file))
    for var, key in ENV_VARS.items():
        if key and os.environ.get(var):
            settings[key] = os.environ[var]
    for key, value in (flags or {}).items():
        if value is not None and value != ():
            settings[key] = value
    return settings
