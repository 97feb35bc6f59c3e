"""Config loading, big_vision arguments, overrides and the main entry point's errors."""

import glob
import os
import subprocess
import sys

import ml_collections
import pytest

from instructrl import config as config_lib
from instructrl import main as main_lib
from instructrl.errors import ConfigError
from tests.conftest import REPO, subprocess_env

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


@pytest.mark.parametrize("path", EXPERIMENTS, ids=os.path.basename)
@pytest.mark.parametrize("arg", ["smoke", ""])
def test_every_experiment_config_loads(path, arg):
    cfg = config_lib.load_config(f"{path}:{arg}" if arg else path)
    assert config_lib.stage_names(cfg)
    for name in config_lib.stage_names(cfg):
        assert cfg[name].kind in main_lib.STAGE_MODULES


def _main(*args, cwd=REPO):
    return subprocess.run(
        [sys.executable, "-m", "instructrl.main", *args],
        cwd=cwd,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_main_rejects_unknown_key_with_one_line_and_status_2(tmp_path):
    proc = _main(
        "--config=experiments/tiny_instructgpt.py:smoke",
        f"--workdir={tmp_path}",
        "--config.model.d_modell=3",
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: config key 'model.d_modell' does not exist"
        + proc.stderr.strip().split("does not exist", 1)[1]
    ]
    assert "model.d_modell" in proc.stderr
    assert not os.path.exists(tmp_path / "config.json")


def test_main_rejects_missing_config_file_and_stray_flags(tmp_path):
    proc = _main("--config=experiments/nope.py", f"--workdir={tmp_path}")
    assert proc.returncode == 2 and "experiments/nope.py: config file not found" in proc.stderr
    proc = _main(
        "--config=experiments/tiny_instructgpt.py:smoke", f"--workdir={tmp_path}", "--lr=3"
    )
    assert proc.returncode == 2 and "unknown flag '--lr=3'" in proc.stderr


def test_relative_workdir_checkpoints_and_resumes(tmp_path):
    """`make demo` passes --workdir=runs/demo: a relative folder must hold orbax
    checkpoints (tensorstore wants absolute paths) and be found again on resume."""
    experiment = os.path.join(REPO, "experiments", "tiny_instructgpt.py:smoke")
    args = [
        sys.executable, "-m", "instructrl.main", f"--config={experiment}",
        "--workdir=runs/rel", "--config.stages=world,tokenizer,pretrain",
        "--config.pretrain.num_steps=6", "--config.pretrain.checkpoint_every=2",
    ]  # fmt: skip
    for _ in range(2):  # the second run finds the finished stages in the same folder
        proc = subprocess.run(
            args, cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=300
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
    steps = sorted(os.listdir(tmp_path / "runs" / "rel" / "pretrain" / "checkpoints"))
    assert steps and all(s.isdigit() for s in steps) and "6" in steps
    assert "stage pretrain: finished earlier, skipped" in proc.stderr
