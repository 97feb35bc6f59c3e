"""stages/driver.py helpers that need no training: per-stage data and model overrides."""

from __future__ import annotations

import os

import ml_collections
import pytest

from instructrl.data import default_data_config
from instructrl.errors import ConfigError
from instructrl.stages import driver


def _config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.data = default_data_config()
    config.data.comparisons = "@collect/comparisons.jsonl"
    config.data.seq_len = 96
    config.rm = ml_collections.ConfigDict(dict(kind="rm"))
    config.rm_2 = ml_collections.ConfigDict(dict(kind="rm"))
    config.rm_2.data = ml_collections.ConfigDict(
        dict(comparisons="@collect/comparisons.jsonl,@collect_2/comparisons.jsonl", seq_len=64)
    )
    return config


def test_stage_data_overrides_config_data_and_resolves_paths(tmp_path):
    config, w = _config(), str(tmp_path)
    own = driver.data_config(config, w, "rm_2")
    assert own.comparisons == ",".join(
        os.path.join(w, s, "comparisons.jsonl") for s in ("collect", "collect_2")
    )
    assert own.seq_len == 64 and own.tfds_dir == os.path.join(w, "tfds")
    shared = driver.data_config(config, w, "rm")  # no own data: config.data as it is
    assert shared.comparisons == os.path.join(w, "collect", "comparisons.jsonl")
    assert shared.seq_len == 96
    assert config.data.comparisons == "@collect/comparisons.jsonl"  # not modified in place
    assert driver.data_config(config, w).to_dict() == shared.to_dict()


def test_unknown_stage_data_key_names_it(tmp_path):
    config = _config()
    config.rm_2.data.comparison = "x.jsonl"
    with pytest.raises(ConfigError, match=r"^config key 'rm_2\.data\.comparison' is not a key"):
        driver.data_config(config, str(tmp_path), "rm_2")
