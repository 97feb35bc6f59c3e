"""The `dpo` stage's compiled core (instructrl/stages/dpo.py), below the driver:
sequence_logprobs and its gradient against a float64 Python loop, and the train and eval
steps (dpo.make_steps; ptx and gradient accumulation on) giving the same numbers on 1 device
and a (2, 2, 2) mesh of 8 virtual CPU devices.

The DPO/IPO objectives are tested against naive references in test_objectives.py; the stage
through the CLI (learning, compile once, SIGKILL resume) in tests/stages/test_algorithms.py.
"""

from __future__ import annotations

import json
import math
import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from instructrl import sharding, train_lib
from instructrl.models import Transformer
from instructrl.stages import dpo
from tests.unit.test_rl_ppo import MC, MESH_822, PAD, V, random_params

T = MC.max_len


def make_batch(seed: int, b: int, k_max: int) -> dict[str, np.ndarray]:
    """A random batch laid out as data/examples.py rm_example lays one out: prompt j has
    k_j in 2..k_max responses (rows >= k_j all padding), [BOS] prompt (prompt_len tokens)
    then a response, padded with PAD to T; pair_mask from a random ranking."""
    rng = np.random.default_rng(seed)
    tokens = np.full((b, k_max, T), PAD, np.int32)
    mask = np.zeros((b, k_max, T), np.int32)
    pair_mask = np.zeros((b, k_max, k_max), np.float32)
    prompt_len = rng.integers(2, 6, size=b).astype(np.int32)
    ks = rng.integers(2, k_max + 1, size=b)
    ks[0] = k_max - 1 if k_max > 2 else k_max  # at least one prompt with K < K_max
    for i in range(b):
        prompt = rng.integers(2, V, size=prompt_len[i])
        for k in range(ks[i]):
            n = prompt_len[i] + rng.integers(1, T - prompt_len[i] + 1)
            tokens[i, k, :n] = np.concatenate([prompt, rng.integers(1, V, n - prompt_len[i])])
            mask[i, k, :n] = 1
        rank = rng.permutation(ks[i])  # rank[k]: 0 best
        for w in range(ks[i]):
            for lo in range(ks[i]):
                pair_mask[i, w, lo] = float(rank[w] < rank[lo])
    positions = np.where(mask > 0, np.arange(T), 0).astype(np.int32)
    return {"tokens": tokens, "mask": mask, "positions": positions, "pair_mask": pair_mask,
            "response_mask": (np.arange(k_max)[None] < ks[:, None]).astype(np.int32),
            "prompt_len": prompt_len}  # fmt: skip


def naive_sequence_logprobs(logits, batch, weights):
    """float64, one (prompt, response, position) at a time: ([B, K] summed log-probs of the
    response tokens (index >= prompt_len, mask 1), d(sum weights x that) / d logits)."""
    b, k_max, t = batch["tokens"].shape
    out = np.zeros((b, k_max))
    grad = np.zeros(logits.shape)
    for i in range(b):
        for k in range(k_max):
            row = i * k_max + k
            for j in range(1, t):
                if j < batch["prompt_len"][i] or batch["mask"][i, k, j] == 0:
                    continue
                x = [float(v) for v in logits[row, j - 1]]
                top = max(x)
                lse = top + math.log(math.fsum(math.exp(v - top) for v in x))
                target = int(batch["tokens"][i, k, j])
                out[i, k] += x[target] - lse
                for v in range(len(x)):
                    p = math.exp(x[v] - lse)
                    grad[row, j - 1, v] += weights[i, k] * (float(v == target) - p)
    return out, grad


def test_sequence_logprobs_and_gradient_match_a_float64_loop():
    """Padding inside rows, prompts of different lengths, prompts with K < K_max (all-padding
    rows give 0): the values, and the gradient through the model (its VJP applied to the
    loop's gradient in the logits)."""
    _, params = random_params("lm", 3, scale=0.5)
    model = Transformer(MC)
    batch = make_batch(0, b=3, k_max=4)
    assert (batch["response_mask"] == 0).any() and len(set(batch["prompt_len"])) > 1
    b, k, t = batch["tokens"].shape
    flat = [batch[x].reshape(b * k, t) for x in ("tokens", "positions", "mask")]
    weights = np.random.default_rng(1).normal(size=(b, k))

    def logits_fn(p):
        return model.apply({"params": p}, *flat)

    @jax.jit
    def value_and_grads(p, x):
        seq = dpo.sequence_logprobs(model, p, x)
        logits, vjp = jax.vjp(logits_fn, p)
        grads = jax.grad(lambda q: jnp.sum(weights * dpo.sequence_logprobs(model, q, x)))(p)
        return seq, logits, vjp, grads

    seq, logits, vjp, grads = value_and_grads(params, batch)
    want, dlogits = naive_sequence_logprobs(np.asarray(logits, np.float64), batch, weights)
    assert np.all(want[batch["response_mask"] == 0] == 0) and np.all(want[:, :2] < 0)
    np.testing.assert_allclose(seq, want, rtol=2e-5, atol=1e-4)
    (want_grads,) = vjp(jnp.asarray(dlogits, jnp.float32))
    flat_grads = jax.tree_util.tree_flatten_with_path(grads)[0]
    for (path, g), w in zip(flat_grads, jax.tree.leaves(want_grads), strict=True):
        # float32 backprop: absolute error scales with the leaf's largest entry.
        atol = 2e-6 * max(float(jnp.abs(w).max()), 1.0)
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=atol, err_msg=jax.tree_util.keystr(path))
    assert sum(float(jnp.abs(g).sum()) for g in jax.tree.leaves(grads)) > 1e-2


def two_steps(mesh_shape, out_path: str) -> None:
    """Two DPO-ptx train steps (accum_steps 2) and one eval step on `mesh_shape`; metrics,
    eval sums and final params, policy and reference, to an npz."""
    import ml_collections

    mesh = sharding.make_mesh(dict(mesh_shape))
    rules = sharding.DEFAULT_RULES
    model = Transformer(MC)
    x = jax.ShapeDtypeStruct((1, 4), jnp.int32)
    abstract, param_sh = sharding.abstract_params_and_shardings(model, (x, x, x), mesh, rules)
    c = ml_collections.ConfigDict(dpo.default_config().to_dict())
    c.update(beta=0.5, ptx_coef=0.5, accum_steps=2)
    c.optimizer.update(lr=1e-2, warmup_steps=0)
    optimizer = train_lib.make_optimizer(c.optimizer, 2)
    schedule = train_lib.make_schedule(c.optimizer, 2)
    _, state_sh = train_lib.abstract_train_state(
        optimizer, abstract, param_sh, mesh, extras={"reference": abstract},
        extras_shardings={"reference": param_sh},
    )  # fmt: skip
    reference = jax.device_put(random_params("lm", 0)[1], param_sh)
    state = dpo.init_state(reference, optimizer, 0, state_sh)
    train_step, eval_step = dpo.make_steps(
        model, c, optimizer, schedule, mesh=mesh, rules=rules, ptx=True,
        state_shardings=state_sh, param_shardings=param_sh,
    )  # fmt: skip
    rng = np.random.default_rng(7)
    out = {}
    with sharding.mesh_context(mesh, rules):
        for it in range(2):
            batch = make_batch(10 + it, b=4, k_max=3)
            ptx = rng.integers(1, V, size=(4, T)).astype(np.int32)
            batch.update(ptx_tokens=ptx, ptx_positions=np.tile(np.arange(T, dtype=np.int32), (4, 1)),
                         ptx_mask=np.ones_like(ptx), ptx_targets=np.roll(ptx, -1, axis=1),
                         ptx_loss_mask=np.ones_like(ptx))  # fmt: skip
            state, metrics = train_step(state, sharding.shard_batch(batch, mesh), state.rng)
            out.update({f"m{it}/{k}": np.asarray(v) for k, v in metrics.items()})
        batch = sharding.shard_batch(make_batch(20, b=4, k_max=3), mesh)
        out["eval"] = np.asarray(eval_step(state.params, state.extras["reference"], batch))
    tree = {"policy": state.params, "reference": state.extras["reference"]}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        out[jax.tree_util.keystr(path)] = np.asarray(leaf)
    np.savez(out_path, **out)


def test_steps_same_numbers_on_one_device_and_8_device_mesh():
    from tests.conftest import run_in_subprocess

    with tempfile.TemporaryDirectory() as tmp:
        one, eight = os.path.join(tmp, "one.npz"), os.path.join(tmp, "eight.npz")
        two_steps({"data": -1}, one)
        run_in_subprocess(
            f"from tests.unit.test_dpo import two_steps\n"
            f"two_steps({MESH_822!r}, {json.dumps(eight)})\n",
            num_devices=8,
        )
        a, b = np.load(one), np.load(eight)
        assert sorted(a.files) == sorted(b.files)
        assert a["m0/accuracy"] == 0.5 and a["m1/accuracy"] != 0.5  # policy = reference at 0
        assert a["eval"][1] == 4  # prompts with a pair: all
        moved = [k for k in a.files if k.startswith("['policy']") and
                 not np.array_equal(a[k], a[k.replace("policy", "reference", 1)])]  # fmt: skip
        assert moved, "the steps did not move the policy"
        for key in a.files:
            if key.endswith("['k']['bias']"):  # rounding noise scaled by Adam (test_rl_ppo)
                continue
            np.testing.assert_allclose(a[key], b[key], rtol=1e-4, atol=1e-6, err_msg=key)
