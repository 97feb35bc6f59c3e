"""experiments/tiny_instructgpt.py `:algorithms` (issue 22's comparison): its stages and
settings, and its smoke version end to end through the CLI (eval's per-method table with
KL, NLL and training cost, and frontier.png).

The end-to-end test starts from a copy of the shared `smoke,full` run's stages up to
ppo_ptx (tests/e2e/conftest.py `smoke_full`): `algorithms,smoke` runs those stages with the
very settings of `smoke` (checked here), so the run skips them, as a re-run in a finished
workdir does, and trains only dpo, grpo and rloo before eval."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from instructrl import config as config_lib
from tests.e2e.conftest import EXPERIMENT, run_experiment

METHODS = ("SFT", "PPO", "PPO-ptx", "DPO", "GRPO", "RLOO")
NEW = ("dpo", "grpo", "rloo", "eval")  # the stages the end-to-end run trains


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


def test_algorithms_smoke_reruns_smoke_stages_unchanged():
    """What lets the end-to-end test reuse the `smoke,full` run: the stages and settings
    before dpo are `smoke`'s (and `smoke,full`'s)."""
    alg, full = (config_lib.load_config(f"{EXPERIMENT}:{a}") for a in ("algorithms,smoke",
                                                                     "smoke,full"))  # fmt: skip
    stages = config_lib.stage_names(alg)
    shared = [s for s in stages if s not in NEW]
    assert shared == config_lib.stage_names(full)[: len(shared)] and shared[-1] == "ppo_ptx"
    for key in ("seed", "model", "data", "mesh", *shared):
        assert alg[key] == full[key], key


@pytest.mark.slow
@pytest.mark.xdist_group("smoke_full")
def test_algorithms_smoke_end_to_end(smoke_full, tmp_path):
    workdir = str(tmp_path / "run")
    stages = config_lib.stage_names(config_lib.load_config(f"{EXPERIMENT}:algorithms,smoke"))
    for name in stages:
        if name not in NEW:
            shutil.copytree(os.path.join(smoke_full.workdir, name), os.path.join(workdir, name))
    log = run_experiment("algorithms,smoke", workdir, smoke_full.cache)
    for name in stages:
        skipped = f"stage {name}: finished earlier, skipped" in log
        assert skipped == (name not in NEW), name
        assert os.path.exists(os.path.join(workdir, name, "DONE")), name
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
