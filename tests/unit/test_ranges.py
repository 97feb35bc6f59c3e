"""Tests for instructrl/ranges.py: every numeric config value has a declared range, the
experiments are inside them, and a value outside names its key.

The same faults through the command line: tests/stages/test_faults.py.
"""

from __future__ import annotations

import dataclasses
import glob
import os

import ml_collections
import pytest

from instructrl import config as config_lib
from instructrl import ranges
from instructrl.data import default_data_config
from instructrl.errors import ConfigError
from instructrl.models import ModelConfig
from instructrl.stages import (
    collect,
    dpo,
    evaluate,
    grpo,
    ppo,
    pretrain,
    reward,
    sft,
    smoke,
    tokenizer,
    world,
)  # fmt: skip
from instructrl.train_lib import default_optimizer_config
from tests.conftest import REPO

STAGE_MODULES = dict(
    smoke=smoke, world=world, tokenizer=tokenizer, pretrain=pretrain, sft=sft, collect=collect,
    rm=reward, ppo=ppo, grpo=grpo, dpo=dpo, eval=evaluate,
)  # fmt: skip
TINY = os.path.join(REPO, "experiments", "tiny_instructgpt.py")


def _numeric(value) -> bool:
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))


def _missing(section, rules, prefix) -> list[str]:
    return [f"{prefix}{k}" for k, v in section.items() if _numeric(v) and k not in rules]


def test_every_numeric_default_has_a_declared_range():
    assert set(STAGE_MODULES) == set(ranges.KINDS)
    missing = []
    for kind, module in STAGE_MODULES.items():
        c = module.default_config()
        flat = {k: v for k, v in c.items() if not isinstance(v, ml_collections.ConfigDict)}
        missing += _missing(flat, ranges.KINDS[kind], f"{kind}.")
        for sub in (k for k, v in c.items() if isinstance(v, ml_collections.ConfigDict)):
            missing += _missing(c[sub], ranges.SUBSECTIONS[sub], f"{kind}.{sub}.")
    missing += _missing(default_data_config(), ranges.DATA, "data.")
    missing += _missing(default_optimizer_config(), ranges.OPTIMIZER, "optimizer.")
    model = {f.name: f.default for f in dataclasses.fields(ModelConfig)}
    model.update({k: 1 for k, v in model.items() if v is dataclasses.MISSING})
    missing += _missing(model, ranges.MODEL, "model.")
    assert not missing


@pytest.mark.parametrize(
    "path",
    sorted(p for p in glob.glob(os.path.join(REPO, "experiments", "*.py")) if "__" not in p),
    ids=os.path.basename,
)
def test_every_experiment_is_inside_the_ranges(path):
    for arg in ("", "smoke", "full", "rounds=2,flawed_demos"):
        try:
            config = config_lib.load_config(f"{path}:{arg}" if arg else path)
        except ConfigError:
            continue  # an argument this experiment does not take
        ranges.check(config)


@pytest.mark.parametrize(
    "override, message",
    [
        ("pretrain.batch_size=-8", "config key 'pretrain.batch_size' = -8: must be >= 1"),
        ("pretrain.num_epochs=0", "config key 'pretrain.num_epochs' = 0: must be >= 1"),
        ("ppo.num_iterations=0", "config key 'ppo.num_iterations' = 0: must be >= 1"),
        ("sft.num_steps=-1", "'sft.num_steps' = -1: must be >= 0 (0 = train num_epochs epochs)"),
        ("rm.accum_steps=0", "config key 'rm.accum_steps' = 0: must be >= 1"),
        ("ppo_ptx.optimizer.lr=0", "config key 'ppo_ptx.optimizer.lr' = 0.0: must be > 0"),
        ("ppo.num_minibatches=0", "config key 'ppo.num_minibatches' = 0: must be >= 1"),
        ("data.seq_len=1", "config key 'data.seq_len' = 1: must be >= 2"),
        ("model.d_model=0", "config key 'model.d_model' = 0: must be >= 1"),
        ("mesh.data=0", "'mesh.data' = 0: must be >= 1 or -1 (-1 = the remaining devices)"),
        ("world.demo_error_rate=1.5", "'world.demo_error_rate' = 1.5: must be >= 0 and <= 1"),
        ("eval.num_samples=0", "config key 'eval.num_samples' = 0: must be >= 1"),
        ("collect.k_min=1", "config key 'collect.k_min' = 1: must be >= 2"),
        ("smoke.batch_size=0", None),  # smoke is not a stage of this config: not checked
    ],
)
def test_a_value_out_of_range_names_its_key(override, message):
    config = config_lib.load_config(f"{TINY}:smoke")
    config_lib.apply_overrides(config, [override])
    names = config_lib.stage_names(config)
    if message is None:
        ranges.check(config, names)
        return
    with pytest.raises(ConfigError) as e:
        ranges.check(config, names)
    assert message in str(e.value) and str(e.value).startswith("config key '")


def test_the_documented_special_values_are_allowed():
    config = config_lib.load_config(f"{TINY}:smoke")
    config_lib.apply_overrides(
        config,
        ["pretrain.num_steps=0", "mesh.data=-1", "data.max_responses=0", "eval.num_prompts=0",
         "ppo.ptx_coef=0", "sft.dropout=-1", "data.num_epochs=0"],
    )  # fmt: skip
    config.model.num_kv_heads = None
    ranges.check(config)
