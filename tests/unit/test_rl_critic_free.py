"""Critic-free RL (rl/critic_free.py) inside PPO's rollout and update programs: the group
layout of the rollout, the KL as a reward or as a k3 loss, one update against a float64
reference (advantages by a per-group Python loop, the step = -lr x the gradient of the loss
with those advantages), learning on a programmatic reward for grpo, dr_grpo and rloo with
one compilation of each program, and 1 vs 8 devices.

The pure objectives are tested against naive references in test_objectives.py.
Compile time is most of this module's time: its tests share a persistent XLA cache (one
worker, xdist group "critic_free"), so a program another test compiled is loaded instead,
e.g. the learning runs' rollout, which is the same program for grpo and dr_grpo.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from instructrl import sharding
from instructrl.errors import ConfigError
from instructrl.rl import critic_free, ppo
from tests.conftest import persistent_compilation_cache
from tests.unit.test_rl_ppo import (
    EOS,
    MC,
    MESH_822,
    PAD,
    N,
    boost_token,
    count_target,
    make_prompts,
    make_ptx,
    random_params,
)

pytestmark = pytest.mark.xdist_group("critic_free")

G = 4
CFG_G = ppo.PPOConfig(
    batch_size=4,  # prompts; 16 episodes
    group_size=G,
    num_minibatches=2,
    num_epochs=2,
    max_new_tokens=N,
    temperature=0.7,
    stop_token=EOS,
    pad_id=PAD,
    ptx_coef=0.5,
    ptx_ratio=1.0,
    advantage="grpo",
    kl_penalty="loss",
    kl_coef=0.05,
    adaptive_kl=True,
    kl_target=0.5,
    kl_horizon=100.0,
    warmup_iterations=1,
)


@pytest.fixture(scope="module", autouse=True)
def _compilation_cache(tmp_path_factory):
    with persistent_compilation_cache(str(tmp_path_factory.mktemp("critic_free_xla"))):
        yield


@dataclasses.dataclass
class Setup:
    cfg: ppo.PPOConfig
    models: ppo.PPOModels
    optimizer: ppo.PPOOptimizer
    policy: dict
    reference: dict
    reward: dict
    rollout_fn: object
    update_fn: object
    mesh: object = None
    state_shardings: object = None
    params_shardings: object = None

    def fresh_state(self) -> ppo.PPOState:
        return ppo.create_ppo_state(
            self.cfg, self.optimizer, self.policy, None, jax.random.key(0), self.state_shardings
        )

    def iteration(self, state, it: int):
        put = lambda x, sh: x if self.mesh is None else jax.device_put(x, sh)  # noqa: E731
        bs = None if self.mesh is None else sharding.batch_sharding(self.mesh)
        rp = put(ppo.rollout_params(state, self.reference, self.reward), self.params_shardings)
        tokens, mask = make_prompts(it, self.cfg.batch_size)
        ro = self.rollout_fn(
            rp, put(tokens, bs), put(mask, bs), jax.random.key(1000 + it), state.kl["beta"]
        )
        ptx = put(make_ptx(it, self.cfg.ptx_batch_size), bs)
        state, metrics = self.update_fn(state, ro, ptx, state.rng)
        return ro, state, metrics


@functools.cache
def setup_g(mesh_shape: tuple | None = None) -> Setup:
    policy_model, reference = random_params("lm", 0)
    reference = boost_token(reference, EOS, 1.2)
    _, noise = random_params("lm", 1, scale=0.05)
    policy = jax.tree.map(lambda a, b: a + b, reference, noise)
    reward_model, reward = random_params("scalar", 2)
    models = ppo.PPOModels(policy=policy_model, reward=reward_model)
    conf = ppo.default_ppo_config()
    conf.optimizer.lr = 3e-3
    optimizer = ppo.make_ppo_optimizer(CFG_G, conf, num_iterations=10)
    s = Setup(CFG_G, models, optimizer, policy, reference, reward, None, None)
    if mesh_shape is not None:
        s.mesh = sharding.make_mesh(dict(mesh_shape))
        _, s.state_shardings = ppo.abstract_ppo_state(models, CFG_G, optimizer, s.mesh)
        s.params_shardings = ppo.rollout_params_shardings(models, CFG_G, s.mesh)
    s.rollout_fn = ppo.make_rollout_fn(
        models, CFG_G, mesh=s.mesh, params_shardings=s.params_shardings
    )
    s.update_fn = ppo.make_update_fn(
        models, CFG_G, optimizer, mesh=s.mesh, state_shardings=s.state_shardings
    )
    return s


def test_config_errors_name_the_key():
    bad = [
        (dict(advantage="ppo"), "'ppo.advantage' = 'ppo'"),
        (dict(advantage="grpo", group_size=1), "'ppo.group_size' = 1"),
        (dict(advantage="gae", kl_penalty="loss"), "'ppo.kl_penalty' = 'loss'"),
        (dict(advantage="rloo", group_size=2, loss_aggregation="sum"), "'ppo.loss_aggregation'"),
        (dict(advantage="rloo", group_size=3, batch_size=2, num_minibatches=4), "'ppo.batch_size'"),
    ]
    for fields, message in bad:
        with pytest.raises(ConfigError, match=message):
            kw = {"stop_token": EOS, "num_minibatches": 1, "batch_size": 4, **fields}
            ppo.PPOConfig(**kw).validate()
    models = ppo.PPOModels(policy=setup_g().models.policy, value=setup_g().models.reward)
    with pytest.raises(ConfigError, match="no value network"):
        models.check(CFG_G)
    assert CFG_G.aggregation == "token_mean_per_seq" and CFG_G.episodes == 16
    assert dataclasses.replace(CFG_G, advantage="dr_grpo").aggregation == "constant"


def naive_advantages(r: np.ndarray, mode: str, g: int) -> np.ndarray:
    """float64, one group at a time, by the papers' formulas (sample std, ddof 1)."""
    out = np.zeros(len(r))
    for s in range(0, len(r), g):
        x = [float(v) for v in r[s : s + g]]
        mean = sum(x) / g
        if max(x) == min(x):
            continue
        std = (sum((v - mean) ** 2 for v in x) / (g - 1)) ** 0.5
        for i, v in enumerate(x):
            if mode == "grpo":
                out[s + i] = (v - mean) / (std + 1e-6)
            elif mode == "dr_grpo":
                out[s + i] = v - mean
            else:
                out[s + i] = v - (sum(x) - v) / (g - 1)
    return out


def test_rollout_groups_and_one_update_match_a_float64_reference():
    """The rollout samples G responses of each prompt in rows n*G .. n*G + G-1; with the KL in
    the loss its rewards are the scores alone. One update (1 epoch, 1 minibatch, SGD(1), no
    ptx) moves the policy by minus the gradient of the critic-free loss whose advantages a
    per-group float64 loop computes from the summed rewards (a group with equal rewards
    included), for each advantage mode and both KL placements."""
    s = setup_g()
    state = s.fresh_state()
    tokens, mask = make_prompts(0, s.cfg.batch_size)
    rp = ppo.rollout_params(state, s.reference, s.reward)
    ro = s.rollout_fn(rp, tokens, mask, jax.random.key(7), state.kl["beta"])
    prompts = np.asarray(ro.prompt_tokens)
    np.testing.assert_array_equal(prompts, np.repeat(tokens, G, axis=0))
    rewards = np.asarray(ro.rewards, np.float64)
    np.testing.assert_allclose(rewards.sum(1), np.asarray(ro.scores), rtol=1e-6, atol=1e-6)
    assert float(ro.metrics["kl"]) != 0  # the policy is not the reference

    for mode, kl_penalty in (("grpo", "loss"), ("dr_grpo", "reward"), ("rloo", "reward")):
        cfg = dataclasses.replace(
            s.cfg, advantage=mode, kl_penalty=kl_penalty, num_epochs=1, num_minibatches=1,
            ptx_coef=0.0, adaptive_kl=False,
        )  # fmt: skip
        # A rollout whose KL-in-reward is visible, and one group of equal rewards (std 0).
        beta = 0.3 if kl_penalty == "reward" else 0.0
        logratio = np.asarray(ro.logprobs) - np.asarray(ro.ref_logprobs)
        rew = np.where(np.asarray(ro.response_mask) > 0, -beta * logratio, 0.0)
        last = np.asarray(ro.response_mask).sum(1) - 1
        scores = np.round(np.asarray(ro.scores), 1)
        scores[:G] = 0.5
        rew[np.arange(len(last)), last] += scores
        if kl_penalty == "reward":
            rew[:G] = 0.0
            rew[np.arange(G), last[:G]] = 0.5  # group 0: equal totals
        batch = ro.replace(rewards=jnp.asarray(rew, jnp.float32))
        adv = naive_advantages(rew.sum(1), mode, G)
        assert np.all(adv[:G] == 0) and np.any(adv != 0)
        got, _ = critic_free.advantages(cfg, batch)
        np.testing.assert_allclose(got, adv, rtol=1e-5, atol=1e-6, err_msg=mode)
        if mode != "grpo":
            continue  # one update (a compile each); the other modes learn below

        optimizer = ppo.PPOOptimizer(policy=optax.sgd(1.0))
        state0 = ppo.init_ppo_state(cfg, optimizer, s.policy, None, jax.random.key(0))
        new, metrics = ppo.make_update_fn(s.models, cfg, optimizer)(state0, batch, None, state0.rng)
        assert "value_loss" not in metrics and float(metrics["kl_loss"]) > 0
        mb = {**critic_free.update_data(cfg, batch)[0], "advantages": adv.astype(np.float32)}
        kl_coef = cfg.kl_coef if kl_penalty == "loss" else 0.0
        loss = functools.partial(critic_free.critic_free_loss, s.models, cfg, kl_coef)
        grad = jax.jit(jax.grad(lambda p, x: loss(p, x, None)[0]))  # noqa: B023 (called now)
        grads = grad({"policy": s.policy}, mb)
        for g, a, b in zip(
            jax.tree.leaves(grads), jax.tree.leaves(s.policy), jax.tree.leaves(new.params),
            strict=True,
        ):  # fmt: skip
            np.testing.assert_allclose(a - b, g, rtol=2e-3, atol=2e-6, err_msg=mode)
        assert optax.tree.norm(grads) > 1e-3


def learning_run(advantage: str, kl_penalty: str, iterations: int = 20):
    """(first score, last-5 mean score, last-5 KL, programs' cache sizes): a near-uniform
    policy learning the count_target reward with `advantage`."""
    import flax.linen as nn

    from instructrl.models import Transformer

    model = Transformer(MC)
    ones = jnp.ones((1, 4), jnp.int32)
    policy = nn.unbox(jax.jit(model.init)(jax.random.key(0), ones, jnp.arange(4)[None], ones))
    cfg = ppo.PPOConfig(
        batch_size=8, group_size=4, num_minibatches=2, num_epochs=2, max_new_tokens=N,
        stop_token=EOS, ptx_coef=0.0, penalize_no_stop=False, warmup_iterations=0,
        advantage=advantage, kl_penalty=kl_penalty, kl_coef=0.05,
    )  # fmt: skip
    models = ppo.PPOModels(policy=model)
    conf = ppo.default_ppo_config()
    conf.optimizer.lr = 2e-3
    optimizer = ppo.make_ppo_optimizer(cfg, conf, iterations)
    rollout_fn = ppo.make_rollout_fn(models, cfg, score_fn=count_target)
    update_fn = ppo.make_update_fn(models, cfg, optimizer)
    state = ppo.init_ppo_state(cfg, optimizer, policy["params"], None, jax.random.key(0))
    scores, kls = [], []
    for it in range(iterations):
        tokens, mask = make_prompts(it, cfg.batch_size)
        rp = ppo.rollout_params(state, policy["params"], None)
        ro = rollout_fn(rp, tokens, mask, jax.random.key(it), state.kl["beta"])
        state, _ = update_fn(state, ro, None, state.rng)
        scores.append(float(ro.metrics["score_raw"]))
        kls.append(float(ro.metrics["kl"]))
    caches = (rollout_fn.jitted._cache_size(), update_fn.jitted._cache_size())
    return scores[0], float(np.mean(scores[-5:])), float(np.mean(kls[-5:])), caches


@pytest.mark.parametrize(
    "advantage, kl_penalty", [("grpo", "loss"), ("dr_grpo", "loss"), ("rloo", "reward")]
)
def test_learns_programmatic_reward_and_compiles_once(advantage, kl_penalty):
    """From ~N/V = 0.25 target tokens per response to well above it (max 8), each program
    compiled once over the run."""
    first, last, kl, caches = learning_run(advantage, kl_penalty)
    print(f"{advantage}: first {first:.2f}, last-5 {last:.2f}, KL {kl:.2f}")
    assert first < 0.8 and last > 2.5, (first, last, kl)
    assert kl > 0.1  # it moved away from the reference to get there
    assert caches == (1, 1), caches


def two_iterations(mesh_shape: tuple | None, out_path: str) -> None:
    """Two GRPO-ptx iterations of CFG_G; rollout fields, metrics and final state (npz)."""
    s = setup_g(mesh_shape)
    state = s.fresh_state()
    out = {}
    for it in range(2):
        ro, state, metrics = s.iteration(state, it)
        for name in ("response_tokens", "response_mask", "logprobs", "ref_logprobs", "rewards"):
            out[f"ro{it}/{name}"] = np.asarray(getattr(ro, name))
        for name, value in {**ro.metrics, **metrics}.items():
            out[f"m{it}/{name}"] = np.asarray(value)
    flat = jax.tree_util.tree_flatten_with_path((state.params, state.ema, state.kl))[0]
    for path, leaf in flat:
        out["state" + jax.tree_util.keystr(path)] = np.asarray(leaf)
    np.savez(out_path, **out)


@pytest.mark.slow
def test_same_numbers_on_one_device_and_8_device_mesh():
    from tests.conftest import run_in_subprocess

    with tempfile.TemporaryDirectory() as tmp:
        one, eight = os.path.join(tmp, "one.npz"), os.path.join(tmp, "eight.npz")
        two_iterations(None, one)
        run_in_subprocess(
            f"from tests.unit.test_rl_critic_free import two_iterations\n"
            f"two_iterations({MESH_822!r}, {json.dumps(eight)})\n",
            num_devices=8,
        )
        a, b = np.load(one), np.load(eight)
        assert sorted(a.files) == sorted(b.files)
        for key in a.files:
            if key.endswith("['k']['bias']"):  # rounding noise scaled by Adam (test_rl_ppo)
                continue
            if "tokens" in key or "mask" in key:
                np.testing.assert_array_equal(a[key], b[key], err_msg=key)
            elif key.endswith("clip_frac"):
                np.testing.assert_allclose(a[key], b[key], atol=0.02, err_msg=key)
            else:
                np.testing.assert_allclose(a[key], b[key], rtol=1e-4, atol=1e-5, err_msg=key)
