"""instructrl.rl.objectives against naive references (Python loops in float64) on random inputs
with padding, ties, degenerate groups; gradients against finite differences or a jnp loop."""

from __future__ import annotations

import math
import statistics

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from instructrl import losses
from instructrl.rl import objectives as obj
from tests.unit.test_losses import random_ties

RTOL = 1e-5


def preference_batch(rng, b=7, k_max=6):
    """Sequence log-probs of policy and reference [b, k_max] (NaN on padded responses) and pair
    masks [b, k_max, k_max]: row 1 has one response (no pair), row 2 is all tied, row 3 has
    K = k_max, the others random K < k_max and random ties, and at least one pair."""
    ref = rng.normal(-20.0, 5.0, size=(b, k_max))
    logp = ref + rng.normal(0.0, 2.0, size=(b, k_max))
    masks = []
    for row in range(b):
        k = {1: 1, 3: k_max}.get(row, int(rng.integers(2, k_max)))
        ties = [list(range(k))] if row == 2 else random_ties(rng, k)
        mask = losses.pairs_from_ranking(rng.permutation(k), k, k_max, ties=ties)
        if row > 2 and not mask.any():  # only rows 1 and 2 are without pairs
            mask = losses.pairs_from_ranking(rng.permutation(k), k, k_max)
        masks.append(mask)
        logp[row, k:] = np.nan
        ref[row, k:] = np.nan
    return logp, ref, np.stack(masks)


def naive_preference_loss(logp, ref, pair_mask, beta, kind, per_prompt=True):
    """Mean over prompts with a pair of the prompt's mean pair loss; per_prompt=False is the
    plausible wrong variant that pools all pairs of the batch."""
    prompt_means, all_terms = [], []
    for lp, rf, m in zip(logp, ref, pair_mask, strict=True):
        terms = []
        for w, lo in zip(*np.nonzero(m), strict=True):
            h = (lp[w] - rf[w]) - (lp[lo] - rf[lo])
            if kind == "dpo":
                terms.append(math.log1p(math.exp(-beta * h)))  # -log sigmoid(beta h)
            elif kind == "ipo":
                terms.append((h - 1 / (2 * beta)) ** 2)
            else:  # "ipo_wrong_sign": the target on the wrong side
                terms.append((h + 1 / (2 * beta)) ** 2)
        if terms:
            prompt_means.append(sum(terms) / len(terms))
            all_terms += terms
    if not prompt_means:
        return 0.0
    return sum(prompt_means) / len(prompt_means) if per_prompt else sum(all_terms) / len(all_terms)


LOSS_FNS = {"dpo": obj.dpo_loss, "ipo": obj.ipo_loss}
SUM_FNS = {"dpo": obj.dpo_loss_sum, "ipo": obj.ipo_loss_sum}


@pytest.mark.parametrize("kind", ["dpo", "ipo"])
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_preference_loss_vs_naive_loop_and_gradient(kind, beta):
    rng = np.random.default_rng(0)
    fn = LOSS_FNS[kind]
    with jax.enable_x64(True):
        logp, ref, pair_mask = preference_batch(rng)
        want = naive_preference_loss(logp, ref, pair_mask, beta, kind)
        grad_fn = jax.value_and_grad(fn, argnums=(0, 1))
        loss, (g_logp, g_ref) = grad_fn(jnp.asarray(logp), jnp.asarray(ref), pair_mask, beta)
        np.testing.assert_allclose(loss, want, rtol=1e-12)
        assert np.all(np.isfinite(g_logp)) and np.all(np.asarray(g_logp)[np.isnan(logp)] == 0)
        assert np.all(np.asarray(g_ref) == 0)  # the reference is frozen
        # Central finite differences of the float64 loop, on every valid entry.
        eps = 1e-6
        for b, k in zip(*np.nonzero(~np.isnan(logp)), strict=True):
            up, down = logp.copy(), logp.copy()
            up[b, k] += eps
            down[b, k] -= eps
            fd = (
                naive_preference_loss(up, ref, pair_mask, beta, kind)
                - naive_preference_loss(down, ref, pair_mask, beta, kind)
            ) / (2 * eps)
            np.testing.assert_allclose(g_logp[b, k], fd, atol=1e-7, err_msg=f"{b},{k}")
    # float32 with padding agrees with the reference; the wrong variants do not.
    loss32 = fn(logp.astype(np.float32), ref.astype(np.float32), pair_mask, beta)
    np.testing.assert_allclose(loss32, want, rtol=RTOL)
    pooled = naive_preference_loss(logp, ref, pair_mask, beta, kind, per_prompt=False)
    assert abs(pooled - want) > 1e-3 * abs(want)
    if kind == "ipo":
        wrong = naive_preference_loss(logp, ref, pair_mask, beta, "ipo_wrong_sign")
        assert abs(wrong - want) > 1e-3 * abs(want)


def test_preference_single_pair_closed_forms():
    """K = 2, response 1 preferred: DPO = softplus(-beta h); IPO is 0 with zero gradient at its
    target h = 1/(2 beta) and (1/(2 beta))^2 at h = 0 (policy == reference)."""
    beta = 0.25
    mask = losses.pairs_from_ranking([1, 0], 2, 2)[None]
    ref = jnp.asarray([[-3.0, -5.0]])
    logp = ref + jnp.asarray([[0.4, 1.1]])  # h = 1.1 - 0.4 = 0.7
    np.testing.assert_allclose(obj.dpo_loss(logp, ref, mask, beta), math.log1p(math.exp(-0.175)))
    np.testing.assert_allclose(obj.ipo_loss(ref, ref, mask, beta), 4.0, rtol=RTOL)
    at_target = ref + jnp.asarray([[0.0, 2.0]])
    loss, grad = jax.value_and_grad(obj.ipo_loss)(at_target, ref, mask, beta)
    assert float(loss) == 0.0 and np.all(np.asarray(grad) == 0)


@pytest.mark.parametrize("kind", ["dpo", "ipo"])
def test_preference_loss_sum_accumulates_and_empty_batch(kind):
    rng = np.random.default_rng(1)
    logp, ref, pair_mask = preference_batch(rng, b=6)
    total, prompts = SUM_FNS[kind](logp, ref, pair_mask, 0.3)
    has_pairs = pair_mask.sum((1, 2)) > 0
    assert not has_pairs[1] and not has_pairs[2] and has_pairs.sum() >= 3  # K = 1, all tied
    assert float(prompts) == has_pairs.sum()
    t1, p1 = SUM_FNS[kind](logp[:3], ref[:3], pair_mask[:3], 0.3)
    t2, p2 = SUM_FNS[kind](logp[3:], ref[3:], pair_mask[3:], 0.3)
    np.testing.assert_allclose((t1 + t2) / (p1 + p2), total / prompts, rtol=RTOL)
    empty = np.zeros_like(pair_mask)
    loss, grad = jax.value_and_grad(LOSS_FNS[kind])(jnp.asarray(logp), ref, empty, 0.3)
    assert float(loss) == 0.0 and np.all(np.asarray(grad) == 0)
    with pytest.raises(ValueError, match="beta"):
        SUM_FNS[kind](logp, ref, pair_mask, 0.0)


def test_implicit_reward_stats_vs_loop_with_ties():
    rng = np.random.default_rng(2)
    logp, ref, pair_mask = preference_batch(rng)
    logp = np.round(logp)  # exact ties between implicit rewards
    ref = np.round(ref)
    beta = 0.5
    correct = margin = count = 0.0
    for lp, rf, m in zip(logp, ref, pair_mask, strict=True):
        for w, lo in zip(*np.nonzero(m), strict=True):
            rw, rl = beta * (lp[w] - rf[w]), beta * (lp[lo] - rf[lo])
            count += 1
            correct += 1.0 if rw > rl else 0.5 if rw == rl else 0.0
            margin += rw - rl
    c, s, n = obj.implicit_reward_stats(logp, ref, pair_mask, beta)
    assert float(n) == count and 0 < correct < count
    np.testing.assert_allclose(c, correct, rtol=RTOL)
    np.testing.assert_allclose(s, margin, rtol=RTOL)
    c0, s0, n0 = obj.implicit_reward_stats(ref, ref, pair_mask, beta)  # policy == reference
    assert float(c0) == float(n0) / 2 and float(s0) == 0.0


# ----------------------------------------------------------------------------- group advantages


def naive_group_advantages(rewards, mask, mode, eps=1e-6, ddof=1):
    """Per group over its valid samples: mode's formula in float64 Python, 0 for invalid
    samples, groups of one and equal rewards. ddof=0 is the plausible wrong variant."""
    out = np.zeros(rewards.shape)
    for b in range(rewards.shape[0]):
        idx = [g for g in range(rewards.shape[1]) if mask[b, g]]
        vals = [float(rewards[b, g]) for g in idx]
        if len(vals) < 2 or len(set(vals)) == 1:
            continue
        mean = statistics.fmean(vals)
        std = statistics.stdev(vals) if ddof == 1 else statistics.pstdev(vals)
        for g, r in zip(idx, vals, strict=True):
            if mode == "grpo":
                out[b, g] = (r - mean) / (std + eps)
            elif mode == "dr_grpo":
                out[b, g] = r - mean
            else:
                others = [v for h, v in zip(idx, vals, strict=True) if h != g]
                out[b, g] = r - sum(others) / len(others)
    return out


def advantage_batch(rng, b=8, g=8):
    """Rewards [b, g] with NaN on invalid samples and a mask [b, g]: a padding group (row 0), a
    group of one valid sample (1), equal rewards 0.7 (2: in float32 their mean is not 0.7) and
    0/1 rewards all 1 (3), a binary group (4), full and partial random groups."""
    rewards = rng.normal(size=(b, g))
    mask = (rng.random((b, g)) < 0.7).astype(np.int32)
    mask[0] = 0
    mask[1] = 0
    mask[1, 2] = 1
    mask[2] = mask[3] = mask[4] = mask[5] = 1
    rewards[2] = 0.7
    rewards[3] = 1.0
    rewards[4] = [1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 1.0, 1.0]
    rewards[mask == 0] = np.nan
    return rewards, mask


@pytest.mark.parametrize("mode", ["grpo", "dr_grpo", "rloo"])
def test_group_advantages_vs_loop(mode):
    rng = np.random.default_rng(3)
    rewards, mask = advantage_batch(rng)
    want = naive_group_advantages(rewards, mask, mode)
    with jax.enable_x64(True):
        got = obj.group_advantages(rewards, mask, mode)
        assert got.dtype == jnp.float64
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    got32 = np.asarray(jax.jit(obj.group_advantages, static_argnums=2)(rewards, mask, mode))
    assert np.all(np.isfinite(got32))
    np.testing.assert_allclose(got32, want, rtol=1e-5, atol=1e-5)
    assert np.all(got32[:4] == 0)  # padding, a group of one, equal rewards: exactly 0
    assert np.all(got32[mask == 0] == 0)
    # The flat [N] layout of a rollout (samples of a prompt consecutive) gives the same.
    flat = obj.group_advantages(rewards.reshape(-1), mask.reshape(-1), mode, group_size=8)
    np.testing.assert_allclose(flat, got32.reshape(-1), rtol=1e-6)
    dense = np.nan_to_num(rewards)  # mask None: every sample counts
    want_dense = naive_group_advantages(dense, np.ones_like(mask), mode)
    np.testing.assert_allclose(
        obj.group_advantages(dense, mode=mode), want_dense, rtol=1e-5, atol=1e-5
    )


def test_group_advantages_variants_differ_and_moments():
    """Each mode is what it says: grpo's group std is the sample one (the population one would
    differ), dr_grpo is the mean-centred reward, rloo is n/(n-1) times it; a full grpo group has
    mean 0 and sample std ~1."""
    rng = np.random.default_rng(4)
    rewards, mask = advantage_batch(rng)
    grpo = np.asarray(obj.group_advantages(rewards, mask, "grpo"))
    pop = naive_group_advantages(rewards, mask, "grpo", ddof=0)
    assert np.max(np.abs(grpo - pop)) > 1e-2
    dr = np.asarray(obj.group_advantages(rewards, mask, "dr_grpo"))
    rloo = np.asarray(obj.group_advantages(rewards, mask, "rloo"))
    n = mask.sum(1, keepdims=True)
    np.testing.assert_allclose(rloo, np.where(n > 1, dr * n / np.maximum(n - 1, 1), 0), rtol=1e-5)
    assert np.max(np.abs(rloo - dr)) > 1e-2
    row = grpo[5]  # a full random group
    np.testing.assert_allclose(row.mean(), 0.0, atol=1e-6)
    np.testing.assert_allclose(row.std(ddof=1), 1.0, rtol=1e-4)


def test_group_advantages_equal_rewards_are_exactly_zero():
    """Equal rewards whose float32 mean is not exactly the reward: without the guard,
    (r - mean) / (std + eps) is rounding noise / eps, here about 0.06 per sample."""
    r = jnp.full((2, 8), 0.7, jnp.float32)
    centred = r - jnp.sum(r, axis=1, keepdims=True) / 8
    unguarded = centred / (jnp.std(r, axis=1, keepdims=True, ddof=1) + 1e-6)
    assert float(jnp.max(jnp.abs(unguarded))) > 1e-2
    for mode in ("grpo", "dr_grpo", "rloo"):
        assert np.all(np.asarray(obj.group_advantages(r, None, mode)) == 0)


def test_group_advantages_nan_reward_is_loud_and_bad_input():
    r = np.array([[1.0, np.nan, 0.0], [1.0, 0.0, 2.0]])
    adv = np.asarray(obj.group_advantages(r, None, "grpo"))
    assert np.all(np.isnan(adv[0])) and np.all(np.isfinite(adv[1]))
    with pytest.raises(ValueError, match="G=1"):
        obj.group_advantages(np.ones((4, 1)), None, "rloo")
    with pytest.raises(ValueError, match="mode"):
        obj.group_advantages(np.ones((4, 2)), None, "ppo")
    with pytest.raises(ValueError, match="group_size"):
        obj.group_advantages(np.ones(6), None, "grpo")
    with pytest.raises(ValueError, match="group_size"):
        obj.group_advantages(np.ones(6), None, "grpo", group_size=4)


# ----------------------------------------------------------------------------- token losses


def ragged_mask(rng, b, t):
    """[b, t] prefix masks with an empty row (padding) and a full row, other lengths distinct."""
    lengths = [*rng.permutation(np.arange(1, t))[: b - 2], 0, t]
    return (np.arange(t)[None, :] < np.asarray(lengths)[:, None]).astype(np.int32)


def token_inputs(rng, b=6, t=9):
    mask = ragged_mask(rng, b, t)
    old = rng.normal(-2.0, 1.0, size=(b, t))
    logp = old + rng.normal(0.0, 0.3, size=(b, t))  # ratios inside and outside the clip range
    ref = old + rng.normal(0.0, 0.5, size=(b, t))
    adv = rng.normal(size=(b,))
    for x in (logp, old, ref):
        x[mask == 0] = np.nan  # padding must never leak
    return logp, old, ref, adv, mask


def loop_token_loss(logp, old, ref, adv, mask, clip, clip_high, kl_coef, aggregation, max_len):
    """The loss as a Python loop over sequences and tokens. Plain arithmetic, so it runs on
    floats (the float64 reference) and on jnp scalars (its jax.grad is the reference grad)."""
    if isinstance(logp, jax.Array):
        exp, clip_to, larger = jnp.exp, jnp.clip, jnp.maximum
    else:
        exp, larger = math.exp, max
        clip_to = lambda x, lo, hi: min(max(x, lo), hi)  # noqa: E731
    total, seqs, tokens = 0.0, 0, 0
    for b in range(mask.shape[0]):
        n = int(mask[b].sum())
        if n == 0:
            continue
        seq = 0.0
        for t in range(n):
            a = adv[b] if np.ndim(adv) == 1 else adv[b, t]
            ratio = exp(logp[b, t] - old[b, t])
            pg = larger(-a * ratio, -a * clip_to(ratio, 1 - clip, 1 + clip_high))
            d = ref[b, t] - logp[b, t]
            seq = seq + pg + kl_coef * (exp(d) - d - 1)
        seqs += 1
        tokens += n
        if aggregation == "token_mean_per_seq":
            total = total + seq / n
        elif aggregation == "token_mean":
            total = total + seq
        else:
            total = total + seq / max_len
    return total / (tokens if aggregation == "token_mean" else seqs)


CASES = [  # aggregation, advantages per token, kl_coef, clip_high, max_len
    ("token_mean_per_seq", False, 0.04, None, None),
    ("token_mean", False, 0.0, 0.28, None),
    ("constant", False, 0.1, None, None),
    ("constant", True, 0.1, 0.28, 16),
    ("token_mean_per_seq", True, 0.0, None, None),
]


@pytest.mark.parametrize("aggregation,per_token,kl_coef,clip_high,max_len", CASES)
def test_critic_free_policy_loss_vs_loop_and_gradient(
    aggregation, per_token, kl_coef, clip_high, max_len
):
    rng = np.random.default_rng(5)
    logp, old, ref, adv, mask = token_inputs(rng)
    if per_token:
        adv = rng.normal(size=mask.shape)
    clip, high = 0.2, (0.2 if clip_high is None else clip_high)
    length = mask.shape[1] if max_len is None else max_len
    args = (clip, high, kl_coef, aggregation, length)
    want = loop_token_loss(logp, old, ref, adv, mask, *args)

    def ours(lp):
        return obj.critic_free_policy_loss(
            lp, old, adv, mask, clip, ref_logp=ref, kl_coef=kl_coef,
            aggregation=aggregation, max_len=max_len, clip_high=clip_high,
        )  # fmt: skip

    with jax.enable_x64(True):
        (loss, stats), grad = jax.value_and_grad(ours, has_aux=True)(jnp.asarray(logp))
        np.testing.assert_allclose(loss, want, rtol=1e-12)
        np.testing.assert_allclose(stats["pg_loss"] + kl_coef * stats["kl_loss"], loss, rtol=1e-12)
        clean = jnp.asarray(np.nan_to_num(logp))
        want_grad = jax.grad(lambda lp: loop_token_loss(lp, old, ref, adv, mask, *args))(clean)
        assert np.all(np.isfinite(grad)) and np.all(np.asarray(grad)[mask == 0] == 0)
        np.testing.assert_allclose(grad, want_grad, atol=1e-12)
        sel = mask > 0
        ratio = np.exp(logp - old)[sel]
        assert 0 < float(stats["pg_clip_frac"]) < 1  # both branches are exercised
        np.testing.assert_allclose(stats["ratio_mean"], ratio.mean(), rtol=1e-12)
        d = (ref - logp)[sel]
        np.testing.assert_allclose(stats["kl_ref"], np.mean(np.exp(d) - d - 1), rtol=1e-12)
    loss32, _ = jax.jit(ours)(jnp.asarray(logp, jnp.float32))
    np.testing.assert_allclose(loss32, want, rtol=1e-5, atol=1e-6)


def test_critic_free_aggregations_differ_only_with_unequal_lengths():
    rng = np.random.default_rng(6)
    logp, old, ref, adv, mask = token_inputs(rng)

    def loss(m, aggregation):
        return float(obj.critic_free_policy_loss(
            logp, old, adv, m, 0.2, ref_logp=ref, kl_coef=0.1, aggregation=aggregation
        )[0])  # fmt: skip

    values = [loss(mask, a) for a in obj.AGGREGATIONS]
    assert min(abs(a - b) for i, a in enumerate(values) for b in values[i + 1 :]) > 1e-4
    full = np.ones_like(mask)  # every sequence T tokens long: the three weights coincide
    logp, old, ref = (np.nan_to_num(x, nan=-1.0) for x in (logp, old, ref))
    same = [loss(full, a) for a in obj.AGGREGATIONS]
    np.testing.assert_allclose(same, same[0], rtol=1e-5)


def test_critic_free_token_mean_is_ppo_policy_loss():
    """No KL, symmetric clip, token mean, per-token advantages: exactly ppo_policy_loss."""
    rng = np.random.default_rng(7)
    logp, old, _, _, mask = token_inputs(rng)
    adv = rng.normal(size=mask.shape)
    with jax.enable_x64(True):
        ours, s1 = obj.critic_free_policy_loss(logp, old, adv, mask, 0.2, aggregation="token_mean")
        ppo, s2 = losses.ppo_policy_loss(logp, old, adv, mask, 0.2)
        np.testing.assert_allclose(ours, ppo, rtol=1e-14)
        for key in s2:
            np.testing.assert_allclose(s1[key], s2[key], rtol=1e-14, err_msg=key)


@pytest.mark.parametrize("aggregation", ["token_mean_per_seq", "token_mean", "constant"])
def test_critic_free_normalizer_accumulates_microbatches(aggregation):
    rng = np.random.default_rng(8)
    logp, old, ref, adv, mask = token_inputs(rng)
    kw = dict(ref_logp=ref, kl_coef=0.05, aggregation=aggregation)
    full, _ = obj.critic_free_policy_loss(logp, old, adv, mask, 0.2, **kw)
    count = mask.sum() if aggregation == "token_mean" else (mask.sum(1) > 0).sum()
    parts = [
        obj.critic_free_policy_loss(
            logp[s], old[s], adv[s], mask[s], 0.2, normalizer=count, **{**kw, "ref_logp": ref[s]}
        )[0]
        for s in (slice(0, 3), slice(3, None))
    ]
    np.testing.assert_allclose(sum(parts), full, rtol=1e-5)


def test_k3_kl_vs_numpy_and_gradient():
    rng = np.random.default_rng(9)
    logp, _, ref, _, mask = token_inputs(rng)
    sel = mask > 0
    with jax.enable_x64(True):
        kl, (g, g_ref) = (
            obj.k3_kl(logp, ref, mask),
            jax.grad(lambda a, b: jnp.sum(obj.k3_kl(a, b, mask)), argnums=(0, 1))(
                jnp.asarray(logp), jnp.asarray(ref)
            ),
        )
        d = ref - logp
        np.testing.assert_allclose(np.asarray(kl)[sel], (np.exp(d) - d - 1)[sel], rtol=1e-12)
        assert np.all(np.asarray(kl)[~sel] == 0) and np.all(np.asarray(kl) >= 0)
        np.testing.assert_allclose(np.asarray(g)[sel], (1 - np.exp(d))[sel], rtol=1e-12)
        assert np.all(np.asarray(g)[~sel] == 0) and np.all(np.asarray(g_ref) == 0)
    assert np.all(np.asarray(obj.k3_kl(np.nan_to_num(ref), np.nan_to_num(ref), mask)) == 0)


def test_critic_free_bad_input():
    rng = np.random.default_rng(10)
    logp, old, _, adv, mask = token_inputs(rng)
    with pytest.raises(ValueError, match="ref_logp"):
        obj.critic_free_policy_loss(logp, old, adv, mask, 0.2, kl_coef=0.1)
    with pytest.raises(ValueError, match="aggregation"):
        obj.critic_free_policy_loss(logp, old, adv, mask, 0.2, aggregation="seq_sum")


def test_objectives_jit_and_keep_shapes():
    b, k, t = 4, 5, 7
    f32 = jax.ShapeDtypeStruct
    sk, pm = f32((b, k), jnp.float32), f32((b, k, k), jnp.float32)
    for fn in (obj.dpo_loss_sum, obj.ipo_loss_sum):
        total, prompts = jax.eval_shape(lambda x, y, m, f=fn: f(x, y, m, 0.1), sk, sk, pm)
        assert total.shape == prompts.shape == ()
    stats = jax.eval_shape(lambda x, y, m: obj.implicit_reward_stats(x, y, m, 0.1), sk, sk, pm)
    assert all(s.shape == () for s in stats)
    assert jax.eval_shape(lambda r: obj.group_advantages(r, None, "rloo"), sk).shape == (b, k)
    flat = f32((b * k,), jnp.bfloat16)
    out = jax.eval_shape(lambda r: obj.group_advantages(r, None, group_size=k), flat)
    assert out.shape == (b * k,) and out.dtype == jnp.float32
    bt = f32((b, t), jnp.bfloat16)
    loss, stats = jax.eval_shape(
        lambda x, y, r, m: obj.critic_free_policy_loss(x, y, r, m, 0.2, ref_logp=x, kl_coef=0.1),
        bt, bt, f32((b,), jnp.float32), bt,
    )  # fmt: skip
    assert loss.shape == () and loss.dtype == jnp.float32
    assert jax.eval_shape(obj.k3_kl, bt, bt, bt).shape == (b, t)
