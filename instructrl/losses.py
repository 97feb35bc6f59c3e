"""Losses and estimators of the InstructGPT recipe (docs/method.md §1-3), as pure functions.

Arrays in, arrays out; everything here is jit-able and holds no state. Shapes: B batch, T time
(response or sequence tokens), V vocabulary, K responses per prompt. Masks may be bool, int or
float; an entry counts as valid iff it is > 0. Every reduction runs in at least float32, even for
bfloat16 inputs (float64 inputs stay float64, which the tests use).

Not here: model code, sampling, optimisers. `pairs_from_ranking` is the one host-side (numpy)
helper; the data pipeline calls it to build the reward model's `pair_mask`.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def _up(x: Array) -> Array:
    """Promotes to at least float32 (bf16 -> f32, f64 stays f64)."""
    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _valid(mask: Array) -> Array:
    return jnp.asarray(mask) > 0


def _safe_div(num: Array, den: Array) -> Array:
    """num / den, and 0 where den == 0 (an empty mask must not produce NaN, nor NaN gradients)."""
    ok = den > 0
    return jnp.where(ok, num / jnp.where(ok, den, 1), 0)


# ----------------------------------------------------------------------------- masked reductions


def masked_sum(x: Array, mask: Array, axis: int | tuple[int, ...] | None = None) -> Array:
    """Sum of x over entries with mask > 0. Invalid entries are ignored even if NaN/inf."""
    x = _up(x)
    return jnp.sum(jnp.where(_valid(mask), x, 0), axis=axis)


def masked_mean(x: Array, mask: Array, axis: int | tuple[int, ...] | None = None) -> Array:
    """Mean of x over entries with mask > 0; 0 where nothing is valid."""
    count = jnp.sum(_valid(mask), axis=axis).astype(_up(x).dtype)
    return _safe_div(masked_sum(x, mask, axis), count)


def masked_var(x: Array, mask: Array) -> Array:
    """Population variance (ddof=0) of x over entries with mask > 0."""
    mean = masked_mean(x, mask)
    return masked_mean(jnp.square(_up(x) - mean), mask)


def whiten(x: Array, mask: Array, shift_mean: bool = True, eps: float = 1e-8) -> Array:
    """Whitens x [...] with the mean and variance (ddof=0) of its masked entries.

    Returns (x - mean) / sqrt(var + eps), plus the mean again when shift_mean=False (the
    predecessors' choice for rewards: rescale without moving the baseline). Entries outside the
    mask are set to 0.
    """
    x = _up(x)
    mean = masked_mean(x, mask)
    out = (x - mean) * jax.lax.rsqrt(masked_var(x, mask) + eps)
    if not shift_mean:
        out = out + mean
    return jnp.where(_valid(mask), out, 0)


def explained_variance(pred: Array, target: Array, mask: Array) -> Array:
    """1 - Var[target - pred] / Var[target] over the mask; 0 when Var[target] == 0 (a log metric)."""
    var_y = masked_var(target, mask)
    var_res = masked_var(_up(target) - _up(pred), mask)
    return jnp.where(var_y > 0, 1.0 - _safe_div(var_res, var_y), 0)


# ----------------------------------------------------------------------------- language modelling


def token_logprobs(logits: Array, targets: Array, temperature: float = 1.0) -> Array:
    """log p(targets) [B, T] from logits [B, T, V] / temperature, in float32.

    Policy and reference log-probs for PPO must use the sampling temperature (docs/method.md §3).
    """
    return _token_logprobs(logits, targets.astype(jnp.int32), temperature)


def _pick(x: Array, targets: Array) -> Array:
    return jnp.take_along_axis(x, targets[..., None], axis=-1)[..., 0]


@jax.custom_vjp
def _token_logprobs(logits: Array, targets: Array, temperature) -> Array:
    z = _up(logits) / temperature
    return _pick(z, targets) - jax.nn.logsumexp(z, axis=-1)


def _token_logprobs_fwd(logits, targets, temperature):
    z = _up(logits) / temperature
    lse = jax.nn.logsumexp(z, axis=-1)
    # The empty array carries logits' dtype for the cotangent (a dtype is not a JAX type).
    return _pick(z, targets) - lse, (z, lse, targets, temperature, jnp.zeros(0, logits.dtype))


def _token_logprobs_bwd(res, g):
    # d/dz (z[t] - logsumexp z) = onehot(t) - softmax(z), written as one elementwise pass over
    # [B, T, V]. Autodiff of log_softmax + take_along_axis makes a scatter and a second pass,
    # ~13% of the LM head's gradient on the cpu7m train step (docs/results.md, "Performance").
    z, lse, targets, temperature, like = res
    onehot = jnp.arange(z.shape[-1], dtype=targets.dtype) == targets[..., None]
    dz = g[..., None] * (onehot - jnp.exp(z - lse[..., None]))
    # z = logits / temperature; a -inf logit (a banned token) has dz = 0 and adds nothing.
    d_temp = -jnp.sum(jnp.where(dz == 0, 0.0, dz * z)) / temperature
    return (dz / temperature).astype(like.dtype), None, d_temp


_token_logprobs.defvjp(_token_logprobs_fwd, _token_logprobs_bwd)


def lm_loss_sum(logits: Array, targets: Array, loss_mask: Array) -> tuple[Array, Array]:
    """(summed NLL, number of counted tokens) — accumulate both over microbatches, then divide.

    logits [B, T, V] predict targets [B, T] at the same index (targets are the inputs shifted
    left by the caller). loss_mask [B, T] selects the counted tokens.
    """
    nll = -token_logprobs(logits, targets)
    return masked_sum(nll, loss_mask), jnp.sum(_valid(loss_mask)).astype(nll.dtype)


def weighted_lm_loss_sum(logits: Array, targets: Array, weights: Array) -> tuple[Array, Array]:
    """(sum of weights x NLL, sum of weights): lm_loss_sum with a float weight per token
    (weights [B, T] >= 0, 0 = not counted), e.g. a mix of two sources' token means."""
    nll = -token_logprobs(logits, targets)
    w = _up(weights)
    return jnp.sum(jnp.where(w > 0, nll, 0.0) * w), jnp.sum(w)


def lm_loss(logits: Array, targets: Array, loss_mask: Array) -> Array:
    """Mean next-token NLL over tokens with loss_mask > 0 (0 if none). Shapes as lm_loss_sum."""
    total, count = lm_loss_sum(logits, targets, loss_mask)
    return _safe_div(total, count)


def sft_loss(logits: Array, targets: Array, loss_mask: Array) -> Array:
    """SFT loss: lm_loss where loss_mask [B, T] is 1 on completion targets only (prompt masked).

    For gradient accumulation use lm_loss_sum with the same completion mask.
    """
    return lm_loss(logits, targets, loss_mask)


def entropy_from_logits(logits: Array, mask: Array) -> Array:
    """Masked mean over [B, T] of the entropy of softmax(logits [B, T, V]), in float32."""
    logp = jax.nn.log_softmax(_up(logits), axis=-1)
    ent = -jnp.sum(jnp.exp(logp) * logp, axis=-1)
    return masked_mean(ent, mask)


# ----------------------------------------------------------------------------- reward model


def pairs_from_ranking(
    ranking: Sequence[int],
    num_responses: int,
    k_max: int,
    ties: Sequence[Sequence[int]] | None = None,
) -> np.ndarray:
    """Host-side: the pair mask [k_max, k_max] float32 of one prompt's ranking.

    ranking: response indices, best first; a permutation of range(num_responses).
    ties: optional groups of response indices the labeler could not separate; pairs inside a
    group are dropped. mask[i, j] = 1 iff response i is ranked above response j and they are not
    tied; rows/columns >= num_responses (padding up to k_max) are 0. Without ties the mask has
    exactly C(num_responses, 2) ones. Raises ValueError on a bad ranking or tie group.
    """
    if not 1 <= num_responses <= k_max:
        raise ValueError(f"pairs_from_ranking: num_responses={num_responses} not in [1, {k_max}]")
    ranking = [int(i) for i in ranking]
    if sorted(ranking) != list(range(num_responses)):
        raise ValueError(
            f"pairs_from_ranking: ranking {ranking} is not a permutation of range({num_responses})"
        )
    group = list(range(num_responses))  # tie-group id per response; untied ones are alone
    seen: set[int] = set()
    for gid, tied in enumerate(ties or ()):
        for i in tied:
            i = int(i)
            if not 0 <= i < num_responses or i in seen:
                raise ValueError(
                    f"pairs_from_ranking: tie index {i} out of range or in two groups in {ties}"
                )
            seen.add(i)
            group[i] = num_responses + gid
    mask = np.zeros((k_max, k_max), np.float32)
    for a, i in enumerate(ranking):
        for j in ranking[a + 1 :]:
            if group[i] != group[j]:
                mask[i, j] = 1.0
    return mask


def _pair_terms(rewards: Array, pair_mask: Array) -> tuple[Array, Array]:
    """diff [B, K, K] = r_i - r_j (0 outside the mask, so padded rewards never leak), valid."""
    r = _up(rewards)
    valid = _valid(pair_mask)
    return jnp.where(valid, r[:, :, None] - r[:, None, :], 0), valid


def reward_loss_sum(rewards: Array, pair_mask: Array) -> tuple[Array, Array]:
    """(sum over prompts of the per-prompt K-wise loss, number of prompts with >= 1 valid pair).

    Accumulate both over microbatches and divide to get reward_loss of the whole batch.
    """
    diff, valid = _pair_terms(rewards, pair_mask)
    nll = jnp.where(valid, -jax.nn.log_sigmoid(diff), 0)
    pairs = jnp.sum(valid, axis=(1, 2)).astype(nll.dtype)
    per_prompt = _safe_div(jnp.sum(nll, axis=(1, 2)), pairs)
    return jnp.sum(per_prompt), jnp.sum(pairs > 0).astype(nll.dtype)


def reward_loss(rewards: Array, pair_mask: Array) -> Array:
    """The K-wise reward model loss of InstructGPT (docs/method.md §2).

    rewards [B, K]: the RM score of each of a prompt's K (<= K_max) responses.
    pair_mask [B, K, K]: 1 iff response i is preferred to response j (see pairs_from_ranking);
    padded responses and ties are simply absent. Per prompt the loss is
    -1/C * sum_{(w, l)} log sigmoid(r_w - r_l) with C its number of valid pairs (C(K,2) minus
    ties); prompts are then averaged. Prompts with no valid pair (padding rows) are left out of
    the average and give neither NaN nor gradient. Returns 0 if no prompt has a pair.
    """
    total, prompts = reward_loss_sum(rewards, pair_mask)
    return _safe_div(total, prompts)


def reward_accuracy(rewards: Array, pair_mask: Array) -> tuple[Array, Array]:
    """(correct, count) over all valid pairs of the batch: pairwise accuracy = correct / count.

    A pair (i above j) is correct if r_i > r_j and counts 0.5 if r_i == r_j. Pairs, not prompts,
    are the unit (the paper's "pairwise accuracy"); sum both over batches before dividing.
    """
    diff, valid = _pair_terms(rewards, pair_mask)
    score = jnp.where(diff > 0, 1.0, jnp.where(diff == 0, 0.5, 0.0)).astype(diff.dtype)
    return masked_sum(score, valid), jnp.sum(valid).astype(diff.dtype)


# ----------------------------------------------------------------------------- PPO


def gae(
    rewards: Array, values: Array, mask: Array, gamma: float, lam: float
) -> tuple[Array, Array]:
    """Generalised advantage estimation over a response, as a reverse lax.scan.

    rewards, values [B, T]: per-token reward and value estimate V(s_t) of response token t.
    mask [B, T]: the response mask, 1 up to and including the stop token, 0 after (rows may have
    different lengths). The episode ends after the last valid token, so the value beyond it is 0;
    a 0 inside a row also ends the episode there. Rewards/values outside the mask are ignored.
      delta_t = r_t + gamma * V_{t+1} * m_{t+1} - V_t
      A_t     = delta_t + gamma * lam * m_{t+1} * A_{t+1}
    Returns (advantages, returns = A + V), both [B, T] and 0 outside the mask.
    """
    valid = _valid(mask)
    r = jnp.where(valid, _up(rewards), 0)
    v = jnp.where(valid, _up(values), 0)  # v = 0 past the end gives the bootstrap value 0
    m = valid.astype(r.dtype)

    def step(carry, xs):
        next_value, next_adv = carry
        r_t, v_t, m_t = xs
        delta = r_t + gamma * next_value - v_t
        adv = m_t * (delta + gamma * lam * next_adv)
        return (v_t * m_t, adv), adv

    init = (jnp.zeros_like(r[:, 0]), jnp.zeros_like(r[:, 0]))
    _, adv = jax.lax.scan(step, init, (r.T, v.T, m.T), reverse=True)
    adv = adv.T
    return adv, jnp.where(valid, adv + v, 0)


def ppo_policy_loss(
    logp: Array,
    old_logp: Array,
    advantages: Array,
    mask: Array,
    clip: float,
    *,
    normalizer: Array | None = None,
) -> tuple[Array, dict[str, Array]]:
    """Clipped PPO surrogate, mean over valid tokens.

    logp, old_logp, advantages, mask [B, T]. ratio = exp(logp - old_logp); per token
    loss = max(-A * ratio, -A * clip(ratio, 1 - clip, 1 + clip)). The mean divides by the number
    of valid tokens, or by `normalizer` (e.g. the token count of all accumulated microbatches).
    stats (no gradient): pg_clip_frac (fraction of tokens where the clipped term is active),
    approx_kl (k3 estimator mean of (ratio - 1) - log ratio, an unbiased estimate of
    KL(old || new) under samples of old, always >= 0), ratio_mean.
    """
    valid = _valid(mask)
    log_ratio = jnp.where(valid, _up(logp) - _up(old_logp), 0)  # 0 keeps padding finite
    ratio = jnp.exp(log_ratio)
    adv = jnp.where(valid, _up(advantages), 0)
    unclipped = -adv * ratio
    clipped = -adv * jnp.clip(ratio, 1.0 - clip, 1.0 + clip)
    per_token = jnp.maximum(unclipped, clipped)
    if normalizer is None:
        loss = masked_mean(per_token, valid)
    else:
        loss = masked_sum(per_token, valid) / normalizer
    sg = jax.lax.stop_gradient
    stats = {
        "pg_clip_frac": masked_mean(sg(clipped > unclipped).astype(per_token.dtype), valid),
        "approx_kl": masked_mean(sg((ratio - 1.0) - log_ratio), valid),
        "ratio_mean": masked_mean(sg(ratio), valid),
    }
    return loss, stats


def ppo_value_loss(
    values: Array,
    old_values: Array,
    returns: Array,
    mask: Array,
    clip: float,
    *,
    normalizer: Array | None = None,
) -> tuple[Array, dict[str, Array]]:
    """Clipped value loss 0.5 * max((v - R)^2, (old + clip(v - old, -clip, clip) - R)^2).

    values, old_values, returns, mask [B, T]; mean over valid tokens (or sum / normalizer).
    stats (no gradient): vf_clip_frac (fraction of tokens where the clipped term is larger),
    vf_explained_var (explained_variance(values, returns, mask)).
    """
    valid = _valid(mask)
    v = jnp.where(valid, _up(values), 0)
    old = jnp.where(valid, _up(old_values), 0)
    ret = jnp.where(valid, _up(returns), 0)
    v_clipped = old + jnp.clip(v - old, -clip, clip)
    unclipped = jnp.square(v - ret)
    clipped = jnp.square(v_clipped - ret)
    per_token = 0.5 * jnp.maximum(unclipped, clipped)
    if normalizer is None:
        loss = masked_mean(per_token, valid)
    else:
        loss = masked_sum(per_token, valid) / normalizer
    sg = jax.lax.stop_gradient
    stats = {
        "vf_clip_frac": masked_mean(sg(clipped > unclipped).astype(per_token.dtype), valid),
        "vf_explained_var": sg(explained_variance(v, ret, valid)),
    }
    return loss, stats


def sequence_kl(logp: Array, ref_logp: Array, mask: Array) -> Array:
    """Per-sequence summed log-ratio [B] = sum_t (logp - ref_logp) over the response mask."""
    return masked_sum(_up(logp) - _up(ref_logp), mask, axis=-1)


def kl_penalty_rewards(
    logp: Array, ref_logp: Array, mask: Array, score: Array, beta: float | Array
) -> Array:
    """Per-token PPO rewards [B, T] (docs/method.md §3).

    logp, ref_logp, mask [B, T] (mask: 1 up to and including the stop token); score [B].
    Every valid token gets -beta * (logp - ref_logp); the score is added at the last valid token
    of each row. Padding gets 0; a row with an empty mask gets 0 everywhere (no score).
    """
    valid = _valid(mask)
    rewards = jnp.where(valid, -beta * (_up(logp) - _up(ref_logp)), 0)
    t = valid.shape[-1]
    last = t - 1 - jnp.argmax(valid[:, ::-1], axis=-1)  # last index with mask > 0
    at_last = (jnp.arange(t)[None, :] == last[:, None]) & jnp.any(valid, -1, keepdims=True)
    return rewards + jnp.where(at_last, _up(score)[:, None], 0)


def score_no_stop_penalty(score: Array, has_stop: Array, penalty: float) -> Array:
    """score [B] where has_stop [B] is true, else the fixed penalty (e.g. -1, Ziegler et al.)."""
    score = _up(score)
    return jnp.where(jnp.asarray(has_stop) > 0, score, jnp.asarray(penalty, score.dtype))


# ----------------------------------------------------------------------------- KL controller


def kl_controller_init(
    beta: float, adaptive: bool = False, target: float = 6.0, horizon: float = 10000.0
) -> dict[str, Array]:
    """State of the KL coefficient controller: a dict of scalars (checkpointable pytree).

    Fixed (adaptive=False, the paper: beta = 0.02) keeps beta; adaptive follows Ziegler et al.
    """
    if beta < 0:
        raise ValueError(f"kl_controller_init: beta={beta} must be >= 0")
    if adaptive and (target <= 0 or horizon <= 0):
        raise ValueError(f"kl_controller_init: target={target}, horizon={horizon} must be > 0")
    return {
        "beta": jnp.asarray(beta, jnp.float32),
        "adaptive": jnp.asarray(adaptive, jnp.bool_),
        "target": jnp.asarray(target, jnp.float32),
        "horizon": jnp.asarray(horizon, jnp.float32),
    }


def kl_controller_update(
    state: dict[str, Array], kl_batch: Array, n_episodes: int | Array
) -> dict[str, Array]:
    """e = clip(KL / target - 1, -0.2, 0.2); beta <- beta * (1 + e * n / horizon) if adaptive.

    kl_batch: batch mean of sequence_kl; n_episodes: episodes in the batch.
    """
    beta = state["beta"]
    err = jnp.clip(_safe_div(_up(kl_batch), state["target"]) - 1.0, -0.2, 0.2)
    new_beta = beta * (1.0 + err * n_episodes / state["horizon"])
    return {**state, "beta": jnp.where(state["adaptive"], new_beta, beta).astype(beta.dtype)}
