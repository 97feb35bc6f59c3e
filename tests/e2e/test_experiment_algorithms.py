"""experiments/tiny_instructgpt.py `:algorithms` (issue 22's comparison): its stages and
settings, and its smoke version end to end through the CLI (eval's per-method table with
KL, NLL and training cost, and frontier.png)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from instructrl import config as config_lib
from tests.conftest import REPO, subprocess_env

EXPERIMENT = os.path.join(REPO, "experiments", "tiny_instructgpt.py")
METHODS = ("SFT", "PPO", "PPO-ptx", "DPO", "GRPO", "RLOO")


@pytest.mark.parametrize("arg", ["algorithms", "algorithms,smoke"])
def test_algorithms_config_shares_sft_rm_and_episodes(arg):
    config = config_lib.load_config(f"{EXPERIMENT}:{arg}")
    stages = config_lib.stage_names(config)
    assert stages[-4:] == ["dpo", "grpo", "rloo", "eval"] and "ppo_gold" not in stages
    for name in ("ppo", "ppo_ptx", "dpo", "grpo", "rloo"):
        assert config[name].init_from == "sft", name
    for name in ("grpo", "rloo"):
        c = config[name]
        assert c.reward_from == config.ppo.reward_from
        assert c.batch_size * c.group_size == config.ppo.batch_size  # PPO's episodes
        assert c.num_iterations == config.ppo.num_iterations and c.kl_coef == config.ppo.kl_coef
    assert (config.grpo.advantage, config.grpo.kl_penalty) == ("grpo", "loss")
    assert (config.rloo.advantage, config.rloo.kl_penalty) == ("rloo", "reward")
    labels = [m.split("=")[0] for m in config.eval.models]
    assert all(m in labels for m in METHODS) and config.eval.best_of_n > 0


@pytest.mark.slow
def test_algorithms_smoke_end_to_end(tmp_path):
    workdir = str(tmp_path / "run")
    proc = subprocess.run(
        [sys.executable, "-m", "instructrl.main", f"--config={EXPERIMENT}:algorithms,smoke",
         f"--workdir={workdir}"],
        env=subprocess_env(), cwd=REPO, capture_output=True, text=True, timeout=1200,
    )  # fmt: skip
    if proc.returncode != 0:
        pytest.fail(f"exit {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-8000:]}")
    with open(os.path.join(workdir, "eval", "results.json")) as f:
        results = json.load(f)
    by_label = {m["label"]: m for m in results["models"] if not m["fewshot"]}
    for label in METHODS:
        m = by_label[label]
        assert 0 <= m["win_rate"] <= 1 and m["kl_to_reference"] is not None, label
        assert m["heldout_nll"] > 0 and m["gold_score"] is not None, label
        cost = results["training_costs"][m["stage"]]
        assert cost["train_seconds"] > 0 and cost["train_peak_rss_mb"] > 0, label
    assert results["best_of_n"] and "frontier.png" in results["plots"]
    with open(os.path.join(workdir, "eval", "frontier.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with open(os.path.join(workdir, "eval", "results.md")) as f:
        md = f.read()
    assert "## Methods: win rate, KL and cost" in md and "| RLOO |" in md
