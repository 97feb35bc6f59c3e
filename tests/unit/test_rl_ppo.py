"""PPO core: rollout against a naive per-row reference, rewards/penalty/KL masking (a stop token
in the last position included), the update's log-prob recomputation and ptx gradient, one
update by hand (advantages whitened over the response mask, reward whitening, the EMA, the
minibatch permutation), learning on a programmatic reward, 1 vs 8 devices, compile counts and
the adaptive KL controller and EMA drift.

Most tests share one configuration ("A": separate value network from the RM, reward model,
ptx, adaptive KL, temperature 0.7) whose two programs compile once for the whole module.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import tempfile
import unittest.mock

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from instructrl import losses, sharding
from instructrl.errors import ConfigError
from instructrl.models import ModelConfig, Transformer, positions_from_mask
from instructrl.rl import ppo

V, P, N, EOS, PAD = 32, 8, 8, 1, 0
MC = ModelConfig(vocab_size=V, max_len=16, num_layers=1, d_model=32, num_heads=4, d_ff=64)
CFG_A = ppo.PPOConfig(
    batch_size=16,
    num_minibatches=2,
    num_epochs=2,
    max_new_tokens=N,
    temperature=0.7,
    stop_token=EOS,
    pad_id=PAD,
    ptx_ratio=1.0,
    adaptive_kl=True,
    kl_target=0.5,
    kl_horizon=100.0,
    warmup_iterations=1,
)
GAIN, BIAS = 2.0, -0.5
MESH_822 = (("data", 2), ("fsdp", 2), ("tensor", 2))


def random_params(head: str, seed: int, scale: float = 0.2):
    """Random params of MC's shapes (norm scales around 1); numpy, no init compile."""
    model = Transformer(MC, head=head)
    x = jax.ShapeDtypeStruct((1, 4), jnp.int32)
    abstract = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), x, x, x)["params"])
    rng = np.random.default_rng(seed)

    def leaf(path, a):
        base = 1.0 if jax.tree_util.keystr(path).endswith("['scale']") else 0.0
        return jnp.asarray(base + rng.normal(0.0, scale, a.shape), a.dtype)

    return model, jax.tree_util.tree_map_with_path(leaf, abstract)


def boost_token(params, token: int, alpha: float):
    """Adds about `alpha` to `token`'s logit (tied embeddings) so rows stop at varied lengths."""
    e = params["embed"]["token"][token]
    bias = params["final_norm"]["bias"] + alpha * e / jnp.sum(e * e)
    return {**params, "final_norm": {**params["final_norm"], "bias": bias}}


def make_prompts(seed: int, batch: int) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded prompts [batch, P] with 1..P real tokens (ids >= 2: no EOS, no pad)."""
    rng = np.random.default_rng(seed)
    tokens, mask = np.zeros((batch, P), np.int32), np.zeros((batch, P), np.int32)
    for i, n in enumerate(rng.integers(1, P + 1, batch)):
        tokens[i, P - n :] = rng.integers(2, V, n)
        mask[i, P - n :] = 1
    return tokens, mask


def make_ptx(seed: int, rows: int, t: int = 12) -> dict[str, np.ndarray]:
    """Packed pretraining rows: two documents per row (segments 1, 2), some trailing pads."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(2, V, (rows, t)).astype(np.int32)
    mask = np.zeros((rows, t), np.int32)
    for i in range(rows):
        cut, end = rng.integers(3, t - 4), rng.integers(t - 3, t + 1)
        mask[i, :cut], mask[i, cut:end] = 1, 2
    tokens = np.where(mask > 0, tokens, PAD).astype(np.int32)
    targets = np.concatenate([tokens[:, 1:], np.full((rows, 1), PAD, np.int32)], axis=1)
    nxt = np.concatenate([mask[:, 1:], np.zeros((rows, 1), np.int32)], axis=1)
    loss_mask = ((mask > 0) & (nxt == mask)).astype(np.int32)
    positions = np.asarray(positions_from_mask(mask))
    return {
        "tokens": tokens,
        "targets": targets,
        "loss_mask": loss_mask,
        "mask": mask,
        "positions": positions,
    }


@dataclasses.dataclass
class Setup:
    models: ppo.PPOModels
    cfg: ppo.PPOConfig
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
        value = ppo.init_value_params(self.models, self.cfg, self.reward, GAIN, BIAS)
        return ppo.create_ppo_state(
            self.cfg, self.optimizer, self.policy, value, jax.random.key(0), self.state_shardings
        )

    def rollout_params(self, state, reference=None) -> ppo.RolloutParams:
        rp = ppo.rollout_params(
            state, self.reference if reference is None else reference, self.reward, GAIN, BIAS
        )
        return rp if self.mesh is None else jax.device_put(rp, self.params_shardings)

    def batch(self, x):
        return x if self.mesh is None else jax.device_put(x, sharding.batch_sharding(self.mesh))


@functools.cache
def setup_a(mesh_shape: tuple | None = None) -> Setup:
    """Config A on no mesh (single device) or on a mesh {axis: size}."""
    policy_model, reference = random_params("lm", 0)
    reference = boost_token(reference, EOS, 1.2)
    _, noise = random_params("lm", 1, scale=0.05)
    policy = jax.tree.map(lambda a, b: a + b, reference, noise)
    reward_model, reward = random_params("scalar", 2)
    models = ppo.PPOModels(policy=policy_model, reward=reward_model, value=reward_model)
    conf = ppo.default_ppo_config()
    conf.optimizer.lr = 3e-3
    conf.value_optimizer.lr = 3e-3
    optimizer = ppo.make_ppo_optimizer(CFG_A, conf, num_iterations=10)
    s = Setup(models, CFG_A, optimizer, policy, reference, reward, None, None)
    if mesh_shape is not None:
        s.mesh = sharding.make_mesh(dict(mesh_shape))
        _, s.state_shardings = ppo.abstract_ppo_state(models, CFG_A, optimizer, s.mesh)
        s.params_shardings = ppo.rollout_params_shardings(models, CFG_A, s.mesh)
    s.rollout_fn = ppo.make_rollout_fn(
        models, CFG_A, mesh=s.mesh, params_shardings=s.params_shardings
    )
    s.update_fn = ppo.make_update_fn(
        models, CFG_A, optimizer, mesh=s.mesh, state_shardings=s.state_shardings
    )
    return s


def run_iteration(s: Setup, state, it: int, reference=None):
    """One PPO iteration of config A: rollout on prompts seeded by `it`, then update."""
    tokens, mask = make_prompts(it, s.cfg.batch_size)
    ro = s.rollout_fn(
        s.rollout_params(state, reference),
        s.batch(tokens),
        s.batch(mask),
        jax.random.key(1000 + it),
        state.kl["beta"],
    )
    ptx = s.batch(make_ptx(it, s.cfg.ptx_batch_size))
    new_state, metrics = s.update_fn(state, ro, ptx, state.rng)
    return ro, new_state, metrics


def test_value_net_starts_at_the_normalised_rm_score():
    """At step 0 the value net, read at the last real token of prompt + response, equals the
    RM's normalised score gain * raw + bias there (the normalisation is folded into its head),
    so GAE sees no constant offset between values and rewards."""
    s = setup_a()
    state = s.fresh_state()
    tokens, mask = make_prompts(7, s.cfg.batch_size)
    ro = s.rollout_fn(s.rollout_params(state), tokens, mask, jax.random.key(3), state.kl["beta"])
    seq, seq_mask, positions = ppo.join_prompt_response(
        ro.prompt_tokens, ro.prompt_mask, ro.response_tokens, ro.response_mask
    )
    per_token = s.models.value.apply(
        {"params": state.params["value"]}, seq, positions, seq_mask, per_token=True
    )
    m = np.asarray(seq_mask)
    last = m.shape[1] - 1 - np.argmax(m[:, ::-1] > 0, axis=1)  # last real token per row
    got = np.asarray(per_token)[np.arange(len(last)), last]
    want = GAIN * np.asarray(ro.raw_scores, np.float64) + BIAS
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    raw_rm = s.models.reward.apply({"params": s.reward}, seq, positions, seq_mask)
    np.testing.assert_allclose(np.asarray(raw_rm), np.asarray(ro.raw_scores), atol=1e-6)


def test_rollout_and_update_draw_from_separate_key_streams():
    """Iteration t's sampling keys (fold_in(rollout key, i) per token) and its per-epoch
    permutation keys (split(update key, E)) are all distinct, and differ across iterations."""
    base = jax.random.key(0)
    seen = {}
    for step in range(3):
        rollout_key, update_key = ppo.iteration_keys(base, step)
        keys = {f"token{i}": jax.random.fold_in(rollout_key, i) for i in range(4)}
        keys.update({f"epoch{e}": k for e, k in enumerate(jax.random.split(update_key, 3))})
        keys.update(rollout=rollout_key, update=update_key)
        for name, k in keys.items():
            data = tuple(np.asarray(jax.random.key_data(k)).ravel().tolist())
            assert data not in seen, (step, name, seen.get(data))
            seen[data] = (step, name)


def log_softmax64(x):
    x = np.asarray(x, np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


# ----------------------------------------------------------------------------- config


def test_config_errors_name_the_key():
    ppo.PPOConfig.from_config(ppo.default_ppo_config(), stop_token=EOS)  # defaults are valid
    with pytest.raises(ConfigError, match=r"ppo.stop_token"):
        ppo.PPOConfig.from_config(ppo.default_ppo_config())
    bad = ppo.default_ppo_config()
    bad.cliprang = 0.3
    with pytest.raises(ConfigError, match=r"'ppo.cliprang' does not exist"):
        ppo.PPOConfig.from_config(bad, stop_token=EOS)
    ok = ppo.PPOConfig.from_config(bad, stop_token=EOS, extra_keys=("cliprang",))
    assert ok.cliprange == 0.2
    with pytest.raises(ConfigError, match=r"ppo.batch_size.*num_minibatches"):
        ppo.PPOConfig(batch_size=10, num_minibatches=3, stop_token=EOS).validate()
    conf = ppo.default_ppo_config()
    conf.optimizer.warmup_steps = 5
    with pytest.raises(ConfigError, match=r"ppo.optimizer.warmup_steps"):
        ppo.make_ppo_optimizer(CFG_A, conf, 10)


def test_abstract_state_matches_real_state():
    s = setup_a()
    mesh = sharding.make_mesh({"data": 1})
    abstract, shardings = ppo.abstract_ppo_state(s.models, s.cfg, s.optimizer, mesh)
    real = s.fresh_state()
    shapes = lambda t: jax.tree.map(lambda x: (x.shape, x.dtype), t)  # noqa: E731
    assert shapes(abstract) == shapes(real)
    assert jax.tree.structure(shardings) == jax.tree.structure(real)


# ----------------------------------------------------------------------------- rollout


@functools.partial(jax.jit, static_argnums=(0, 1))
def right_padded_forward(policy_model, scalar_model, policy, reference, reward, seq, seq_mask):
    """Policy/reference logits and per-token RM outputs over [B,T] rows whose real tokens start at
    index 0 (positions = arange): the layout without left padding, as the reference."""
    pos = jnp.broadcast_to(jnp.arange(seq.shape[1]), seq.shape)
    logits = [policy_model.apply({"params": p}, seq, pos, seq_mask) for p in (policy, reference)]
    per_token = scalar_model.apply({"params": reward}, seq, pos, seq_mask, per_token=True)
    return logits[0], logits[1], per_token


def test_rollout_matches_naive_per_row_reference():
    """Log-probs, values, RM score, penalty and rewards against a right-padded layout (no
    left padding) and per-row numpy float64 arithmetic."""
    s = setup_a()
    state = s.fresh_state()
    beta = 0.1
    tokens, mask = make_prompts(7, s.cfg.batch_size)
    ro = s.rollout_fn(s.rollout_params(state), tokens, mask, jax.random.key(7), jnp.float32(beta))
    ro = jax.device_get(ro)
    temp = s.cfg.temperature
    b_size = s.cfg.batch_size
    seq, seq_mask = np.zeros((b_size, P + N), np.int32), np.zeros((b_size, P + N), np.int32)
    for b in range(b_size):
        row = np.concatenate(
            [tokens[b][mask[b] != 0], ro.response_tokens[b][ro.response_mask[b] != 0]]
        )
        seq[b, : len(row)], seq_mask[b, : len(row)] = row, 1
    pol_logits, ref_logits, rm_out = jax.device_get(
        right_padded_forward(
            s.models.policy, s.models.reward, s.policy, s.reference, s.reward, seq, seq_mask
        )
    )
    stops = 0
    for b in range(b_size):
        n_prompt = int(mask[b].sum())
        n = int(ro.response_mask[b].sum())
        resp = ro.response_tokens[b, :n]
        # The mask is 1 exactly up to and including the first stop token.
        assert np.all(ro.response_mask[b, :n] == 1) and np.all(ro.response_mask[b, n:] == 0)
        assert np.all(ro.response_tokens[b, n:] == PAD)
        has_stop = EOS in resp
        assert not has_stop or (resp[-1] == EOS and EOS not in resp[:-1])
        assert has_stop or n == N
        stops += has_stop
        at = n_prompt - 1 + np.arange(n)  # index whose logits predict response token j
        want = {
            "logprobs": log_softmax64(pol_logits[b] / temp)[at, resp],
            "ref_logprobs": log_softmax64(ref_logits[b] / temp)[at, resp],
            "values": GAIN * rm_out[b, at] + BIAS,  # starts as the normalised RM
        }
        raw = float(rm_out[b, n_prompt + n - 1])  # the RM at the last token: the stop token
        score = GAIN * raw + BIAS if has_stop else -1.0
        rewards = -beta * (want["logprobs"] - want["ref_logprobs"])
        rewards[-1] += score
        want["rewards"] = rewards
        for name, value in want.items():
            got = getattr(ro, name)[b]
            np.testing.assert_allclose(got[:n], value, atol=2e-5, err_msg=f"{name} row {b}")
            assert np.all(got[n:] == 0), f"{name} row {b}: nonzero on padding"
        np.testing.assert_allclose(ro.raw_scores[b], raw, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(ro.scores[b], score, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(
            ro.kl[b], np.sum(want["logprobs"] - want["ref_logprobs"]), atol=1e-4
        )
    assert 0 < stops < b_size, "test needs rows with and without a stop token"
    m = ro.metrics
    np.testing.assert_allclose(m["no_stop_frac"], 1 - stops / b_size, atol=1e-6)
    np.testing.assert_allclose(m["kl"], ro.kl.mean(), rtol=1e-5)
    np.testing.assert_allclose(m["response_length"], ro.response_mask.sum(1).mean(), rtol=1e-6)
    assert m["logprob_mismatch"] < 1e-4  # KV-cache sampler vs full forward
    assert m["kl"] != 0


def test_kl_rewards_zero_when_policy_is_reference():
    s = setup_a()
    state = s.fresh_state()
    tokens, mask = make_prompts(3, s.cfg.batch_size)
    ro = s.rollout_fn(
        s.rollout_params(state, reference=s.policy),
        tokens,
        mask,
        jax.random.key(3),
        jnp.float32(0.5),
    )
    ro = jax.device_get(ro)
    np.testing.assert_array_equal(ro.logprobs, ro.ref_logprobs)
    assert np.all(ro.kl == 0)
    last = ro.response_mask.sum(1) - 1
    expected = np.zeros_like(ro.rewards)
    expected[np.arange(len(last)), last] = ro.scores
    np.testing.assert_array_equal(ro.rewards, expected)


def test_stop_token_as_the_last_generated_token_counts_as_stopped():
    """A response whose stop token is its N-th (last possible) token has stopped: it gets its
    normalised RM score at that token, not the no-stop penalty; only rows without the stop
    token get the penalty. Over 16 rollouts, so that such rows occur (about 1 in 20)."""
    s = setup_a()
    state = s.fresh_state()
    beta = 0.1
    kinds = {"stop at N": 0, "stop before N": 0, "no stop": 0}
    for seed in range(100, 116):
        tokens, mask = make_prompts(seed, s.cfg.batch_size)
        ro = s.rollout_fn(
            s.rollout_params(state), tokens, mask, jax.random.key(seed), jnp.float32(beta)
        )
        ro = jax.device_get(ro)
        stopped = np.zeros(s.cfg.batch_size, bool)
        for b in range(s.cfg.batch_size):
            n = int(ro.response_mask[b].sum())
            resp = ro.response_tokens[b, :n]
            stopped[b] = EOS in resp
            kind = "no stop" if not stopped[b] else "stop at N" if n == N else "stop before N"
            kinds[kind] += 1
            want = GAIN * float(ro.raw_scores[b]) + BIAS if stopped[b] else -1.0
            what = f"seed {seed} row {b} ({kind}): response {resp.tolist()}"
            assert float(ro.scores[b]) == pytest.approx(want, abs=1e-5), what
            kl_part = -beta * (ro.logprobs[b, n - 1] - ro.ref_logprobs[b, n - 1])
            assert float(ro.rewards[b, n - 1] - kl_part) == pytest.approx(want, abs=1e-5), what
        np.testing.assert_allclose(ro.metrics["no_stop_frac"], 1 - stopped.mean(), atol=1e-6)
    assert min(kinds.values()) >= 3, kinds


# ----------------------------------------------------------------------------- update


def test_update_recomputes_rollout_logprobs_at_step0():
    """Same params, same temperature (0.7): the update's ratios start at exactly 1."""
    s = setup_a()
    state = s.fresh_state()
    ro, _, metrics = run_iteration(s, state, 0)
    assert float(metrics["log_ratio_absmax_first"]) < 1e-5
    # The same recomputation on a shuffled subset of rows, and a control at the wrong temperature.
    rows = np.array([5, 0, 11, 3])
    seq = (ro.prompt_tokens, ro.prompt_mask, ro.response_tokens, ro.response_mask)
    seq = tuple(np.asarray(x)[rows] for x in seq)
    fwd = jax.jit(ppo.policy_forward, static_argnums=0)  # temperature traced: one compile
    logp, _, _ = fwd(s.models.policy, s.policy, *seq, jnp.float32(s.cfg.temperature))
    np.testing.assert_allclose(logp, np.asarray(ro.logprobs)[rows], atol=1e-5)
    wrong, _, _ = fwd(s.models.policy, s.policy, *seq, jnp.float32(1.0))
    assert np.max(np.abs(np.asarray(wrong) - np.asarray(ro.logprobs)[rows])) > 1e-2


def lm_loss(policy, ptx):
    """The pretraining LM loss on its own (what PPO-ptx scales by ptx_coef)."""
    model = Transformer(MC)
    logits = model.apply({"params": policy}, ptx["tokens"], ptx["positions"], ptx["mask"])
    return losses.lm_loss(logits, ptx["targets"], ptx["loss_mask"])


lm_grad = jax.jit(jax.grad(lm_loss))


def test_ptx_gradient_is_gamma_times_lm_gradient():
    """Pure loss: grad(total) - grad(total with ptx_coef=0) == ptx_coef * grad(LM loss alone)."""
    s = setup_a()
    tokens, mask = make_prompts(5, 8)
    rng = np.random.default_rng(5)
    resp = rng.integers(2, V, (8, N)).astype(np.int32)
    rmask = (np.arange(N)[None] < rng.integers(1, N + 1, (8, 1))).astype(np.int32)
    f32 = lambda *shape: rng.normal(size=shape).astype(np.float32)  # noqa: E731
    mb = {
        "prompt_tokens": tokens,
        "prompt_mask": mask,
        "response_tokens": resp,
        "response_mask": rmask,
        "old_logprobs": f32(8, N) * 0.1 - 3.0,
        "old_values": f32(8, N),
        "advantages": f32(8, N),
        "returns": f32(8, N),
    }
    ptx = make_ptx(5, 8)
    params = {"policy": s.policy, "value": s.reward}
    no_ptx = dataclasses.replace(s.cfg, ptx_coef=0.0)

    @jax.jit
    def grads(params):
        loss = lambda cfg: lambda p: ppo.ppo_loss(s.models, cfg, p, mb, ptx)[0]  # noqa: E731
        return jax.grad(loss(s.cfg))(params), jax.grad(loss(no_ptx))(params)

    g_full, g_no_ptx = grads(params)
    g_lm = lm_grad(s.policy, ptx)
    diff = jax.tree.map(lambda a, b: a - b, g_full, g_no_ptx)
    gamma = s.cfg.ptx_coef
    for d, g in zip(jax.tree.leaves(diff["policy"]), jax.tree.leaves(g_lm), strict=True):
        np.testing.assert_allclose(d, gamma * g, rtol=1e-3, atol=1e-5 * gamma)
    assert all(float(jnp.max(jnp.abs(d))) == 0 for d in jax.tree.leaves(diff["value"]))
    assert optax.tree.norm(g_lm) > 0 and optax.tree.norm(g_no_ptx["policy"]) > 0


def test_update_applies_gamma_times_lm_gradient_when_ppo_term_is_zero():
    """Shared trunk, zero score, beta 0, zero head: advantages, values and returns are all 0, so
    the PPO gradient vanishes and one SGD(1) step moves the policy by ptx_coef * grad(LM)."""
    cfg = dataclasses.replace(
        CFG_A,
        batch_size=8,
        num_minibatches=1,
        num_epochs=1,
        value_head_on_policy=True,
        penalize_no_stop=False,
        adaptive_kl=False,
        kl_coef=0.0,
    )
    s = setup_a()
    models = ppo.PPOModels(policy=s.models.policy)
    optimizer = ppo.PPOOptimizer(policy=optax.sgd(1.0))
    head = ppo.init_value_params(models, cfg)
    state = ppo.init_ppo_state(cfg, optimizer, s.policy, head, jax.random.key(0))
    tokens, mask = make_prompts(9, 8)
    rng = np.random.default_rng(9)
    resp = rng.integers(2, V, (8, N)).astype(np.int32)
    rmask = (np.arange(N)[None] < rng.integers(1, N + 1, (8, 1))).astype(np.int32)
    zeros = np.zeros((8, N), np.float32)  # old log-probs do not matter: advantages are 0
    ro = ppo.Rollout(
        tokens, mask, resp, rmask, zeros, zeros, zeros, zeros, zeros[:, 0], zeros[:, 0],
        zeros[:, 0], metrics={},
    )  # fmt: skip
    ptx = make_ptx(9, 8)
    before = jax.tree.map(np.asarray, state.params)
    new, metrics = ppo.make_update_fn(models, cfg, optimizer)(state, ro, ptx, state.rng)

    g_lm = lm_grad(s.policy, ptx)
    moved = jax.tree.map(lambda a, b: a - np.asarray(b), before["policy"], new.params["policy"])
    for d, g in zip(jax.tree.leaves(moved), jax.tree.leaves(g_lm), strict=True):
        np.testing.assert_allclose(d, cfg.ptx_coef * np.asarray(g), rtol=1e-3, atol=1e-5)
    for a, b in zip(
        jax.tree.leaves(before["value"]), jax.tree.leaves(new.params["value"]), strict=True
    ):
        np.testing.assert_array_equal(a, b)
    assert float(metrics["policy_loss"]) == 0 and float(metrics["value_loss"]) == 0
    np.testing.assert_allclose(metrics["ptx_loss"], lm_loss(s.policy, ptx), rtol=1e-5)


def test_iterations_compile_once_and_kl_controller_follows_formula():
    s = setup_a()
    state = s.fresh_state()
    beta = 0.02  # kl_coef; adaptive: e = clip(KL / target - 1, -0.2, 0.2), beta *= 1 + e n / H
    ema = jax.tree.map(np.asarray, state.ema)
    for it in range(3):
        assert float(state.kl["beta"]) == pytest.approx(beta, rel=1e-6)
        ro, state, metrics = run_iteration(s, state, it)
        kl = float(np.mean(np.asarray(ro.kl)))
        assert float(ro.metrics["beta"]) == pytest.approx(beta, rel=1e-6)
        err = np.clip(kl / s.cfg.kl_target - 1.0, -0.2, 0.2)
        beta = beta * (1.0 + err * s.cfg.batch_size / s.cfg.kl_horizon)
        assert float(metrics["beta"]) == pytest.approx(beta, rel=1e-5)
        assert int(state.step) == it + 1
    assert float(state.kl["beta"]) != 0.02
    assert s.rollout_fn.jitted._cache_size() == 1
    assert s.update_fn.jitted._cache_size() == 1
    # The EMA (decay d = 0.992 after each of the T = 12 optimizer steps, from e0 = p0) is
    # e0 + (1 - d) sum_k d^(T-k) (p_k - p0): a weighted mean of the steps' drift with total
    # weight 1 - d^T = 0.09, so it has moved about 5% of the way to the params (a steady
    # drift), surely less than 2 x 9%. Reversed (weight d on the params) it sits on them.
    steps = 3 * s.cfg.updates_per_iteration
    gone = 1 - s.cfg.ema_decay**steps
    drift = lambda a: optax.tree.norm(jax.tree.map(lambda x, y: x - y, a, ema))  # noqa: E731
    ratio = float(drift(state.ema) / drift(state.params["policy"]))
    assert 0.1 * gone < ratio < 2 * gone, (ratio, gone)
    finite = {k: float(v) for k, v in metrics.items()}
    assert all(math.isfinite(v) for v in finite.values()), finite


# ----------------------------------------------------------------------------- one update, by hand


def np_whiten(x, mask, shift_mean=True):
    """float64 whitening over the entries with mask > 0 (ddof 0, eps 1e-8); 0 elsewhere."""
    x, sel = np.asarray(x, np.float64), np.asarray(mask) > 0
    mean, var = x[sel].mean(), x[sel].var()
    out = (x - mean) / np.sqrt(var + 1e-8) + (0.0 if shift_mean else mean)
    return np.where(sel, out, 0.0)


def synthetic_rollout(s: Setup, cfg: ppo.PPOConfig, seed: int) -> ppo.Rollout:
    """A rollout of `cfg.batch_size` episodes with ragged response masks (lengths 1..N, one full
    row, pads 0 like a real rollout) and rewards of nonzero mean. Old log-probs are the
    policy's own (ratios start at 1), so every valid token carries gradient."""
    b = cfg.batch_size
    tokens, mask = make_prompts(seed, b)
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, N + 1, b)
    lengths[0], lengths[1] = N, 1
    rmask = (np.arange(N)[None] < lengths[:, None]).astype(np.int32)
    resp = np.where(rmask > 0, rng.integers(2, V, (b, N)), PAD).astype(np.int32)
    on = lambda x: np.where(rmask > 0, x, 0.0).astype(np.float32)  # noqa: E731
    logp, _, _ = jax.jit(ppo.policy_forward, static_argnums=0)(
        s.models.policy, s.policy, tokens, mask, resp, rmask, jnp.float32(cfg.temperature)
    )
    zeros = np.zeros((b,), np.float32)
    return ppo.Rollout(
        tokens, mask, resp, rmask,
        logprobs=on(logp), ref_logprobs=on(logp), values=on(rng.normal(0.3, 1.0, (b, N))),
        rewards=on(rng.normal(0.8, 1.5, (b, N))), scores=zeros, raw_scores=zeros, kl=zeros,
        metrics={},
    )  # fmt: skip


@dataclasses.dataclass
class OneStep:
    """One PPO update of one epoch and one minibatch with SGD(1) on both networks."""

    cfg: ppo.PPOConfig
    rollout: ppo.Rollout
    params0: dict  # numpy
    ema0: dict  # numpy, deliberately != params0["policy"]
    params1: dict  # numpy
    ema1: dict  # numpy
    metrics: dict
    gae_inputs: list  # (rewards, mask) as they entered losses.gae


@functools.cache
def one_step() -> OneStep:
    """Reward whitening on (so both whitenings are in play); the paper's advantage whitening."""
    s = setup_a()
    cfg = dataclasses.replace(
        CFG_A,
        batch_size=8,
        num_minibatches=1,
        num_epochs=1,
        ptx_coef=0.0,
        adaptive_kl=False,
        whiten_rewards=True,
    )
    optimizer = ppo.PPOOptimizer(policy=optax.sgd(1.0), value=optax.sgd(1.0))
    state = ppo.init_ppo_state(cfg, optimizer, s.policy, s.reward, jax.random.key(0))
    _, noise = random_params("lm", 3, scale=0.05)
    state = state.replace(ema=jax.tree.map(lambda e, n: e + n, state.ema, noise))
    ro = synthetic_rollout(s, cfg, seed=11)
    params0 = jax.tree.map(np.asarray, state.params)
    ema0 = jax.tree.map(np.asarray, state.ema)

    seen = []
    real_gae = losses.gae

    def spy_gae(rewards, values, mask, gamma, lam):
        record = lambda r, m: seen.append((np.asarray(r), np.asarray(m)))  # noqa: E731
        jax.debug.callback(record, rewards, mask)
        return real_gae(rewards, values, mask, gamma, lam)

    with unittest.mock.patch.object(losses, "gae", spy_gae):
        update_fn = ppo.make_update_fn(s.models, cfg, optimizer)
        new, metrics = update_fn(state, ro, None, jax.random.key(5))
    return OneStep(
        cfg, ro, params0, ema0, jax.tree.map(np.asarray, new.params),
        jax.tree.map(np.asarray, new.ema), {k: float(v) for k, v in metrics.items()}, seen,
    )  # fmt: skip


def reference_advantages(cfg: ppo.PPOConfig, ro: ppo.Rollout):
    """float64: (rewards entering GAE, raw advantages, whitened advantages, returns)."""
    from tests.unit.test_losses import naive_gae

    mask = np.asarray(ro.response_mask)
    rewards = np.asarray(ro.rewards, np.float64)
    if cfg.whiten_rewards:
        rewards = np_whiten(rewards, mask, shift_mean=False)
    values = np.asarray(ro.values, np.float64)
    adv, returns = naive_gae(rewards, values, mask, cfg.gamma, cfg.lam)
    adv = np.where(mask > 0, adv, 0.0)
    white = np_whiten(adv, mask) if cfg.whiten_advantages else adv
    return rewards, adv, white, returns


def reference_grads(cfg: ppo.PPOConfig, ro: ppo.Rollout, params, advantages, returns):
    """Gradient of the minibatch loss (pg + vf, no ptx) at `params` with the given advantages."""
    s = setup_a()
    mb = {
        "prompt_tokens": ro.prompt_tokens,
        "prompt_mask": ro.prompt_mask,
        "response_tokens": ro.response_tokens,
        "response_mask": ro.response_mask,
        "old_logprobs": ro.logprobs,
        "old_values": ro.values,
        "advantages": np.asarray(advantages, np.float32),
        "returns": np.asarray(returns, np.float32),
    }
    return jax.tree.map(np.asarray, loss_grad_fn(s.models, cfg)(params, mb))


@functools.cache
def loss_grad_fn(models: ppo.PPOModels, cfg: ppo.PPOConfig):
    return jax.jit(jax.grad(lambda p, mb: ppo.ppo_loss(models, cfg, p, mb, None)[0]))


def test_update_uses_gae_advantages_whitened_over_the_response_mask():
    """One SGD(1) step on a ragged-mask rollout moves every parameter (policy and value
    network) by minus the gradient of the loss whose advantages are whiten(gae(rewards',
    values), response_mask) and whose returns are gae's, rewards' the whitened rewards, all
    from a float64 reference. Whitening over all positions (pads included) or skipping it
    moves the policy differently."""
    step = one_step()
    _, raw, white, returns = reference_advantages(step.cfg, step.rollout)
    mask = np.asarray(step.rollout.response_mask)
    assert 0 < mask.mean() < 1  # ragged: pads exist
    grads = reference_grads(step.cfg, step.rollout, step.params0, white, returns)
    moved = jax.tree.map(lambda a, b: a - b, step.params0, step.params1)
    flat_g = jax.tree_util.tree_flatten_with_path(grads)[0]
    for (path, g), d in zip(flat_g, jax.tree.leaves(moved), strict=True):
        where = jax.tree_util.keystr(path)
        np.testing.assert_allclose(d, g, rtol=1e-3, atol=2e-6, err_msg=f"step != -grad: {where}")
    assert optax.tree.norm(grads["policy"]) > 1e-3 and optax.tree.norm(grads["value"]) > 1e-3
    # The raw (unwhitened) advantages and the returns are logged as masked means.
    assert step.metrics["advantages_mean"] == pytest.approx(raw[mask > 0].mean(), rel=1e-4)
    assert step.metrics["returns_mean"] == pytest.approx(returns[mask > 0].mean(), rel=1e-4)


def test_whiten_rewards_keeps_the_masked_mean_and_gives_unit_std():
    """whiten_rewards=True: the rewards entering GAE are the rollout's rewards rescaled to
    masked std 1 with their masked mean kept (the baseline does not move), 0 on pads."""
    step = one_step()
    assert len(step.gae_inputs) == 1
    got, mask = step.gae_inputs[0]
    sel = np.asarray(step.rollout.response_mask) > 0
    np.testing.assert_array_equal(mask > 0, sel)
    raw = np.asarray(step.rollout.rewards, np.float64)
    assert raw[sel].mean() > 0.3 and abs(raw[sel].std() - 1.0) > 0.2  # whitening visible
    np.testing.assert_allclose(got[sel].mean(), raw[sel].mean(), rtol=1e-5)
    np.testing.assert_allclose(got[sel].std(), 1.0, rtol=1e-5)
    assert np.all(got[~sel] == 0)
    want, _, _, _ = reference_advantages(step.cfg, step.rollout)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_ema_after_one_optimizer_step_is_exact():
    """After one optimizer step (1 epoch x 1 minibatch) the EMA is d * ema0 + (1 - d) * params1
    (d = ema_decay), from an EMA that differs from the params."""
    step = one_step()
    d = step.cfg.ema_decay
    flat = jax.tree_util.tree_flatten_with_path(step.ema1)[0]
    leaves = (flat, jax.tree.leaves(step.ema0), jax.tree.leaves(step.params1["policy"]))
    for (path, e1), e0, p1 in zip(*leaves, strict=True):
        want = d * np.asarray(e0, np.float64) + (1 - d) * np.asarray(p1, np.float64)
        assert e1.dtype == np.float32
        np.testing.assert_allclose(
            e1, want, rtol=1e-6, atol=1e-7, err_msg=jax.tree_util.keystr(path)
        )
    gap = lambda a, b: optax.tree.norm(jax.tree.map(lambda x, y: x - y, a, b))  # noqa: E731
    assert gap(step.ema0, step.params0["policy"]) > 0.1  # the EMA started elsewhere
    assert gap(step.params1["policy"], step.params0["policy"]) > 1e-3  # the step moved


def minibatch_episodes(epochs: int, minibatches: int, batch: int = 16):
    """Returns run(state, rng) -> (state, ids [epochs, minibatches, batch / minibatches]): one
    update whose minibatches are recorded by episode id (response token 0 = 2 + episode)."""
    s = setup_a()
    cfg = dataclasses.replace(
        CFG_A,
        batch_size=batch,
        num_minibatches=minibatches,
        num_epochs=epochs,
        ptx_coef=0.0,
        adaptive_kl=False,
        value_head_on_policy=True,
    )
    models = ppo.PPOModels(policy=s.models.policy)
    optimizer = ppo.PPOOptimizer(policy=optax.sgd(1e-2))
    ro = synthetic_rollout(s, cfg, seed=12)
    ro = ro.replace(response_tokens=ro.response_tokens.copy())
    ro.response_tokens[:, 0] = 2 + np.arange(batch)
    seen = []
    real_loss = ppo.ppo_loss

    def spy_loss(models, cfg, params, mb, ptx):
        record = lambda ids: seen.append(np.asarray(ids) - 2)  # noqa: E731
        jax.debug.callback(record, mb["response_tokens"][:, 0], ordered=True)
        return real_loss(models, cfg, params, mb, ptx)

    with unittest.mock.patch.object(ppo, "ppo_loss", spy_loss):
        update_fn = ppo.make_update_fn(models, cfg, optimizer)
        state0 = ppo.init_ppo_state(
            cfg, optimizer, s.policy, ppo.init_value_params(models, cfg), jax.random.key(0)
        )
        update_fn(state0, ro, None, state0.rng)  # traces with the spy in place

    def run(state):
        """One iteration's update, called as the driver and run_iteration call it."""
        seen.clear()
        state, _ = update_fn(state, ro, None, state.rng)
        jax.effects_barrier()
        return state, np.stack(seen).reshape(epochs, minibatches, -1)

    fresh = lambda: ppo.init_ppo_state(  # noqa: E731
        cfg, optimizer, s.policy, ppo.init_value_params(models, cfg), jax.random.key(0)
    )
    return run, fresh


def test_minibatches_are_a_fresh_permutation_every_epoch_and_iteration():
    """Properties of the minibatch split, whatever key stream draws it: every episode in
    exactly one minibatch per epoch; the split differs between the epochs of an update and
    between iterations; the same state (and key) gives the same split."""
    epochs, minibatches = 3, 4
    run, fresh = minibatch_episodes(epochs, minibatches)
    state, first = run(fresh())
    _, second = run(state)  # the next iteration (state.step 1)
    _, again = run(fresh())
    np.testing.assert_array_equal(again, first)  # deterministic
    splits = []
    for it, ids in enumerate((first, second)):
        for e in range(epochs):
            what = f"iteration {it}, epoch {e}: {ids[e].tolist()}"
            assert sorted(ids[e].ravel().tolist()) == list(range(16)), what
            splits.append(frozenset(frozenset(mb.tolist()) for mb in ids[e]))
    # 6 epochs, 6 different partitions of the 16 episodes into 4 minibatches.
    distinct = len(set(splits))
    assert distinct == len(splits), (
        f"{distinct} distinct splits in 2 iterations x {epochs} epochs: iteration 0 epochs 0, 1: "
        f"{first[0].tolist()}, {first[1].tolist()}; iteration 1 epoch 0: {second[0].tolist()}"
    )


# ----------------------------------------------------------------------------- learning


TARGET = 7


def count_target(_, prompt_tokens, prompt_mask, response_tokens, response_mask):
    """Programmatic reward replacing the RM: +1 per TARGET token in the response."""
    return jnp.sum((response_tokens == TARGET) & (response_mask != 0), axis=1).astype(jnp.float32)


def kl_regularised_optimum(beta: float) -> tuple[float, float]:
    """(reward, KL) of argmax E[r] - beta KL for N independent tokens under a uniform reference.

    pi*(v) ~ exp(r(v) / beta): p = e^{1/beta} / (V - 1 + e^{1/beta}) for TARGET. Ignores the
    stop token (rare here), so it is approximate for our rollouts.
    """
    p = math.exp(1 / beta) / (V - 1 + math.exp(1 / beta))
    kl = p * math.log(p * V) + (1 - p) * math.log((1 - p) * V / (V - 1))
    return N * p, N * kl


@pytest.mark.slow
def test_ppo_learns_programmatic_reward_within_kl_budget():
    policy_model = Transformer(MC)
    ones = jnp.ones((1, 4), jnp.int32)
    init = jax.jit(policy_model.init)(jax.random.key(0), ones, jnp.arange(4)[None], ones)
    policy = nn.unbox(init["params"])  # standard init: a near-uniform reference
    cfg = ppo.PPOConfig(
        batch_size=32,
        num_minibatches=4,
        num_epochs=2,
        max_new_tokens=N,
        stop_token=EOS,
        ptx_coef=0.0,
        value_head_on_policy=True,
        penalize_no_stop=False,
        warmup_iterations=0,
    )
    models = ppo.PPOModels(policy=policy_model)
    conf = ppo.default_ppo_config()
    conf.optimizer.lr = 1e-3
    optimizer = ppo.make_ppo_optimizer(cfg, conf, 100)
    rollout_fn = ppo.make_rollout_fn(models, cfg, score_fn=count_target)
    update_fn = ppo.make_update_fn(models, cfg, optimizer)
    head = ppo.init_value_params(models, cfg)

    def train(beta: float, iterations: int) -> tuple[float, float, float]:
        c = dataclasses.replace(cfg, kl_coef=beta)
        state = ppo.init_ppo_state(c, optimizer, policy, head, jax.random.key(0))
        scores, kls = [], []
        for it in range(iterations):
            tokens, mask = make_prompts(it, cfg.batch_size)
            rp = ppo.rollout_params(state, policy, None)
            ro = rollout_fn(rp, tokens, mask, jax.random.key(it), state.kl["beta"])
            state, _ = update_fn(state, ro, None, state.rng)
            scores.append(float(ro.metrics["score_raw"]))
            kls.append(float(ro.metrics["kl"]))
        last = slice(-10, None)
        return scores[0], float(np.mean(scores[last])), float(np.mean(kls[last]))

    results = {beta: train(beta, its) for beta, its in ((0.05, 40), (0.5, 80), (10.0, 40))}
    print("learning (beta: first score, last-10 score, last-10 KL):", results)
    first, last, kl = results[0.05]
    assert first < 0.6 and last > 6.0, results  # from ~N/V = 0.25 to close to the maximum 8
    assert kl < N * math.log(V)
    # beta = 0.5: PPO lands near the closed-form optimum of E[r] - beta KL.
    want_r, want_kl = kl_regularised_optimum(0.5)  # ~1.54, ~1.62
    first, last, kl = results[0.5]
    assert last > 0.6 * want_r and kl < 2.0 * want_kl, (results, want_r, want_kl)
    # beta = 10: the KL term dominates; the policy stays at the reference.
    first, last, kl = results[10.0]
    assert kl < 0.2 and last < 0.6, results


# ----------------------------------------------------------------------------- devices


def two_iterations(mesh_shape: tuple | None, out_path: str) -> None:
    """Two PPO iterations of config A; writes rollout fields, metrics and final state (npz)."""
    s = setup_a(mesh_shape)
    state = s.fresh_state()
    out = {}
    for it in range(2):
        ro, state, metrics = run_iteration(s, state, it)
        for name in ("response_tokens", "response_mask", "logprobs", "ref_logprobs", "values",
                     "rewards", "scores"):  # fmt: skip
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
            f"from tests.unit.test_rl_ppo import two_iterations\n"
            f"two_iterations({MESH_822!r}, {json.dumps(eight)})\n",
            num_devices=8,
        )
        a, b = np.load(one), np.load(eight)
        assert sorted(a.files) == sorted(b.files)
        for key in a.files:
            if key.endswith("['k']['bias']"):
                # Softmax ignores a key bias (q.b is the same for every key), so its gradient is
                # rounding noise that Adam scales up to +-lr: layout-dependent, and harmless.
                continue
            if "tokens" in key or "mask" in key:
                np.testing.assert_array_equal(a[key], b[key], err_msg=key)
            elif key.endswith("clip_frac"):
                # A count of threshold crossings: one token flipping by rounding moves it by
                # 1/tokens, so it is compared to within a few tokens, not to rtol.
                np.testing.assert_allclose(a[key], b[key], atol=0.02, err_msg=key)
            else:
                np.testing.assert_allclose(a[key], b[key], rtol=1e-4, atol=1e-5, err_msg=key)


def test_ema_decay_follows_the_run_length_and_penalty_is_in_rm_sds():
    """The EMA's decay gives the paper's 0.992 at the paper's 4,000 updates and leaves the
    same (negligible) share at the initialisation whatever the run length; the stage's
    no-stop penalty is read in RM standard deviations."""
    from instructrl.stages.ppo import default_config, ppo_config

    assert ppo.ema_decay_for_run(ppo.PAPER_EMA_HORIZON, 500 * 8) == pytest.approx(0.992)
    shares = [ppo.ema_decay_for_run(1 / 32, n) ** n for n in (240, 4000, 40000)]
    assert all(1e-16 < s < 1e-13 for s in shares), shares  # ~exp(-32) at every length
    assert abs(0.992**240 - 0.145) < 1e-3  # what a fixed 0.992 left at 240 updates
    assert ppo.ema_decay_for_run(0.0, 240) == 0.0
    c = default_config()
    c.update(num_iterations=60, batch_size=64, num_minibatches=4, no_stop_penalty=-1.5)
    cfg = ppo_config(c, "ppo", stop_token=EOS, pad_id=PAD, penalty_unit=2.0)
    assert cfg.no_stop_penalty == pytest.approx(-3.0)
    assert cfg.ema_decay == pytest.approx(1 - 1 / (240 / 32))
    c.ema_decay = 0.5  # set explicitly: used as it is
    assert ppo_config(c, "ppo", EOS, PAD, 1.0).ema_decay == 0.5
