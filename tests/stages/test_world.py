"""The `world` stage (instructrl/stages/world.py) through `python -m instructrl.main`: its config
errors and the `flawed_demos` experiment argument."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from instructrl.world import vocab, write_world
from instructrl.world.vocab import perturb_answer
from tests.conftest import REPO, subprocess_env
from tests.unit.test_world import SMALL


def _world_stage(workdir, arg: str, *overrides: str) -> subprocess.CompletedProcess:
    """`python -m instructrl.main` running only the tiny experiment's `world` stage."""
    return subprocess.run(
        [sys.executable, "-m", "instructrl.main",
         f"--config=experiments/tiny_instructgpt.py:{arg}", f"--workdir={workdir}",
         "--config.stages=world", *overrides],
        cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def test_bad_slip_kind_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="demo_slips='typo'"):
        write_world(str(tmp_path / "w"), seed=0, demo_slips="typo", **SMALL)
    with pytest.raises(ValueError, match="slip kind 'typo'"):
        perturb_answer("a b", np.random.default_rng(0), "typo")
    for override, message in (
        ("demo_slips=typo", "error: config key 'world.demo_slips' ('typo') must be one of"),
        # Numbers are range-checked before any stage runs (instructrl/ranges.py).
        ("demo_error_rate=1.5", "error: config key 'world.demo_error_rate' = 1.5: must be >= 0"),
    ):
        proc = _world_stage(tmp_path / "run", "smoke", f"--config.world.{override}")
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert proc.stderr.strip().splitlines()[-1].startswith(message)
        assert not os.path.exists(tmp_path / "run" / "world")


def test_flawed_demos_argument_writes_a_filler_world(tmp_path):
    """`:flawed_demos` reaches the world stage: half the demonstrations end in fillers."""
    proc = _world_stage(tmp_path, "smoke,flawed_demos")
    assert proc.returncode == 0, proc.stderr[-2000:]
    with open(tmp_path / "world" / "world.json") as f:
        meta = json.load(f)
    assert (meta["demo_error_rate"], meta["demo_slips"]) == (0.5, "filler")
    with open(tmp_path / "world" / "demonstrations.jsonl") as f:
        demos = [json.loads(line) for line in f]
    ends = [d["completion"].split()[-1] in vocab.FILLERS for d in demos]
    assert 0.35 < np.mean(ends) < 0.65, np.mean(ends)
