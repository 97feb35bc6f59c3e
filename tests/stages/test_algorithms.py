"""The `grpo` and `dpo` stage drivers through the real CLI, on test_ppo.py's pre-PPO run
(the session fixture `ppo_base`: world ... rm of the smoke experiment, 3 steps each).

  grpo (G = 2, KL as k3 loss, ptx) and dpo log their metrics     test_metrics_learning_and_compile_once
    every step; DPO's implicit-reward accuracy on its training
    pairs starts at exactly 1/2 (policy = reference) and rises;
    each stage compiles its programs once
  SIGKILL at a random step, re-run -> final state (incl. Adam,   test_sigkill_then_rerun_is_bit_identical
    EMA, KL controller, DPO's reference), export and metrics
    bit-identical
Same numbers on 1 vs 8 devices and learning on a toy reward: tests/unit/test_rl_critic_free.py
(GRPO, Dr.GRPO, RLOO) and tests/unit/test_dpo.py.
"""

from __future__ import annotations

import math
import os
import random
import signal

import numpy as np
import pytest

from tests.conftest import made_once
from tests.stages.test_ppo import (
    CONFIG,
    assert_trees_equal,
    checkpoint_state,
    committed_steps,
    exported_params,
    interrupt,
    read_metrics,
)

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("ppo_stage")]

STEPS = 8
EXTRA = f"""
    from instructrl.stages import dpo, grpo

    config.grpo = grpo.default_config()
    config.grpo.update(batch_size=4, group_size=2, num_minibatches=2, num_iterations={STEPS},
                       max_new_tokens=config.ppo.max_new_tokens, checkpoint_every=1,
                       log_every=1, warmup_iterations=1, ptx_coef=0.5, ptx_ratio=1.0,
                       kl_coef=0.1)
    config.grpo.optimizer.lr = 1e-3
    config.dpo = dpo.default_config()
    config.dpo.update(batch_size=4, num_steps={STEPS}, log_every=1, checkpoint_every=1,
                      beta=0.5)
    config.dpo.optimizer.update(lr=3e-3, warmup_steps=1)
    return config
"""


def compile_counts(log: str, stage: str) -> dict[str, int]:
    start = log.index(f"stage {stage} (")
    end = log.find(": starting", log.index(": starting", start) + 10)
    counts: dict[str, int] = {}
    for line in log[start : end if end > 0 else None].splitlines():
        if "Compiling jit(" in line:
            name = line.split("Compiling jit(")[1].split(")")[0]
            counts[name] = counts.get(name, 0) + 1
    return counts


@pytest.fixture(scope="module")
def alg(ppo_base):
    """ppo_base with a config that adds the grpo and dpo sections."""
    config = os.path.join(ppo_base.root, "alg_test_config.py")
    with open(config, "w") as f:
        f.write(CONFIG.replace("    return config\n", EXTRA))
    ppo_base.alg_config = config
    return ppo_base


def run_alg(env, workdir, stages, **kw):
    old, env.config = env.config, env.alg_config
    try:
        return env.run(workdir, stages, **kw)
    finally:
        env.config = old


@pytest.fixture(scope="module")
def ref(alg, tmp_path_factory):
    """The uninterrupted grpo and dpo run and its log, once per session (made_once)."""

    def make(folder: str) -> None:
        proc = run_alg(alg, alg.copy_base(os.path.join(folder, "run")), "grpo,dpo")
        with open(os.path.join(folder, "stderr.log"), "w") as f:
            f.write(proc.stderr)

    folder = made_once(tmp_path_factory, "alg_ref", make)
    with open(os.path.join(folder, "stderr.log")) as f:
        return os.path.join(folder, "run"), f.read()


def test_metrics_learning_and_compile_once(ref):
    workdir, log = ref
    grpo = read_metrics(workdir, "grpo")
    assert [m["step"] for m in grpo] == list(range(1, STEPS + 1))
    for m in grpo:
        assert all(math.isfinite(v) for v in m.values()), m
        assert m["episodes"] == m["step"] * 8 and "value_loss" not in m
        assert m["ptx_loss"] > 1.0 and m["kl_loss"] >= 0 and 0 <= m["groups_flat_frac"] <= 1
        assert m["loss"] == pytest.approx(m["policy_loss"] + 0.1 * m["kl_loss"]
                                          + 0.5 * m["ptx_loss"], rel=1e-4, abs=1e-5)  # fmt: skip
    counts = compile_counts(log, "grpo")
    assert counts.get("rollout") == counts.get("inner") == 1, counts

    dpo = read_metrics(workdir, "dpo")
    assert [m["step"] for m in dpo] == list(range(1, STEPS + 1))
    assert dpo[0]["accuracy"] == 0.5 and dpo[0]["margin"] == 0.0  # policy == reference
    late = np.mean([m["accuracy"] for m in dpo[-3:]])
    print("dpo accuracy by step:", [round(m["accuracy"], 3) for m in dpo])
    assert late > 0.6, [m["accuracy"] for m in dpo]
    assert dpo[-1]["margin"] > 0
    assert compile_counts(log, "dpo").get("inner") == 1, compile_counts(log, "dpo")
    assert os.path.exists(os.path.join(workdir, "dpo", "export"))


@pytest.mark.parametrize("stage", ["grpo", "dpo"])
def test_sigkill_then_rerun_is_bit_identical(alg, ref, tmp_path, stage):
    workdir = alg.copy_base(str(tmp_path / "run"))
    kill_at = random.Random().randint(2, STEPS - 2)
    old, alg.config = alg.config, alg.alg_config
    try:
        code, _ = interrupt(alg, workdir, stage, signal.SIGKILL, kill_at)
    finally:
        alg.config = old
    assert code == -signal.SIGKILL
    saved = committed_steps(workdir, stage)
    what = f"{stage} killed after step {kill_at}, checkpoints {saved}"
    assert saved and not os.path.exists(os.path.join(workdir, stage, "DONE")), what
    proc = run_alg(alg, workdir, stage)
    if saved[-1] < STEPS:
        assert "resumed from" in proc.stderr, what
    ref_dir, _ = ref
    timing = ("seconds", "_per_s", "fraction")
    got, want = read_metrics(workdir, stage), read_metrics(ref_dir, stage)
    assert [m["step"] for m in got] == [m["step"] for m in want], what
    for g, w in zip(got, want, strict=True):
        moved = sorted(k for k in w if not any(t in k for t in timing) and g.get(k) != w[k])
        assert not moved, f"{what}: step {w['step']}: {moved} differ"
    assert_trees_equal(
        checkpoint_state(workdir, stage, STEPS), checkpoint_state(ref_dir, stage, STEPS), what
    )
    assert_trees_equal(exported_params(workdir, stage), exported_params(ref_dir, stage), what)
