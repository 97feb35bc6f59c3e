"""Objectives beside PPO (issue 22), as pure functions: DPO / IPO, group-relative advantages,
the critic-free clipped token loss and the k3 KL term.

Arrays in, arrays out, jit-able, no state; conventions as in instructrl/losses.py (masks count
where > 0; reductions in at least float32; float64 stays float64). Shapes: B prompts (or
sequences), K responses per prompt (<= K_max, padded), G samples per prompt, T response tokens.

  preference (offline, from rankings):  dpo_loss_sum, ipo_loss_sum, implicit_reward_stats
  critic-free RL (GRPO, Dr.GRPO, DAPO, RLOO):  group_advantages, critic_free_policy_loss, k3_kl

Reference log-probs are frozen: every function here stops their gradient.

Not here: the stages that sample, score and update (they follow), the PPO losses (losses.py).
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

from instructrl import losses
from instructrl.losses import _pair_terms, _safe_div, _up, _valid

Array = jax.Array
AdvantageMode = Literal["grpo", "dr_grpo", "rloo"]
Aggregation = Literal["token_mean_per_seq", "token_mean", "constant"]

ADVANTAGE_MODES = ("grpo", "dr_grpo", "rloo")
AGGREGATIONS = ("token_mean_per_seq", "token_mean", "constant")


def _check_beta(beta: float | Array, name: str) -> None:
    if isinstance(beta, int | float) and not beta > 0:
        raise ValueError(f"{name}: beta={beta} must be > 0")


# ----------------------------------------------------------------------------- DPO / IPO


def implicit_rewards(logp: Array, ref_logp: Array, beta: float | Array) -> Array:
    """beta * (log pi(y|x) - log pi_ref(y|x)) [B, K]: DPO's implicit reward of each response.

    logp, ref_logp [B, K]: sequence log-probs (summed over the response's tokens) of the policy
    and of the frozen reference; ref_logp gets no gradient.
    """
    return beta * (_up(logp) - jax.lax.stop_gradient(_up(ref_logp)))


def dpo_loss_sum(
    logp: Array, ref_logp: Array, pair_mask: Array, beta: float | Array
) -> tuple[Array, Array]:
    """DPO (Rafailov et al. 2023) over K-wise rankings: (loss summed over prompts, prompts).

    logp, ref_logp [B, K] as implicit_rewards; pair_mask [B, K, K] as losses.reward_loss
    (1 iff response i is preferred to j; ties and padding absent). Per pair (w above l)
      h = (logp_w - ref_w) - (logp_l - ref_l),   loss = -log sigmoid(beta * h),
    averaged over the prompt's pairs, then summed over prompts; the second value counts the
    prompts with >= 1 pair. This is exactly losses.reward_loss_sum of the implicit rewards, so
    it normalises, accumulates and shards as the reward model does: divide the two sums.
    """
    _check_beta(beta, "dpo_loss_sum")
    return losses.reward_loss_sum(implicit_rewards(logp, ref_logp, beta), pair_mask)


def ipo_loss_sum(
    logp: Array, ref_logp: Array, pair_mask: Array, beta: float | Array
) -> tuple[Array, Array]:
    """IPO (Azar et al. 2023, "A general theoretical paradigm ...", eq. 17): as dpo_loss_sum,
    per pair loss = (h - 1/(2 beta))^2 with h as in dpo_loss_sum.

    beta plays the paper's tau (the regularisation towards the reference): the loss drives
    every pair's log-ratio gap h to the target 1/(2 beta) instead of to infinity. h uses the
    log-probs as given: summed over tokens here; pass per-token means for the length-normalised
    variant some implementations use.
    """
    _check_beta(beta, "ipo_loss_sum")
    ratio = _up(logp) - jax.lax.stop_gradient(_up(ref_logp))
    h, valid = _pair_terms(ratio, pair_mask)
    per_pair = jnp.where(valid, jnp.square(h - 1.0 / (2.0 * beta)), 0)
    pairs = jnp.sum(valid, axis=(1, 2)).astype(per_pair.dtype)
    per_prompt = _safe_div(jnp.sum(per_pair, axis=(1, 2)), pairs)
    return jnp.sum(per_prompt), jnp.sum(pairs > 0).astype(per_pair.dtype)


def dpo_loss(logp: Array, ref_logp: Array, pair_mask: Array, beta: float | Array) -> Array:
    """dpo_loss_sum divided: mean over prompts with a pair of each prompt's mean pair loss."""
    return _safe_div(*dpo_loss_sum(logp, ref_logp, pair_mask, beta))


def ipo_loss(logp: Array, ref_logp: Array, pair_mask: Array, beta: float | Array) -> Array:
    """ipo_loss_sum divided, as dpo_loss."""
    return _safe_div(*ipo_loss_sum(logp, ref_logp, pair_mask, beta))


def implicit_reward_stats(
    logp: Array, ref_logp: Array, pair_mask: Array, beta: float | Array
) -> tuple[Array, Array, Array]:
    """(correct, margin_sum, pairs) over all valid pairs of the batch, for logging.

    Implicit-reward accuracy = correct / pairs: a pair (w above l) is correct when
    beta * (logp_w - ref_w) > beta * (logp_l - ref_l), and counts 1/2 when they are equal, as
    losses.reward_accuracy counts ties (so the first step, policy == reference, reads 0.5, not
    0). Mean implicit reward margin = margin_sum / pairs, the margin being
    beta * h (see dpo_loss_sum). Pairs, not prompts, are the unit; sum all three over batches.
    """
    r = jax.lax.stop_gradient(implicit_rewards(logp, ref_logp, beta))
    correct, pairs = losses.reward_accuracy(r, pair_mask)
    diff, _ = _pair_terms(r, pair_mask)  # 0 outside the mask
    return correct, jnp.sum(diff), pairs


# ----------------------------------------------------------------------------- group advantages


def group_advantages(
    rewards: Array,
    mask: Array | None = None,
    mode: AdvantageMode = "grpo",
    *,
    group_size: int | None = None,
    eps: float = 1e-6,
) -> Array:
    """Critic-free advantages from the other samples of the same prompt.

    rewards [B, G]: the score of each of G samples of B prompts; mask [B, G] (None = all valid)
    marks the samples that count (padding groups, dropped samples). Or the flat layout of a
    rollout: rewards, mask [N] with group_size = G, samples n*G .. n*G + G-1 of prompt n
    (N % G == 0). Returns advantages of the input's shape. With n the group's valid samples
    and mean, std over them:
      "grpo"    (Shao et al. 2024):  (r - mean) / (std + eps), std the SAMPLE standard
                deviation (ddof = 1, as torch.std computes it in the usual GRPO code);
      "dr_grpo" (Liu et al. 2025):   r - mean;
      "rloo"    (Ahmadian et al. 2024): r_i - mean of the other n - 1, = n / (n - 1) (r - mean).
    Invalid samples, groups with n <= 1 (no baseline from others) and groups whose valid rewards
    are all equal (std 0: nothing to prefer) give exactly 0. A NaN among a group's valid rewards
    makes that group NaN, so the loss fails loudly. Raises ValueError for G < 2 (every
    advantage would be 0) or an unknown mode. The result is a constant of the loss.
    """
    if mode not in ADVANTAGE_MODES:
        raise ValueError(f"group_advantages: mode {mode!r} not in {ADVANTAGE_MODES}")
    r = _up(rewards)
    flat = r.ndim == 1
    if flat:
        if group_size is None or group_size < 1 or r.shape[0] % group_size:
            raise ValueError(
                f"group_advantages: flat rewards [{r.shape[0]}] need a group_size dividing "
                f"it, got {group_size}"
            )
        r = r.reshape(-1, group_size)
    elif r.ndim != 2 or group_size not in (None, r.shape[1]):
        raise ValueError(
            f"group_advantages: rewards must be [B, G] (or flat with group_size), got shape "
            f"{r.shape}, group_size={group_size}"
        )
    if r.shape[1] < 2:
        raise ValueError(f"group_advantages: G={r.shape[1]} samples per prompt; need >= 2")
    valid = jnp.ones(r.shape, bool) if mask is None else _valid(jnp.reshape(mask, r.shape))
    n = jnp.sum(valid, axis=1, keepdims=True).astype(r.dtype)
    mean = losses.masked_mean(r, valid, axis=1)[:, None]
    hi = jnp.max(jnp.where(valid, r, -jnp.inf), axis=1, keepdims=True)
    lo = jnp.min(jnp.where(valid, r, jnp.inf), axis=1, keepdims=True)
    # Equal rewards: r - mean is rounding noise (0.1 + 0.1 + 0.1 != 0.3) that / eps would blow
    # up. `!=`, not `>`: a NaN reward makes its group NaN (the run stops) instead of silently 0.
    live = valid & (hi != lo) & (n > 1)
    centred = jnp.where(live, r - mean, 0)
    if mode == "grpo":
        std = jnp.sqrt(_safe_div(jnp.sum(jnp.square(centred), axis=1, keepdims=True), n - 1))
        adv = centred / (std + eps)
    elif mode == "dr_grpo":
        adv = centred
    else:
        adv = centred * _safe_div(n, n - 1)
    adv = jnp.where(live, adv, 0)
    return adv.reshape(-1) if flat else adv


# ----------------------------------------------------------------------------- token losses


def k3_kl(logp: Array, ref_logp: Array, mask: Array) -> Array:
    """Per-token k3 estimator of KL(pi || pi_ref) [B, T] (Schulman 2020), 0 outside the mask:
    exp(ref - logp) - (ref - logp) - 1 >= 0, unbiased for tokens sampled from pi. ref_logp gets
    no gradient; d/dlogp = 1 - exp(ref - logp)."""
    valid = _valid(mask)
    d = jnp.where(valid, jax.lax.stop_gradient(_up(ref_logp)) - _up(logp), 0)
    return jnp.where(valid, jnp.exp(d) - d - 1.0, 0)


def _aggregate(
    per_token: Array, valid: Array, aggregation: Aggregation, max_len: int | None
) -> tuple[Array, Array]:
    """(numerator, denominator) of the loss; see critic_free_policy_loss."""
    x = jnp.where(valid, per_token, 0)
    tokens = jnp.sum(valid, axis=-1).astype(x.dtype)
    seqs = jnp.sum(tokens > 0).astype(x.dtype)
    if aggregation == "token_mean_per_seq":
        return jnp.sum(_safe_div(jnp.sum(x, axis=-1), tokens)), seqs
    if aggregation == "token_mean":
        return jnp.sum(x), jnp.sum(tokens)
    if aggregation == "constant":
        length = valid.shape[-1] if max_len is None else max_len
        return jnp.sum(x) / length, seqs
    raise ValueError(f"critic_free_policy_loss: aggregation {aggregation!r} not in {AGGREGATIONS}")


def critic_free_policy_loss(
    logp: Array,
    old_logp: Array,
    advantages: Array,
    mask: Array,
    clip: float,
    *,
    ref_logp: Array | None = None,
    kl_coef: float | Array = 0.0,
    aggregation: Aggregation = "token_mean_per_seq",
    max_len: int | None = None,
    clip_high: float | None = None,
    normalizer: Array | None = None,
) -> tuple[Array, dict[str, Array]]:
    """Clipped surrogate + kl_coef x k3 KL to the reference, per token, then aggregated.

    logp, old_logp, mask [B, T] (mask: 1 up to and including the stop token); advantages [B]
    (one per sequence, as group_advantages gives, broadcast over its tokens) or [B, T];
    ref_logp [B, T] (needed iff kl_coef != 0). Per valid token, as losses.ppo_policy_loss:
      ratio = exp(logp - old_logp),
      pg = max(-A * ratio, -A * clip(ratio, 1 - clip, 1 + clip_high)),  clip_high = clip if None
      (DAPO's "clip-higher" sets clip_high > clip),
      loss_t = pg + kl_coef * k3_kl(logp, ref_logp)  (GRPO's KL as a loss, not in the reward).
    aggregation (the weight of each token):
      "token_mean_per_seq" (GRPO): mean over each sequence's tokens, then mean over sequences;
      "token_mean" (DAPO): mean over all valid tokens of the batch;
      "constant" (Dr.GRPO): sum over each sequence's tokens / max_len (default T, the generation
        budget), then mean over sequences: no length-dependent weight.
    Sequences are those with >= 1 valid token (empty rows are padding). normalizer replaces the
    denominator for accumulation over microbatches: all their sequences for
    "token_mean_per_seq" / "constant", all their tokens for "token_mean".
    stats (no gradient): pg_loss and kl_loss (pg and k3 aggregated alike; loss = pg_loss +
    kl_coef * kl_loss), pg_clip_frac,
    approx_kl (old vs new, as in ppo_policy_loss), ratio_mean, kl_ref (token mean of k3).
    """
    if ref_logp is None and not (isinstance(kl_coef, int | float) and kl_coef == 0):
        raise ValueError("critic_free_policy_loss: kl_coef != 0 needs ref_logp")
    valid = _valid(mask)
    log_ratio = jnp.where(valid, _up(logp) - _up(old_logp), 0)  # 0 keeps padding finite
    ratio = jnp.exp(log_ratio)
    adv = _up(advantages)
    if adv.ndim == 1:
        adv = adv[:, None]
    adv = jnp.where(valid, adv, 0)
    high = clip if clip_high is None else clip_high
    unclipped = -adv * ratio
    clipped = -adv * jnp.clip(ratio, 1.0 - clip, 1.0 + high)
    pg = jnp.maximum(unclipped, clipped)
    kl = jnp.zeros_like(pg) if ref_logp is None else k3_kl(logp, ref_logp, valid)
    num, den = _aggregate(pg + kl_coef * kl, valid, aggregation, max_len)
    den = den if normalizer is None else normalizer
    loss = _safe_div(num, den)
    sg = jax.lax.stop_gradient
    stats = {
        "pg_loss": sg(_safe_div(_aggregate(pg, valid, aggregation, max_len)[0], den)),
        "kl_loss": sg(_safe_div(_aggregate(kl, valid, aggregation, max_len)[0], den)),
        "pg_clip_frac": losses.masked_mean(sg(clipped > unclipped).astype(pg.dtype), valid),
        "approx_kl": losses.masked_mean(sg((ratio - 1.0) - log_ratio), valid),
        "ratio_mean": losses.masked_mean(sg(ratio), valid),
        "kl_ref": losses.masked_mean(sg(kl), valid),
    }
    return loss, stats
