"""Config loading (instructrl/config.py), big_vision arguments and overrides.

The main entry point's errors through the command line: tests/stages/test_main.py.
"""

import glob
import os

import ml_collections
import pytest

from instructrl import config as config_lib
from instructrl import main as main_lib
from instructrl.errors import ConfigError
from tests.conftest import REPO

EXPERIMENTS = sorted(
    p for p in glob.glob(os.path.join(REPO, "experiments", "*.py")) if not p.endswith("__init__.py")
)


def test_parse_arg_flags_values_and_unknown():
    arg = config_lib.parse_arg("size=large, smoke,seed=3", size="small", smoke=False, seed=0)
    assert arg.size == "large" and arg.smoke is True and arg.seed == 3
    assert config_lib.parse_arg(None, smoke=False).smoke is False
    with pytest.raises(ConfigError, match="config argument 'sizee' is unknown"):
        config_lib.parse_arg("sizee=x", size="small")
    with pytest.raises(ConfigError, match="cannot read 'x' as int"):
        config_lib.parse_arg("seed=x", seed=0)


def _cfg():
    return ml_collections.ConfigDict(
        dict(seed=0, stages="a", a=dict(kind="smoke", lr=1e-3, steps=10, on=True, name="x"))
    )


def test_overrides_take_the_type_of_the_current_value():
    cfg = _cfg()
    config_lib.apply_overrides(cfg, ["a.lr=2e-4", "a.steps=7", "a.on=false", "a.name=y"])
    assert cfg.a.lr == 2e-4 and cfg.a.steps == 7 and cfg.a.on is False and cfg.a.name == "y"


@pytest.mark.parametrize(
    "override, message",
    [
        ("a.lrr=1", "config key 'a.lrr' does not exist"),
        ("b.lr=1", "config key 'b' does not exist"),
        ("a.steps=ten", "config key 'a.steps': cannot read 'ten' as int"),
        ("a=3", "config key 'a' is a section"),
        ("a.lr", "needs the form --config.KEY=VALUE"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        config_lib.apply_overrides(_cfg(), [override])


def test_stage_names_need_sections_with_a_kind():
    cfg = _cfg()
    assert config_lib.stage_names(cfg) == ["a"]
    cfg.stages = "a,b"
    with pytest.raises(ConfigError, match=r"names .b. but there is no config\.b"):
        config_lib.stage_names(cfg)


def test_stages_are_a_list_and_the_command_line_splits_commas():
    cfg = ml_collections.ConfigDict(
        dict(stages=["a"], a=dict(kind="smoke"), b=dict(kind="smoke"), c=dict(kind="smoke"))
    )
    assert config_lib.stage_names(cfg) == ["a"]
    config_lib.apply_overrides(cfg, ["stages=c, a,b"])
    assert cfg.stages == ["c", " a", "b"] and config_lib.stage_names(cfg) == ["c", "a", "b"]
    cfg.stages = ["a", "a"]
    with pytest.raises(ConfigError, match=r"repeats a stage"):
        config_lib.stage_names(cfg)


@pytest.mark.parametrize("path", EXPERIMENTS, ids=os.path.basename)
@pytest.mark.parametrize("arg", ["smoke", ""])
def test_every_experiment_config_loads(path, arg):
    cfg = config_lib.load_config(f"{path}:{arg}" if arg else path)
    assert config_lib.stage_names(cfg)
    for name in config_lib.stage_names(cfg):
        assert cfg[name].kind in main_lib.STAGE_MODULES
