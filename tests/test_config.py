"""Settings: defaults, config files, CBIR_* variables and flags, in that order."""

from __future__ import annotations

import tomllib

import pytest

from conftest import ROOT
from pipeline.config import DEFAULTS, load_settings
from pipeline.errors import CbirError


def test_default_toml_matches_code_defaults():
    with (ROOT / "configs" / "default.toml").open("rb") as f:
        assert tomllib.load(f) == DEFAULTS


def test_corel_config_loads():
    s = load_settings(ROOT / "configs" / "corel1k.toml")
    assert s.split == "database" and s.roots


def test_precedence(tmp_path, monkeypatch):
    cfg = tmp_path / "c.toml"
    cfg.write_text('catalog = "from-file.db"\nk = 5\nindex_dir = "file-index"\n')
    monkeypatch.setenv("CBIR_CATALOG", "from-env.db")
    monkeypatch.delenv("CBIR_INDEX_DIR", raising=False)
    s = load_settings(cfg, {"k": None})
    assert (s.catalog, s.k, s.index_dir) == ("from-env.db", 5, "file-index")
    s = load_settings(cfg, {"catalog": "from-flag.db", "k": 3})
    assert (s.catalog, s.k) == ("from-flag.db", 3)


def test_unknown_key_and_bad_toml_are_refused(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("catalgo = 'x'\n")
    with pytest.raises(CbirError, match="unknown keys catalgo"):
        load_settings(bad)
    bad.write_text("k = = 3\n")
    with pytest.raises(CbirError, match="not valid TOML"):
        load_settings(bad)
