"""End-to-end tests of the PPO stage driver (instructrl/stages/ppo.py) through the real CLI.

One module fixture runs the stages before PPO (world, tokenizer, pretrain, sft, collect, rm;
the smoke experiment cut to 3 steps each) once, in this process, with
`instructrl.main.run`. Every PPO run is then `python -m instructrl.main --config=<this
module's config> --workdir=<a copy> --config.stages=ppo|ppo_ptx` in a subprocess, so exit
codes, SIGKILL and SIGTERM are real. All runs share a persistent XLA compilation cache (a
module temporary folder): a cached executable is the very program a fresh compile makes, so
it changes no number, and only the first PPO run pays for compiling. Subprocesses run with
JAX_LOG_COMPILES=1, so their logs list every compilation.

What each test shows (the PPO stage "must show" list):
  ppo and ppo_ptx log every documented metric each       test_metrics_per_iteration_and_export
    iteration, beta follows the adaptive controller,
    score = gain x score_raw + bias (the RM's saved
    normalisation), loss / lr / throughput add up,
    the checkpointed EMA follows its update, and the
    exported EMA policy loads and runs
  the rollout and the update compile once per stage      test_rollout_and_update_compile_once
    (also after a resume)
  SIGKILL at a random iteration, re-run -> final state   test_sigkill_then_rerun_is_bit_identical
    (params, Adam moments, EMA, KL controller, rng),
    export and metrics bit-identical (plain PPO)
  SIGTERM -> checkpoint, exit 143, re-run completes      test_sigterm_exits_143_and_rerun_completes
    bit-identically (PPO-ptx: the pretraining stream's
    position is resumed too)
  gold_reward: the score is scale x the gold score     test_gold_reward_scores_episodes_with_the_gold_scorer
    the host computes from the same rollout
  a diverging run stops with "step N: loss is nan",      test_non_finite_metric_stops_the_run
    keeping the checkpoint before it and saving none after
Same numbers on 1 device and a (2, 2, 2) mesh: tests/unit/test_rl_ppo.py covers the compiled core;
at the stage level an 8-device run of 2 iterations took 48 s here (compiling two sharded
programs; its score/KL/losses matched the 1-device run to rtol 2e-4), over this module's
budget, so it is not repeated.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import (
    REPO,
    made_once,
    persistent_compilation_cache,
    subprocess_env,
    wait_for_logged_step,
)

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("ppo_stage")]

ITERS = 8  # PPO iterations of every run (checkpoint every iteration)
BATCH = 8  # episodes per iteration (the smoke experiment's)
KL_TARGET, KL_HORIZON = 0.05, 50.0  # adaptive beta that visibly moves in 8 iterations
PRE_PPO = "world,tokenizer,pretrain,sft,collect,rm"

CONFIG = f'''
"""Smoke experiment for tests/stages/test_ppo.py: tiny pre-PPO stages, then PPO and PPO-ptx
({ITERS} iterations, a checkpoint every iteration, adaptive KL controller)."""

from experiments import tiny_instructgpt


def get_config(arg=None):
    config = tiny_instructgpt.get_config("smoke")
    config.stages = "{PRE_PPO}".split(",")
    config.world.update(num_pretrain=200, num_demonstrations=100, num_rm=24, num_ppo=64,
                        num_eval=10)
    config.pretrain.update(num_steps=3)
    config.pretrain.optimizer.warmup_steps = 1
    for name in ("sft", "rm"):
        config[name].update(num_steps=3, eval_batches=1)
    config.rm.normalize_num = 8
    for name in ("ppo", "ppo_ptx"):
        config[name].update(num_iterations={ITERS}, checkpoint_every=1, log_every=1,
                            gold_every=1, adaptive_kl=True, kl_target={KL_TARGET},
                            kl_horizon={KL_HORIZON})
    return config
'''

# Documented per-iteration metrics (stages/ppo.py, ppo.py): what a user plots.
METRICS = (
    "score_raw", "score", "score_final", "gold_score", "kl", "kl_per_token", "beta",
    "entropy", "policy_loss", "value_loss", "ptx_loss", "loss", "pg_clip_frac",
    "vf_clip_frac", "approx_kl", "vf_explained_var", "value_explained_var_rollout",
    "response_length", "no_stop_frac", "policy_grad_norm", "value_grad_norm", "lr",
    "logprob_mismatch", "rollout_seconds", "update_seconds", "rollout_fraction",
    "rollout_tokens_per_s", "generated_tokens_per_s", "update_tokens_per_s", "episodes",
)  # fmt: skip
TIMING = {
    "rollout_seconds", "update_seconds", "rollout_fraction", "rollout_tokens_per_s",
    "generated_tokens_per_s", "update_tokens_per_s",
}  # fmt: skip


# ------------------------------------------------------------------ running the CLI


class Env:
    """The module's folders: the config file, the pre-PPO run (`base`), the XLA cache."""

    def __init__(self, root):
        self.root = str(root)
        self.config = os.path.join(self.root, "ppo_test_config.py")
        self.base = os.path.join(self.root, "base")
        self.cache = os.path.join(self.root, "xla_cache")

    def env(self) -> dict[str, str]:
        return subprocess_env(
            1,
            JAX_COMPILATION_CACHE_DIR=self.cache,
            JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
            JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1",
            JAX_LOG_COMPILES="1",
        )

    def copy_base(self, workdir: str) -> str:
        shutil.copytree(self.base, workdir)
        return workdir

    def command(self, workdir, stages, *overrides) -> list[str]:
        return [sys.executable, "-m", "instructrl.main", f"--config={self.config}",
                f"--workdir={workdir}", f"--config.stages={stages}", *overrides]  # fmt: skip

    def run(self, workdir, stages, *overrides, expect=0, timeout=300):
        proc = subprocess.run(
            self.command(workdir, stages, *overrides),
            env=self.env(),
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if expect is not None and proc.returncode != expect:
            pytest.fail(
                f"exit {proc.returncode} (expected {expect}):\n{proc.stdout[-3000:]}\n"
                f"{proc.stderr[-8000:]}"
            )
        return proc

    def start(self, workdir, stages, log_path, *overrides) -> subprocess.Popen:
        with open(log_path, "w") as log:  # the child keeps its own descriptor
            return subprocess.Popen(
                self.command(workdir, stages, *overrides),
                env=self.env(),
                cwd=REPO,
                stdout=log,
                stderr=subprocess.STDOUT,
            )


def read_metrics(workdir, stage: str) -> list[dict]:
    with open(os.path.join(workdir, stage, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def committed_steps(workdir, stage: str) -> list[int]:
    ckpts = os.path.join(workdir, stage, "checkpoints")
    if not os.path.isdir(ckpts):
        return []
    return sorted(int(n) for n in os.listdir(ckpts) if n.isdigit())


def checkpoint_state(workdir, stage: str, step: int) -> dict[str, np.ndarray]:
    """The saved PPOState at `step` as numpy arrays keyed by path (the rng as its key data),
    plus the data iterator's state as JSON text under "data_state"."""
    import jax
    import orbax.checkpoint as ocp

    folder = os.path.join(workdir, stage, "checkpoints", str(step))
    with ocp.StandardCheckpointer() as ckptr:
        tree = ckptr.restore(os.path.join(folder, "state"))
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            leaf = jax.random.key_data(leaf)
        out[jax.tree_util.keystr(path)] = np.asarray(leaf)
    with open(os.path.join(folder, "data", "process_0-of-1.json"), encoding="utf-8") as f:
        out["data_state"] = f.read()
    return out


def exported_params(workdir, stage: str) -> dict[str, np.ndarray]:
    import jax

    from instructrl import checkpoint

    params, _ = checkpoint.load_exported(os.path.join(workdir, stage, "export"))
    flat = jax.tree_util.tree_flatten_with_path(jax.device_get(params))[0]
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in flat}


def assert_trees_equal(got: dict, want: dict, what: str) -> None:
    assert got.keys() == want.keys(), what
    differ = [k for k in want if not np.array_equal(got[k], want[k])]
    assert not differ, f"{what}: differs at {differ[:8]}"


def assert_same_metrics(got: list[dict], want: list[dict], what: str) -> None:
    """Every non-timing metric of every iteration equal (floats from f32: bit for bit)."""
    assert [m["step"] for m in got] == [m["step"] for m in want] == list(range(1, ITERS + 1))
    for g, w in zip(got, want, strict=True):
        moved = sorted(k for k in w if k not in TIMING and g.get(k) != w[k])
        assert not moved, f"{what}: step {w['step']}: {moved} differ"


def compile_counts(log: str, stage: str) -> dict[str, int]:
    """How often each program was compiled in `stage`'s part of a JAX_LOG_COMPILES log.

    Persistent-cache hits are logged as compilations too (lowering and a cache lookup ran)."""
    start = log.index(f"stage {stage} (ppo): starting")
    end = log.find(" starting", start + 30)
    counts: dict[str, int] = {}
    for line in log[start : end if end > 0 else None].splitlines():
        if "Compiling jit(" in line:
            name = line.split("Compiling jit(")[1].split(")")[0]
            counts[name] = counts.get(name, 0) + 1
    return counts


def assert_compiled_once(log: str, stage: str, what: str) -> None:
    counts = compile_counts(log, stage)
    # jit(rollout): ppo_rollout.make_rollout_fn; jit(inner): ppo.make_update_fn's program.
    assert counts.get("rollout") == 1 and counts.get("inner") == 1, f"{what}: {counts}"


def interrupt(env, workdir, stage: str, sig, at_step: int) -> tuple[int, str]:
    """Starts `stage` in `workdir`; sends `sig` once iteration `at_step` is logged and a
    checkpoint is committed. Returns (exit code, log)."""
    log_path = workdir + ".log"
    proc = env.start(workdir, stage, log_path)
    try:
        # logged `at_step` and committed a checkpoint
        reached = wait_for_logged_step(
            proc, workdir, stage, at_step, also=lambda: bool(committed_steps(workdir, stage))
        )
        if reached:
            proc.send_signal(sig)
        code = proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    with open(log_path) as f:
        log = f.read()
    if not reached:
        pytest.fail(f"run ended (exit {code}) before iteration {at_step}:\n{log[-5000:]}")
    return code, log


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def env(ppo_base):  # session-scoped in conftest.py: test_algorithms.py shares it
    return ppo_base


def make_env(tmp_path_factory) -> Env:
    """The config file and the pre-PPO stages with their XLA cache: run once per session (on
    whichever xdist worker asks first, made_once) and copied into this worker's folder."""
    from instructrl import config as config_lib
    from instructrl import main

    def make(folder: str) -> None:
        made = Env(folder)
        with open(made.config, "w") as f:
            f.write(CONFIG)
        with persistent_compilation_cache(made.cache):
            main.run(config_lib.load_config(made.config), made.base)

    made = Env(made_once(tmp_path_factory, "ppo_base", make))
    e = Env(tmp_path_factory.mktemp("ppo_stage"))
    with open(e.config, "w") as f:
        f.write(CONFIG)
    shutil.copytree(made.base, e.base)
    shutil.copytree(made.cache, e.cache)
    for stage in PRE_PPO.split(","):
        assert os.path.exists(os.path.join(e.base, stage, main.DONE_MARKER)), stage
    return e


@pytest.fixture(scope="module")
def ref(env, tmp_path_factory):
    """The uninterrupted reference: ppo then ppo_ptx, ITERS iterations each, one process;
    run once per session (made_once) and only read."""

    def make(folder: str) -> None:
        proc = env.run(env.copy_base(os.path.join(folder, "run")), "ppo,ppo_ptx")
        with open(os.path.join(folder, "stderr.log"), "w") as f:
            f.write(proc.stderr)

    folder = made_once(tmp_path_factory, "ppo_ref", make)
    with open(os.path.join(folder, "stderr.log")) as f:
        return os.path.join(folder, "run"), f.read()


# ------------------------------------------------------------------ tests


@pytest.mark.parametrize("stage", ["ppo", "ppo_ptx"])
def test_metrics_per_iteration_and_export(env, ref, stage):
    import jax

    from instructrl import checkpoint
    from instructrl.models import ModelConfig, Transformer, positions_from_mask

    workdir, _ = ref
    logged = read_metrics(workdir, stage)
    assert [m["step"] for m in logged] == list(range(1, ITERS + 1))
    for m in logged:
        missing = [k for k in METRICS if k not in m]
        assert not missing, f"step {m['step']}: {missing} not logged"
        bad = [k for k, v in m.items() if not math.isfinite(v)]
        assert not bad, f"step {m['step']}: {bad} not finite"
        assert m["episodes"] == m["step"] * BATCH
        assert 0 < m["rollout_fraction"] < 1 and m["rollout_seconds"] > 0
        assert m["update_seconds"] > 0 and m["update_tokens_per_s"] > 0
        assert 1 <= m["response_length"] <= 32 and 0 <= m["no_stop_frac"] <= 1
        assert 0 <= m["pg_clip_frac"] <= 1 and 0 <= m["vf_clip_frac"] <= 1
        assert m["logprob_mismatch"] < 1e-4  # sampler and full forward agree
        # PPO-ptx adds gamma x the LM loss of pretraining text (~log V at this size).
        assert (m["ptx_loss"] > 1.0) if stage == "ppo_ptx" else (m["ptx_loss"] == 0.0)
    # The policy moves away from the reference after iteration 1 (KL exactly 0 there).
    assert logged[0]["kl"] == 0.0 and any(m["kl"] != 0 for m in logged[1:])

    # The adaptive controller, from the logged KL: beta *= 1 + clip(KL/target - 1) n / H.
    beta = beta0 = 0.1  # the experiment's kl_coef
    for m in logged:
        err = np.clip(m["kl"] / KL_TARGET - 1.0, -0.2, 0.2)
        beta *= 1.0 + err * BATCH / KL_HORIZON
        assert m["beta"] == pytest.approx(beta, rel=1e-5), m["step"]
    # It moved (by up to 0.2 n / H = 3.2% an iteration): a wrong controller would show.
    assert max(abs(m["beta"] / beta0 - 1) for m in logged) > 0.02

    # The metrics' arithmetic, from the config and the RM's saved normalisation.
    from instructrl import config as config_lib

    config = config_lib.load_config(env.config)
    c = config[stage]
    with open(os.path.join(workdir, "rm", "export", "reward_normalization.json")) as f:
        norm = json.load(f)
    assert abs(norm["bias"]) > 0.05, norm  # a bias of the wrong sign would show
    tokens = BATCH * (config.data.max_prompt_len + c.max_new_tokens)
    updates = c.num_minibatches * c.num_epochs
    peak, init = c.optimizer.lr, c.optimizer.warmup_init
    warm = c.warmup_iterations * updates
    for m in logged:
        what = f"{stage} step {m['step']}"
        want = norm["gain"] * m["score_raw"] + norm["bias"]
        assert m["score"] == pytest.approx(want, rel=1e-5, abs=1e-5), what
        # Means over the minibatches of pg + vf (separate value network) + ptx_coef x ptx.
        want = m["policy_loss"] + m["value_loss"] + c.ptx_coef * m["ptx_loss"]
        assert m["loss"] == pytest.approx(want, rel=1e-5, abs=1e-6), what
        counts = (m["step"] - 1) * updates + np.arange(updates)
        lr = np.where(counts < warm, peak * (init + (1 - init) * counts / warm), peak).mean()
        assert m["lr"] == pytest.approx(lr, rel=1e-5), what
        rollout, update = m["rollout_seconds"], m["update_seconds"]
        assert m["rollout_fraction"] == pytest.approx(rollout / (rollout + update), rel=1e-3)
        assert m["rollout_tokens_per_s"] * rollout == pytest.approx(tokens, rel=1e-6), what
        assert m["update_tokens_per_s"] * update == pytest.approx(tokens, rel=1e-6), what
        generated = m["generated_tokens_per_s"] * rollout
        assert generated == pytest.approx(BATCH * m["response_length"], rel=1e-5), what

    # The export is the EMA in the final checkpoint; it loads and runs; it left its init.
    assert os.path.exists(os.path.join(workdir, stage, "DONE"))
    assert committed_steps(workdir, stage)[-1] == ITERS
    state = checkpoint_state(workdir, stage, ITERS)
    export = exported_params(workdir, stage)
    ema = {k[len("['ema']") :]: v for k, v in state.items() if k.startswith("['ema']")}
    assert_trees_equal(export, ema, f"{stage}: export vs checkpointed EMA")
    # ... and that EMA follows its update e <- d e + (1 - d) p after each of the U optimizer
    # steps of the last iteration: e_N = d^U e_{N-1} + (1 - d) sum_j d^(U-j) p_j. With every
    # p_j taken as p_N the error is (1 - d) sum_j d^(U-j) (p_j - p_N), well under
    # (1 - d) U |p_N - p_{N-1}|; a reversed decay (weight d on p) is off by ~|p_N - p_{N-1}|.
    before = checkpoint_state(workdir, stage, ITERS - 1)
    d = c.ema_decay
    policy = lambda st, k: st["['params']['policy']" + k].astype(np.float64)  # noqa: E731
    residual = moved = 0.0
    for k, e_n in ema.items():
        p_n, e_prev = policy(state, k), before["['ema']" + k].astype(np.float64)
        want = d**updates * e_prev + (1 - d**updates) * p_n
        residual += np.sum((e_n - want) ** 2)
        moved += np.sum((p_n - policy(before, k)) ** 2)
    ratio = (residual / moved) ** 0.5 if moved > 0 else np.inf
    assert ratio < (1 - d) * updates, f"{stage}: |EMA error| / |last move| = {ratio:.4f}"
    init = exported_params(workdir, "sft")
    assert any(not np.array_equal(export[k], init[k]) for k in init)
    params, model_dict = checkpoint.load_exported(os.path.join(workdir, stage, "export"))
    tokens = np.array([[0, 0, 5, 9, 17, 3]], np.int32)
    mask = (tokens != 0).astype(np.int32)
    model = Transformer(ModelConfig.from_dict(model_dict))
    logits = model.apply({"params": params}, tokens, positions_from_mask(mask), mask)
    assert logits.shape == (1, 6, model_dict["vocab_size"])
    assert np.isfinite(np.asarray(jax.device_get(logits))).all()


def test_rollout_and_update_compile_once(ref):
    _, log = ref
    for stage in ("ppo", "ppo_ptx"):
        assert_compiled_once(log, stage, f"{stage}, {ITERS} iterations")


def test_gold_reward_scores_episodes_with_the_gold_scorer(env, ref, tmp_path):
    """`gold_reward` (the oracle of experiments/tiny_instructgpt.py's `ppo_gold`): the score
    entering the rewards is scale x the gold score that the host computes independently from
    the same rollout (`gold_score`, stages/ppo.py gold_metrics), every iteration."""
    workdir = env.copy_base(str(tmp_path / "run"))
    env.run(workdir, "ppo", "--config.ppo.gold_reward=True", "--config.ppo.gold_reward_scale=2.5")
    logged = read_metrics(workdir, "ppo")
    assert [m["step"] for m in logged] == list(range(1, ITERS + 1))
    for m in logged:
        assert m["score_raw"] == pytest.approx(m["gold_score"], abs=1e-6), m["step"]
        assert m["score"] == pytest.approx(2.5 * m["gold_score"], abs=1e-5), m["step"]
    assert len({round(m["gold_score"], 6) for m in logged}) > 1  # not a constant
    by_rm = read_metrics(ref[0], "ppo")
    assert logged[0]["score_raw"] != by_rm[0]["score_raw"]  # the RM scored the same episodes


def test_sigkill_then_rerun_is_bit_identical(env, ref, tmp_path):
    workdir = env.copy_base(str(tmp_path / "run"))
    kill_at = random.Random().randint(2, ITERS - 2)
    code, _ = interrupt(env, workdir, "ppo", signal.SIGKILL, kill_at)
    assert code == -signal.SIGKILL
    saved = committed_steps(workdir, "ppo")
    what = f"killed after iteration {kill_at}, checkpoints {saved}"
    assert saved and not os.path.exists(os.path.join(workdir, "ppo", "DONE")), what
    proc = env.run(workdir, "ppo")
    if saved[-1] < ITERS:
        assert f"ppo: resumed from iteration {saved[-1]}" in proc.stderr, what
    assert_compiled_once(proc.stderr, "ppo", f"resumed run, {what}")
    ref_dir, _ = ref
    assert_same_metrics(read_metrics(workdir, "ppo"), read_metrics(ref_dir, "ppo"), what)
    assert_trees_equal(
        checkpoint_state(workdir, "ppo", ITERS), checkpoint_state(ref_dir, "ppo", ITERS), what
    )
    assert_trees_equal(exported_params(workdir, "ppo"), exported_params(ref_dir, "ppo"), what)
    leftovers = [n for n in os.listdir(os.path.join(workdir, "ppo", "checkpoints")) if "tmp" in n]
    assert not leftovers, what


def test_sigterm_exits_143_and_rerun_completes(env, ref, tmp_path):
    workdir = env.copy_base(str(tmp_path / "run"))
    stop_at = random.Random().randint(1, ITERS - 3)
    code, log = interrupt(env, workdir, "ppo_ptx", signal.SIGTERM, stop_at)
    assert code == 143, log[-3000:]
    marker = "preempted: stage ppo_ptx: stopped by signal at iteration "
    assert marker in log, log[-3000:]
    stopped = int(log.split(marker)[1].split(";")[0])
    assert stop_at <= stopped <= ITERS and committed_steps(workdir, "ppo_ptx")[-1] == stopped
    assert not os.path.exists(os.path.join(workdir, "ppo_ptx", "DONE"))
    proc = env.run(workdir, "ppo_ptx")
    assert f"ppo_ptx: resumed from iteration {stopped}" in proc.stderr
    assert os.path.exists(os.path.join(workdir, "ppo_ptx", "DONE"))
    ref_dir, _ = ref
    what = f"SIGTERM at iteration {stopped}"
    assert_same_metrics(read_metrics(workdir, "ppo_ptx"), read_metrics(ref_dir, "ppo_ptx"), what)
    assert_trees_equal(
        checkpoint_state(workdir, "ppo_ptx", ITERS),
        checkpoint_state(ref_dir, "ppo_ptx", ITERS),
        what,
    )
    assert_trees_equal(
        exported_params(workdir, "ppo_ptx"), exported_params(ref_dir, "ppo_ptx"), what
    )


@pytest.mark.parametrize(
    "overrides, message, kept, logged",
    [
        # Adam steps of 1e29 blow the params up in the first minibatch; the second's loss is nan.
        (["--config.ppo.optimizer.lr=1e30"], "step 1: loss is nan", [], []),
        # beta 1e38 x a nonzero log-ratio (iteration 2 on) overflows the returns; the
        # checkpoint of iteration 1, still being written when the error comes, must commit.
        (["--config.ppo.kl_coef=1e38"], "step 2: loss is inf", [1], [1]),
        # Not a logging step: the checkpoint of iteration 1 is checked before it is saved.
        (["--config.ppo.optimizer.lr=1e30", "--config.ppo.log_every=100"], "step 1: loss", [], []),
        (["--config.ppo.kl_coef=1e38", "--config.ppo.log_every=100"], "step 2: loss", [1], []),
    ],
    ids=["lr-nan", "beta-inf", "lr-nan-unlogged", "beta-inf-unlogged"],
)
def test_non_finite_metric_stops_the_run(env, ref, tmp_path, overrides, message, kept, logged):
    del ref  # only for its compiled programs in the shared cache
    workdir = env.copy_base(str(tmp_path / "run"))
    proc = env.run(workdir, "ppo", *overrides, expect=None)
    assert proc.returncode == 3, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last, proc.stderr[-3000:]
    assert committed_steps(workdir, "ppo") == kept  # nothing non-finite was saved
    for name in ("DONE", "export"):
        assert not os.path.exists(os.path.join(workdir, "ppo", name))
    # the bad iteration is not logged either
    assert [m["step"] for m in read_metrics(workdir, "ppo")] == logged


def test_gold_labelers_rank_by_the_gold_score(env, tmp_path):
    """`collect.labelers=gold` (the noise-free ablation): every comparison ranks its kept
    responses by falling gold score, equal scores exactly in its tie groups. Left with
    `calibrate` on, it is a one-line config error (exit 2) before anything is written."""
    from tests.unit.test_world_labelers import assert_ranked_by_gold

    workdir = env.copy_base(str(tmp_path / "run"))
    shutil.rmtree(os.path.join(workdir, "collect"))
    gold = "--config.collect.labelers=gold"
    proc = env.run(workdir, "collect", gold, "--config.collect.calibrate=True", expect=2)
    assert "'collect.calibrate' must be False with collect.labelers='gold'" in proc.stderr
    assert not os.path.exists(os.path.join(workdir, "collect"))
    env.run(workdir, "collect", gold, "--config.collect.calibrate=False")
    with open(os.path.join(workdir, "collect", "labelers.json")) as f:
        summary = json.load(f)
    assert summary["labelers"] == "gold" and summary["noise"] == 0.0
    with open(os.path.join(workdir, "collect", "comparisons.jsonl")) as f:
        records = [json.loads(line) for line in f]
    assert records
    for rec in records:
        assert_ranked_by_gold(rec)
    with open(os.path.join(env.base, "collect", "comparisons.jsonl")) as f:
        noisy = [json.loads(line) for line in f]
    misranked = 0
    for rec in noisy:  # the pool's labelers misorder some: the check above can fail
        try:
            assert_ranked_by_gold(rec)
        except AssertionError:
            misranked += 1
    assert misranked > 0


def test_rm_score_selection_and_policy_normalisation(env, tmp_path):
    """The paper's SFT checkpoint selection (`select_by=rm_score`: the RM's mean score of
    greedy samples on validation prompts) and Ziegler et al.'s RM normalisation
    (`normalize=policy`: mean 0, std 1 on the policy's own samples) run end to end."""
    import numpy as np

    from tests.stages.conftest import assert_params_equal, exported_params

    select = env.copy_base(str(tmp_path / "select"))
    shutil.rmtree(os.path.join(select, "sft"))
    env.run(select, "sft", "--config.sft.select_by=rm_score",
            "--config.sft.select_reward_from=rm", "--config.sft.num_steps=6")  # fmt: skip
    with open(os.path.join(select, "sft", "selection.json")) as f:
        selection = json.load(f)
    history = selection["history"]
    assert selection["metric"] == "rm_score" and history
    values = [h["value"] for h in history]
    assert all(np.isfinite(values))
    assert selection["best"] == max(values)  # higher RM score is better
    assert selection["best_step"] == history[int(np.argmax(values))]["step"]
    logged = {m["step"]: m["select_rm_score"] for m in read_metrics(select, "sft")
              if "select_rm_score" in m}  # fmt: skip
    assert logged == {h["step"]: pytest.approx(h["value"]) for h in history}
    assert_params_equal(
        exported_params(os.path.join(select, "sft", "best")),
        exported_params(os.path.join(select, "sft", "export")),
        "export vs best",
    )

    policy = env.copy_base(str(tmp_path / "policy"))
    shutil.rmtree(os.path.join(policy, "rm"))
    env.run(policy, "rm", "--config.rm.normalize=policy", "--config.rm.normalize_policy_from=sft")
    with open(os.path.join(policy, "rm", "export", "reward_normalization.json")) as f:
        norm = json.load(f)
    with open(os.path.join(env.base, "rm", "export", "reward_normalization.json")) as f:
        demo = json.load(f)
    assert norm["mode"] == "policy" and norm["count"] == 8 and demo["mode"] == "demonstrations"
    assert norm["raw_std"] > 0 and norm["gain"] == pytest.approx(1 / norm["raw_std"])
    assert norm["bias"] == pytest.approx(-norm["raw_mean"] / norm["raw_std"])
    assert norm["raw_mean"] != demo["raw_mean"]  # fitted on other texts than demonstrations


def test_collect_keeps_stop_flags_and_the_sampled_ids(env):
    """collect writes, per response, whether it stopped and the ids it was sampled as (with
    the tokenizer's fingerprint), so the RM trains on the tokens PPO will score it on; the
    share of samples whose text re-encodes to other ids is measured in labelers.json."""
    from instructrl.data.records import tokenizer_fingerprint
    from instructrl.tokenizer import Tokenizer

    tok = Tokenizer.load(os.path.join(env.base, "tokenizer", "tokenizer.model"))
    with open(os.path.join(env.base, "collect", "comparisons.jsonl")) as f:
        records = [json.loads(line) for line in f]
    assert records
    for rec in records:
        k = len(rec["responses"])
        assert rec["tokenizer"] == tokenizer_fingerprint(tok)
        assert len(rec["stopped"]) == len(rec["response_ids"]) == k
        for text, ids in zip(rec["responses"], rec["response_ids"], strict=True):
            assert tok.eos_id not in ids and tok.decode(ids) == text
    with open(os.path.join(env.base, "collect", "labelers.json")) as f:
        summary = json.load(f)
    assert 0.0 <= summary["retokenized_fraction"] <= 1.0
