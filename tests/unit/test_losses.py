"""instructrl.losses against naive references (python loops, numpy float64) on random inputs."""

from __future__ import annotations

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from instructrl import losses

RTOL = 1e-5


def ragged_mask(rng: np.random.Generator, b: int, t: int, lengths=None) -> np.ndarray:
    """[b, t] prefix masks; includes an empty row and a full row."""
    if lengths is None:
        lengths = rng.integers(0, t + 1, size=b)
        lengths[0], lengths[-1] = 0, t
    return (np.arange(t)[None, :] < np.asarray(lengths)[:, None]).astype(np.int32)


def np_log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def np_masked_mean(x, m):
    m = m > 0
    return x[m].mean() if m.any() else 0.0


# ----------------------------------------------------------------------------- reductions


def test_masked_reductions_ignore_invalid_and_empty():
    x = jnp.array([[1.0, 2.0, jnp.nan], [jnp.inf, 3.0, 5.0]])
    m = jnp.array([[1, 1, 0], [0, 1, 1]])
    assert float(losses.masked_sum(x, m)) == 11.0
    assert float(losses.masked_mean(x, m)) == 11.0 / 4
    np.testing.assert_allclose(losses.masked_mean(x, m, axis=-1), [1.5, 4.0])
    empty = jnp.zeros_like(m)
    assert float(losses.masked_mean(x, empty)) == 0.0
    g = jax.grad(lambda y: losses.masked_mean(y, empty))(jnp.ones((2, 3)))
    assert np.all(np.isfinite(g))


def test_whiten_mean_zero_std_one_over_mask():
    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 5.0, size=(6, 11)).astype(np.float32)
    m = ragged_mask(rng, 6, 11)
    w = np.asarray(losses.whiten(x, m))
    sel = m > 0
    np.testing.assert_allclose(w[sel].mean(), 0.0, atol=1e-5)
    np.testing.assert_allclose(w[sel].std(), 1.0, rtol=1e-5)
    assert np.all(w[~sel] == 0)
    ref = (x[sel] - x[sel].astype(np.float64).mean()) / np.sqrt(
        x[sel].astype(np.float64).var() + 1e-8
    )
    np.testing.assert_allclose(w[sel], ref, rtol=1e-4, atol=1e-5)
    w2 = np.asarray(losses.whiten(x, m, shift_mean=False))
    np.testing.assert_allclose(w2[sel].mean(), x[sel].mean(), rtol=1e-5)
    np.testing.assert_allclose(w2[sel].std(), 1.0, rtol=1e-5)
    # Changing masked-out entries must not change anything.
    x_bad = np.where(sel, x, 1e6).astype(np.float32)
    np.testing.assert_allclose(losses.whiten(x_bad, m), w, rtol=1e-6)


def test_explained_variance_vs_numpy():
    rng = np.random.default_rng(1)
    y = rng.normal(size=(4, 9))
    p = y + 0.3 * rng.normal(size=(4, 9))
    m = ragged_mask(rng, 4, 9)
    sel = m > 0
    ref = 1 - np.var(y[sel] - p[sel]) / np.var(y[sel])
    np.testing.assert_allclose(losses.explained_variance(p, y, m), ref, rtol=1e-5)
    assert float(losses.explained_variance(p, np.ones_like(y), m)) == 0.0  # Var[target] == 0


# ----------------------------------------------------------------------------- language modelling


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_lm_loss_vs_numpy_and_ignores_masked(dtype):
    rng = np.random.default_rng(2)
    b, t, v = 3, 7, 13
    logits = jnp.asarray(rng.normal(size=(b, t, v)) * 3, dtype)
    targets = rng.integers(0, v, size=(b, t))
    mask = ragged_mask(rng, b, t)
    lp = np_log_softmax(np.asarray(logits.astype(jnp.float32)))
    nll = -np.take_along_axis(lp, targets[..., None], -1)[..., 0]
    ref = nll[mask > 0].mean()
    loss = losses.lm_loss(logits, targets, mask)
    assert loss.dtype == jnp.float32
    np.testing.assert_allclose(loss, ref, rtol=RTOL)
    np.testing.assert_allclose(losses.sft_loss(logits, targets, mask), ref, rtol=RTOL)
    # Garbage logits and targets at masked positions change nothing.
    sel = (mask > 0)[..., None]
    logits2 = jnp.where(sel, logits, jnp.asarray(1e4, dtype))
    targets2 = np.where(mask > 0, targets, 0)
    np.testing.assert_allclose(losses.lm_loss(logits2, targets2, mask), ref, rtol=RTOL)
    g = jax.grad(lambda x: losses.lm_loss(x, targets, mask))(logits.astype(jnp.float32))
    assert np.all(np.asarray(g)[~(mask > 0)] == 0)


def test_lm_loss_sum_accumulates_by_token_count():
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(4, 6, 11)).astype(np.float32)
    targets = rng.integers(0, 11, size=(4, 6))
    mask = ragged_mask(rng, 4, 6, lengths=[1, 6, 2, 5])
    s1, c1 = losses.lm_loss_sum(logits[:2], targets[:2], mask[:2])
    s2, c2 = losses.lm_loss_sum(logits[2:], targets[2:], mask[2:])
    assert float(c1) == 7 and float(c2) == 7
    full = losses.lm_loss(logits, targets, mask)
    np.testing.assert_allclose((s1 + s2) / (c1 + c2), full, rtol=RTOL)
    assert float(losses.lm_loss(logits, targets, np.zeros_like(mask))) == 0.0


def test_token_logprobs_temperature_and_entropy():
    rng = np.random.default_rng(4)
    logits = rng.normal(size=(2, 5, 9)).astype(np.float32)
    targets = rng.integers(0, 9, size=(2, 5))
    lp = np_log_softmax(logits / 0.7)
    ref = np.take_along_axis(lp, targets[..., None], -1)[..., 0]
    np.testing.assert_allclose(losses.token_logprobs(logits, targets, 0.7), ref, rtol=RTOL)
    mask = ragged_mask(rng, 2, 5, lengths=[3, 5])
    lp1 = np_log_softmax(logits)
    ent = -(np.exp(lp1) * lp1).sum(-1)
    np.testing.assert_allclose(
        losses.entropy_from_logits(logits, mask), ent[mask > 0].mean(), rtol=RTOL
    )


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_token_logprobs_gradient_vs_numpy(dtype):
    """token_logprobs' hand-written VJP: d/dlogits and d/dtemperature of sum(w * logp) equal
    the float64 closed form w * (onehot - softmax) / T, with a -inf logit, masked rows and
    repeated targets; the cotangent keeps the logits' dtype."""
    rng = np.random.default_rng(5)
    b, t, v, temp = 3, 4, 10, 0.7
    logits = rng.normal(size=(b, t, v)) * 2
    logits[0, 1, 3] = -np.inf  # a banned token, never a target
    targets = rng.integers(0, v, size=(b, t))
    targets[targets == 3] = 4
    w = rng.normal(size=(b, t)) * ragged_mask(rng, b, t)
    x = jnp.asarray(logits, dtype)
    xf = np.asarray(x.astype(jnp.float32), np.float64)

    def f(x, temp):
        return jnp.sum(jnp.asarray(w, jnp.float32) * losses.token_logprobs(x, targets, temp))

    gx, gt = jax.grad(f, argnums=(0, 1))(x, jnp.float32(temp))
    p = np.exp(np_log_softmax(xf / temp))
    onehot = np.eye(v)[targets]
    ref_x = w[..., None] * (onehot - p) / temp
    z = np.where(np.isinf(xf), 0.0, xf / temp)  # p = 0 there: no contribution
    ref_t = -np.sum(w[..., None] * (onehot - p) * z) / temp
    assert gx.dtype == dtype and np.all(np.isfinite(np.asarray(gx, np.float32)))
    tol = 1e-5 if dtype == jnp.float32 else 1e-2
    np.testing.assert_allclose(np.asarray(gx, np.float64), ref_x, atol=tol)
    np.testing.assert_allclose(float(gt), ref_t, rtol=1e-4)
    # Rows with weight 0 get no gradient at all.
    assert np.all(np.asarray(gx)[w == 0] == 0)


# ----------------------------------------------------------------------------- reward model


def random_ties(rng, k):
    """Disjoint tie groups of size >= 2 over range(k) (possibly none)."""
    perm = list(rng.permutation(k))
    groups = []
    while len(perm) >= 2 and rng.random() < 0.5:
        size = int(rng.integers(2, min(3, len(perm)) + 1))
        groups.append([int(i) for i in perm[:size]])
        perm = perm[size:]
    return groups


def test_pairs_from_ranking_all_pairs_minus_ties():
    rng = np.random.default_rng(5)
    k_max = 9
    for _ in range(50):
        k = int(rng.integers(2, k_max + 1))
        ranking = [int(i) for i in rng.permutation(k)]
        ties = random_ties(rng, k)
        mask = losses.pairs_from_ranking(ranking, k, k_max, ties=ties)
        assert mask.shape == (k_max, k_max) and mask.dtype == np.float32
        tied = {frozenset(p) for g in ties for p in itertools.combinations(g, 2)}
        expected = {
            (ranking[a], ranking[c])
            for a in range(k)
            for c in range(a + 1, k)
            if frozenset((ranking[a], ranking[c])) not in tied
        }
        got = {(int(i), int(j)) for i, j in zip(*np.nonzero(mask), strict=True)}
        assert got == expected
        assert mask.sum() == math.comb(k, 2) - sum(math.comb(len(g), 2) for g in ties)
        assert set(np.unique(mask)) <= {0.0, 1.0}
        no_ties = losses.pairs_from_ranking(ranking, k, k_max)
        assert no_ties.sum() == math.comb(k, 2)
        assert np.all(no_ties + no_ties.T <= 1)  # antisymmetric: never both i>j and j>i


@pytest.mark.parametrize(
    "args",
    [
        ([0, 1, 1], 3, 4, None),  # not a permutation
        ([0, 1, 2], 3, 2, None),  # more responses than k_max
        ([0, 2], 2, 4, None),  # index out of range
        ([0, 1, 2], 3, 4, [[0, 1], [1, 2]]),  # overlapping tie groups
        ([0, 1, 2], 3, 4, [[0, 5]]),  # tie index out of range
    ],
)
def test_pairs_from_ranking_rejects_bad_input(args):
    with pytest.raises(ValueError, match="pairs_from_ranking"):
        losses.pairs_from_ranking(*args)


def make_rm_batch(rng, b=7, k_max=9):
    """Rewards [b, k_max] (NaN on padded responses) and pair masks, incl. a row without pairs."""
    rewards = rng.normal(scale=2.0, size=(b, k_max))
    masks = []
    for row in range(b):
        k = int(rng.integers(2, k_max + 1))
        if row == 1:
            k = 1  # no pairs at all
        ties = [list(range(k))] if row == 2 else random_ties(rng, k)  # row 2: all tied
        masks.append(losses.pairs_from_ranking(rng.permutation(k), k, k_max, ties=ties))
        rewards[row, k:] = np.nan
    return rewards, np.stack(masks)


def naive_reward_loss(rewards, pair_mask):
    per_prompt = []
    for r, m in zip(rewards, pair_mask, strict=True):
        pairs = [(w, lo) for w in range(len(r)) for lo in range(len(r)) if m[w, lo]]
        if pairs:
            terms = [math.log(1 / (1 + math.exp(-(r[w] - r[lo])))) for w, lo in pairs]
            per_prompt.append(-sum(terms) / len(pairs))
    return sum(per_prompt) / len(per_prompt)


def naive_reward_grad(rewards, pair_mask):
    grad = np.zeros_like(rewards)
    n_prompts = sum(1 for m in pair_mask if m.sum() > 0)
    for b, (r, m) in enumerate(zip(rewards, pair_mask, strict=True)):
        c = float(m.sum())
        for w, lo in zip(*np.nonzero(m), strict=True):
            # d/dr_w -log sigmoid(r_w - r_l) = -sigmoid(r_l - r_w)
            s = 1 / (1 + math.exp(r[w] - r[lo]))
            grad[b, w] -= s / c / n_prompts
            grad[b, lo] += s / c / n_prompts
    return grad


def test_reward_loss_vs_naive_loop_and_gradient():
    rng = np.random.default_rng(6)
    with jax.enable_x64(True):
        for _ in range(3):
            rewards, pair_mask = make_rm_batch(rng)
            r = jnp.asarray(rewards, jnp.float64)
            loss, grad = jax.value_and_grad(losses.reward_loss)(r, pair_mask)
            np.testing.assert_allclose(loss, naive_reward_loss(rewards, pair_mask), rtol=1e-12)
            assert np.all(np.isfinite(grad))
            assert np.all(np.asarray(grad)[np.isnan(rewards)] == 0)
            np.testing.assert_allclose(grad, naive_reward_grad(rewards, pair_mask), atol=1e-12)
            # Central finite differences on the valid entries.
            clean = np.nan_to_num(rewards)
            eps = 1e-6
            for b, k in zip(*np.nonzero(~np.isnan(rewards)), strict=True):
                up, down = clean.copy(), clean.copy()
                up[b, k] += eps
                down[b, k] -= eps
                fd = (losses.reward_loss(up, pair_mask) - losses.reward_loss(down, pair_mask)) / (
                    2 * eps
                )
                np.testing.assert_allclose(grad[b, k], fd, atol=1e-8)
    # float32 path agrees with the float64 reference.
    np.testing.assert_allclose(
        losses.reward_loss(jnp.asarray(rewards, jnp.float32), pair_mask),
        naive_reward_loss(rewards, pair_mask),
        rtol=RTOL,
    )


def test_reward_loss_sum_and_empty_batch():
    """(sum over prompts of each prompt's mean pair loss, prompts with a pair) against a float64
    loop; halves of the batch add up; a batch without pairs is 0 with no gradient."""
    rng = np.random.default_rng(7)
    rewards, pair_mask = make_rm_batch(rng, b=6)
    total, prompts = losses.reward_loss_sum(rewards, pair_mask)
    has_pairs = pair_mask.sum((1, 2)) > 0
    assert not has_pairs[1] and not has_pairs[2]  # K=1, all tied
    assert float(prompts) == has_pairs.sum()
    want = 0.0
    for r, m in zip(rewards.astype(np.float64), pair_mask, strict=True):
        pairs = list(zip(*np.nonzero(m), strict=True))
        if pairs:  # a prompt's mean over its pairs of -log sigmoid(r_w - r_l)
            want += np.mean([np.log1p(np.exp(-(r[w] - r[lo]))) for w, lo in pairs])
    assert len({int(m.sum()) for m in pair_mask[has_pairs]}) > 1  # prompts with unequal pair counts
    np.testing.assert_allclose(total, want, rtol=RTOL)
    t1, p1 = losses.reward_loss_sum(rewards[:3], pair_mask[:3])
    t2, p2 = losses.reward_loss_sum(rewards[3:], pair_mask[3:])
    np.testing.assert_allclose((t1 + t2) / (p1 + p2), total / prompts, rtol=RTOL)
    empty = np.zeros_like(pair_mask)
    loss, grad = jax.value_and_grad(losses.reward_loss)(jnp.asarray(rewards), empty)
    assert float(loss) == 0.0 and np.all(np.asarray(grad) == 0)


def test_reward_loss_pairwise_k2_is_logistic():
    """K = 2: a prompt's loss is log(1 + exp(-(r_preferred - r_other))), the preferred response
    the one the pair mask says (whichever index it has); its gradient pushes the preferred
    score up by sigmoid(r_other - r_preferred)."""
    softplus = lambda x: float(np.log1p(np.exp(x)))  # noqa: E731
    sigmoid = lambda x: float(1 / (1 + np.exp(-x)))  # noqa: E731
    first = losses.pairs_from_ranking([0, 1], 2, 2)  # response 0 preferred
    second = losses.pairs_from_ranking([1, 0], 2, 2)  # response 1 preferred
    cases = [  # (rewards, mask, preferred, other)
        ([1.5, -0.5], first, 0, 1),  # the preferred one scores higher: a small loss
        ([0.0, 2.0], first, 0, 1),  # ... lower: a large one
        ([0.0, 2.0], second, 1, 0),
        ([0.3, -1.2], second, 1, 0),
    ]
    loss_and_grad = jax.jit(jax.value_and_grad(losses.reward_loss))
    for r, m, w, lo in cases:
        loss, grad = loss_and_grad(jnp.asarray([r]), m[None])
        want = softplus(-(r[w] - r[lo]))
        np.testing.assert_allclose(loss, want, rtol=RTOL, err_msg=f"{r}, preferred {w}")
        s = sigmoid(r[lo] - r[w])
        np.testing.assert_allclose(grad[0, w], -s, rtol=RTOL, err_msg=f"{r}, preferred {w}")
        np.testing.assert_allclose(grad[0, lo], s, rtol=RTOL, err_msg=f"{r}, preferred {w}")
    batch = jnp.asarray([r for r, *_ in cases])
    masks = np.stack([m for _, m, *_ in cases])
    want = np.mean([softplus(-(r[w] - r[lo])) for r, _, w, lo in cases])  # prompts averaged
    np.testing.assert_allclose(losses.reward_loss(batch, masks), want, rtol=RTOL)


def test_reward_accuracy_vs_loop_with_prediction_ties():
    rng = np.random.default_rng(8)
    rewards, pair_mask = make_rm_batch(rng)
    rewards = np.round(np.nan_to_num(rewards, nan=7.0))  # rounding creates exact ties
    correct, count = 0.0, 0
    for r, m in zip(rewards, pair_mask, strict=True):
        for w, lo in zip(*np.nonzero(m), strict=True):
            count += 1
            correct += 1.0 if r[w] > r[lo] else 0.5 if r[w] == r[lo] else 0.0
    c, n = losses.reward_accuracy(rewards, pair_mask)
    assert float(n) == count
    np.testing.assert_allclose(c, correct, rtol=RTOL)


# ----------------------------------------------------------------------------- GAE


def naive_gae(rewards, values, mask, gamma, lam):
    adv = np.zeros_like(rewards)
    for b in range(rewards.shape[0]):
        length = int(mask[b].sum())
        last = 0.0
        for t in reversed(range(length)):
            next_v = values[b, t + 1] if t + 1 < length else 0.0
            delta = rewards[b, t] + gamma * next_v - values[b, t]
            last = delta + gamma * lam * last
            adv[b, t] = last
    returns = np.where(mask > 0, adv + values, 0.0)
    return adv, returns


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.99, 0.9), (1.0, 1.0), (0.5, 0.0)])
def test_gae_vs_python_loop(gamma, lam):
    rng = np.random.default_rng(9)
    b, t = 6, 12
    mask = ragged_mask(rng, b, t)
    rewards = rng.normal(size=(b, t))
    values = rng.normal(size=(b, t))
    ref_adv, ref_ret = naive_gae(rewards, values, mask, gamma, lam)
    # Garbage past the end of each response must be ignored.
    r_bad = np.where(mask > 0, rewards, 1e3).astype(np.float32)
    v_bad = np.where(mask > 0, values, -1e3).astype(np.float32)
    adv, ret = jax.jit(losses.gae)(r_bad, v_bad, mask, gamma, lam)
    np.testing.assert_allclose(adv, ref_adv, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ret, ref_ret, rtol=1e-5, atol=1e-5)
    assert np.all(np.asarray(adv)[mask == 0] == 0) and np.all(np.asarray(ret)[mask == 0] == 0)
    with jax.enable_x64(True):
        adv64, ret64 = losses.gae(rewards, values, mask, gamma, lam)
        assert adv64.dtype == jnp.float64
        np.testing.assert_allclose(adv64, ref_adv, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(ret64, ref_ret, rtol=1e-12, atol=1e-12)


def test_gae_mask_holes_end_the_episode():
    # A 0 inside a row splits it: each contiguous run is its own episode.
    rng = np.random.default_rng(16)
    b, t = 5, 12
    mask = (rng.random((b, t)) < 0.7).astype(np.int32)
    rewards, values = rng.normal(size=(b, t)), rng.normal(size=(b, t))
    ref_adv, ref_ret = np.zeros((b, t)), np.zeros((b, t))
    for row in range(b):
        runs = np.split(np.arange(t), np.nonzero(np.diff(mask[row]))[0] + 1)
        for run in runs:
            if mask[row, run[0]]:
                ones = np.ones((1, len(run)), np.int32)
                a, r = naive_gae(
                    rewards[row : row + 1, run], values[row : row + 1, run], ones, 0.9, 0.8
                )
                ref_adv[row, run], ref_ret[row, run] = a[0], r[0]
    with jax.enable_x64(True):
        adv, ret = losses.gae(rewards, values, mask, 0.9, 0.8)
        np.testing.assert_allclose(adv, ref_adv, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(ret, ref_ret, rtol=1e-12, atol=1e-12)


def test_gae_bandit_gamma1_lam1_returns_are_reward_to_go():
    # With gamma = lam = 1 the return is the undiscounted sum of rewards from t to the end.
    rng = np.random.default_rng(10)
    mask = ragged_mask(rng, 4, 8)
    rewards = rng.normal(size=(4, 8)) * mask
    _, ret = losses.gae(rewards, rng.normal(size=(4, 8)), mask, 1.0, 1.0)
    togo = np.flip(np.cumsum(np.flip(rewards, -1), -1), -1) * mask
    np.testing.assert_allclose(ret, togo, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- PPO losses


def ppo_inputs(rng, b=5, t=10):
    mask = ragged_mask(rng, b, t)
    old = rng.normal(-2.0, 1.0, size=(b, t))
    logp = old + rng.normal(0.0, 0.3, size=(b, t))  # ratios both inside and outside [0.8, 1.2]
    adv = rng.normal(size=(b, t))
    return logp, old, adv, mask


def np_policy_loss(logp, old, adv, mask, clip):
    sel = mask > 0
    ratio = np.exp(logp - old)
    unclipped = -adv * ratio
    clipped = -adv * np.clip(ratio, 1 - clip, 1 + clip)
    per = np.maximum(unclipped, clipped)
    inside = (ratio > 1 - clip) & (ratio < 1 + clip)
    # d per / d logp = d per / d ratio * ratio; the clipped branch has no gradient outside.
    dper = np.where(clipped > unclipped, -adv * ratio * inside, -adv * ratio)
    n = sel.sum()
    stats = {
        "pg_clip_frac": (clipped > unclipped)[sel].mean(),
        "approx_kl": ((ratio - 1) - (logp - old))[sel].mean(),
        "ratio_mean": ratio[sel].mean(),
    }
    return per[sel].mean(), np.where(sel, dper / n, 0.0), stats


def test_ppo_policy_loss_vs_numpy_with_grad():
    rng = np.random.default_rng(11)
    clip = 0.2
    logp, old, adv, mask = ppo_inputs(rng)
    ref_loss, ref_grad, ref_stats = np_policy_loss(logp, old, adv, mask, clip)
    assert 0 < ref_stats["pg_clip_frac"] < 1  # both branches are exercised
    with jax.enable_x64(True):
        fn = lambda lp: losses.ppo_policy_loss(lp, old, adv, mask, clip)  # noqa: E731
        (loss, stats), grad = jax.value_and_grad(fn, has_aux=True)(jnp.asarray(logp))
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-12)
        np.testing.assert_allclose(grad, ref_grad, atol=1e-12)
        for key, val in ref_stats.items():
            np.testing.assert_allclose(stats[key], val, rtol=1e-12, err_msg=key)
    assert set(stats) == {"pg_clip_frac", "approx_kl", "ratio_mean"}
    # float32 with garbage on padding; normalizer for accumulation.
    bad = np.where(mask > 0, logp, 1e4).astype(np.float32)
    loss32, _ = jax.jit(losses.ppo_policy_loss, static_argnums=4)(bad, old, adv, mask, clip)
    np.testing.assert_allclose(loss32, ref_loss, rtol=RTOL, atol=1e-6)
    n = mask.sum()
    loss_n, _ = losses.ppo_policy_loss(logp, old, adv, mask, clip, normalizer=2 * n)
    np.testing.assert_allclose(loss_n, ref_loss / 2, rtol=RTOL, atol=1e-6)


def test_ppo_policy_loss_identity_ratio():
    rng = np.random.default_rng(12)
    logp, _, adv, mask = ppo_inputs(rng)
    loss, stats = losses.ppo_policy_loss(logp, logp, adv, mask, 0.2)
    np.testing.assert_allclose(loss, -adv[mask > 0].mean(), rtol=RTOL)
    assert float(stats["approx_kl"]) == 0.0 and float(stats["pg_clip_frac"]) == 0.0
    np.testing.assert_allclose(stats["ratio_mean"], 1.0, rtol=RTOL)


def np_value_loss(v, old, ret, mask, clip):
    sel = mask > 0
    vc = old + np.clip(v - old, -clip, clip)
    unclipped = (v - ret) ** 2
    clipped = (vc - ret) ** 2
    per = 0.5 * np.maximum(unclipped, clipped)
    inside = np.abs(v - old) < clip
    dper = np.where(clipped > unclipped, (vc - ret) * inside, v - ret)
    n = sel.sum()
    frac = (clipped > unclipped)[sel].mean()
    return per[sel].mean(), np.where(sel, dper / n, 0.0), frac


def test_ppo_value_loss_vs_numpy_with_grad():
    rng = np.random.default_rng(13)
    b, t, clip = 5, 10, 0.2
    mask = ragged_mask(rng, b, t)
    old = rng.normal(size=(b, t))
    v = old + rng.normal(0, 0.3, size=(b, t))
    ret = old + rng.normal(0, 1.0, size=(b, t))
    ref_loss, ref_grad, ref_frac = np_value_loss(v, old, ret, mask, clip)
    assert 0 < ref_frac < 1
    with jax.enable_x64(True):
        fn = lambda x: losses.ppo_value_loss(x, old, ret, mask, clip)  # noqa: E731
        (loss, stats), grad = jax.value_and_grad(fn, has_aux=True)(jnp.asarray(v))
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-12)
        np.testing.assert_allclose(grad, ref_grad, atol=1e-12)
        np.testing.assert_allclose(stats["vf_clip_frac"], ref_frac, rtol=1e-12)
        sel = mask > 0
        ev = 1 - np.var(ret[sel] - v[sel]) / np.var(ret[sel])
        np.testing.assert_allclose(stats["vf_explained_var"], ev, rtol=1e-10)
    assert set(stats) == {"vf_clip_frac", "vf_explained_var"}
    v_bad = np.where(mask > 0, v, np.nan).astype(np.float32)
    loss32, _ = losses.ppo_value_loss(v_bad, old, ret, mask, clip)
    np.testing.assert_allclose(loss32, ref_loss, rtol=RTOL, atol=1e-6)


# ----------------------------------------------------------------------------- KL rewards, controller


def test_kl_penalty_rewards_zero_kl_places_score_at_last_token():
    rng = np.random.default_rng(14)
    b, t = 5, 8
    mask = ragged_mask(rng, b, t)
    logp = rng.normal(size=(b, t))
    score = rng.normal(size=(b,))
    r = np.asarray(losses.kl_penalty_rewards(logp, logp, mask, score, 0.02))
    for row in range(b):
        length = int(mask[row].sum())
        expected = np.zeros(t)
        if length:
            expected[length - 1] = score[row]
        np.testing.assert_allclose(r[row], expected, rtol=1e-6, atol=0)
    assert np.all(r[0] == 0)  # empty row: nothing, not even the score


def test_kl_penalty_rewards_and_sequence_kl_vs_loop():
    rng = np.random.default_rng(15)
    b, t, beta = 5, 8, 0.1
    mask = ragged_mask(rng, b, t)
    logp, ref = rng.normal(size=(b, t)), rng.normal(size=(b, t))
    score = rng.normal(size=(b,))
    expected = np.zeros((b, t))
    seq = np.zeros(b)
    for row in range(b):
        length = int(mask[row].sum())
        for i in range(length):
            expected[row, i] = -beta * (logp[row, i] - ref[row, i])
            seq[row] += logp[row, i] - ref[row, i]
        if length:
            expected[row, length - 1] += score[row]
    logp_bad = np.where(mask > 0, logp, np.inf)
    r = losses.kl_penalty_rewards(logp_bad, ref, mask, score, beta)
    np.testing.assert_allclose(r, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(losses.sequence_kl(logp_bad, ref, mask), seq, rtol=1e-5, atol=1e-6)


def test_score_no_stop_penalty():
    out = losses.score_no_stop_penalty(jnp.array([0.5, 2.0, -3.0]), jnp.array([1, 0, 1]), -1.0)
    np.testing.assert_array_equal(out, [0.5, -1.0, -3.0])


def test_kl_controller_fixed_and_adaptive():
    fixed = losses.kl_controller_init(0.02)
    assert float(losses.kl_controller_update(fixed, 100.0, 512)["beta"]) == np.float32(0.02)
    update = jax.jit(losses.kl_controller_update)
    state = losses.kl_controller_init(0.1, adaptive=True, target=6.0, horizon=10000)
    for kl in [6.0, 6.6, 3.0, 100.0, 0.0, -5.0, 7.2]:
        e = np.clip(kl / 6.0 - 1, -0.2, 0.2)
        beta = float(state["beta"])
        state = update(state, jnp.float32(kl), 512)
        np.testing.assert_allclose(state["beta"], beta * (1 + e * 512 / 10000), rtol=1e-6)
    assert set(state) == {"beta", "adaptive", "target", "horizon"}
    with pytest.raises(ValueError, match="kl_controller_init"):
        losses.kl_controller_init(0.1, adaptive=True, target=0.0)
    with pytest.raises(ValueError, match="kl_controller_init"):
        losses.kl_controller_init(-0.1)


def test_everything_jits_and_keeps_shapes():
    b, t, v, k = 2, 5, 7, 4
    f = jnp.zeros((b, t))
    m = jnp.ones((b, t), jnp.int32)
    shapes = {
        "lm": jax.eval_shape(losses.lm_loss, jnp.zeros((b, t, v)), m, m),
        "rm": jax.eval_shape(losses.reward_loss, jnp.zeros((b, k)), jnp.zeros((b, k, k))),
        "gae": jax.eval_shape(losses.gae, f, f, m, 1.0, 0.95),
        "kl": jax.eval_shape(losses.kl_penalty_rewards, f, f, m, jnp.zeros(b), 0.02),
        "ent": jax.eval_shape(losses.entropy_from_logits, jnp.zeros((b, t, v)), m),
    }
    assert shapes["lm"].shape == () and shapes["rm"].shape == ()
    assert shapes["gae"][0].shape == (b, t) and shapes["gae"][1].shape == (b, t)
    assert shapes["kl"].shape == (b, t) and shapes["ent"].shape == ()


def test_pretraining_mix_is_a_weight_on_per_source_means():
    """SFT + pretraining (the PPO-init model): the loss is (1 - f) * the SFT token mean +
    f * the pretraining token mean, whatever the token counts; a plain token mean over the
    stacked rows would give pretraining rows (every token counted) far more than f."""
    from instructrl.stages.lm import MixedIterator, ptx_loss_weights

    rng = np.random.default_rng(0)
    b_main, b_ptx, t, v, f = 7, 1, 24, 11, 0.1
    main_mask = np.zeros((b_main, t), np.int32)
    for i in range(b_main):  # completion-only: a few tokens per row, ragged
        start = rng.integers(4, 16)
        main_mask[i, start : start + rng.integers(1, 6)] = 1
    ptx_mask = (np.arange(t)[None, :] < rng.integers(18, t + 1, (b_ptx, 1))).astype(np.int32)
    logits = rng.normal(size=(b_main + b_ptx, t, v))
    targets = rng.integers(0, v, (b_main + b_ptx, t))
    weights = ptx_loss_weights(main_mask, ptx_mask, f)
    total, weight = losses.weighted_lm_loss_sum(
        jnp.asarray(logits, jnp.float32), jnp.asarray(targets), jnp.asarray(weights)
    )
    logp = logits - logits.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
    mean_main = nll[:b_main][main_mask > 0].mean()
    mean_ptx = nll[b_main:][ptx_mask > 0].mean()
    np.testing.assert_allclose(float(total / weight), (1 - f) * mean_main + f * mean_ptx, rtol=1e-5)
    assert float(weight) == pytest.approx(1.0)
    assert weights[b_main:].sum() == pytest.approx(f) and weights[:b_main].sum() == pytest.approx(
        1 - f
    )
    token_share = ptx_mask.sum() / (ptx_mask.sum() + main_mask.sum())
    assert token_share > 0.3  # what the token mean gave the "10%" source here

    class Stream:
        def __init__(self, mask):
            self.mask = mask

        def __next__(self):
            return {"loss_mask": self.mask, "tokens": np.zeros_like(self.mask)}

    batch = next(MixedIterator(Stream(main_mask), Stream(ptx_mask), f))
    assert batch["tokens"].shape == (b_main + b_ptx, t)
    np.testing.assert_array_equal(batch["loss_weights"], weights)
