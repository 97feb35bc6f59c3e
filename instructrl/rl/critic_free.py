"""Critic-free RL (GRPO, Dr.GRPO, RLOO) as a variant of PPO's update program (ppo.update).

docs/method.md, "Critic-free RL". The rollout (rl/rollout.py) samples `group_size` (G)
responses per prompt (rows n*G .. n*G + G-1 belong to prompt n) and builds the same per-token
rewards as for PPO; with `kl_penalty="loss"` it leaves the KL out of them. The update then
replaces GAE and the value loss by:

  sequence reward   R_i = sum_t rewards_it = score_i - beta sum_t log-ratio_it  (KL in reward)
                          = score_i                                          (KL in loss)
  advantage         A_i = objectives.group_advantages(R, mode=advantage) over each group
                    (grpo: (R - mean) / std; dr_grpo: R - mean; rloo: leave-one-out baseline),
                    one per sequence, broadcast over its tokens; no whitening
  loss              objectives.critic_free_policy_loss (PPO's clipped surrogate per token, plus
                    beta x k3 KL per token when kl_penalty="loss", aggregated per
                    `cfg.aggregation`) + ptx_coef x the LM loss of the pretraining rows

Epochs, minibatches (over all B*G episodes), EMA and the KL controller are PPO's, in the same
compiled program; there is no value network and no value optimizer.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from instructrl import losses
from instructrl.errors import ConfigError
from instructrl.rl import objectives
from instructrl.rl.rollout import PPOConfig, PPOModels, Rollout, policy_forward

PyTree = Any


def ptx_lm_loss(
    models: PPOModels, cfg: PPOConfig, params: dict, ptx: Mapping[str, jax.Array] | None
) -> jax.Array:
    """The pretraining LM loss (token mean) of the policy on a ptx minibatch; 0 without ptx."""
    if cfg.ptx_coef <= 0:
        return jnp.zeros((), jnp.float32)
    if ptx is None:
        raise ConfigError("ppo update: ptx_coef > 0 needs a pretraining batch (ptx_batch)")
    logits = models.policy.apply(
        {"params": params["policy"]}, ptx["tokens"], ptx["positions"], ptx["mask"]
    )
    return losses.lm_loss(logits, ptx["targets"], ptx["loss_mask"])


def sequence_rewards(batch: Rollout) -> jax.Array:
    """R [B*G] f32: each episode's rewards summed over its response (pads hold 0)."""
    valid = batch.response_mask != 0
    return jnp.sum(jnp.where(valid, batch.rewards, 0.0), axis=1)


def advantages(cfg: PPOConfig, batch: Rollout) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(A [B*G] f32 group-relative advantages, metrics) of a rollout."""
    r = sequence_rewards(batch)
    adv = objectives.group_advantages(r, None, cfg.advantage, group_size=cfg.group_size)
    groups = r.reshape(-1, cfg.group_size)
    flat = jnp.max(groups, axis=1) == jnp.min(groups, axis=1)
    metrics = {
        "sequence_reward_mean": jnp.mean(r),
        "advantages_abs_mean": jnp.mean(jnp.abs(adv)),
        # groups whose G rewards are all equal: no signal (advantage 0 for all of them)
        "groups_flat_frac": jnp.mean(flat.astype(jnp.float32)),
    }
    return adv.astype(jnp.float32), metrics


def update_data(cfg: PPOConfig, batch: Rollout) -> tuple[dict[str, jax.Array], dict]:
    """The per-episode arrays the minibatches are cut from, and the advantage metrics."""
    adv, metrics = advantages(cfg, batch)
    data = {
        "prompt_tokens": batch.prompt_tokens,
        "prompt_mask": batch.prompt_mask,
        "response_tokens": batch.response_tokens,
        "response_mask": batch.response_mask,
        "old_logprobs": batch.logprobs,
        "ref_logprobs": batch.ref_logprobs,
        "advantages": adv,
    }
    return data, metrics


def critic_free_loss(
    models: PPOModels,
    cfg: PPOConfig,
    kl_coef: jax.Array | float,
    params: dict,
    mb: Mapping[str, jax.Array],
    ptx: Mapping[str, jax.Array] | None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Loss of one minibatch (differentiate w.r.t. params = {"policy": ...}).

    mb: update_data's keys, [b, ...]. kl_coef: beta of the k3 term (0 with the KL in the
    reward). Returns (pg + kl_coef x k3 + ptx_coef x lm, metrics as ppo_loss names them).
    """
    seq = (mb["prompt_tokens"], mb["prompt_mask"], mb["response_tokens"], mb["response_mask"])
    logp, entropy, _ = policy_forward(models.policy, params["policy"], *seq, cfg.temperature)
    mask = mb["response_mask"]
    pg, stats = objectives.critic_free_policy_loss(
        logp,
        mb["old_logprobs"],
        mb["advantages"],
        mask,
        cfg.cliprange,
        ref_logp=mb["ref_logprobs"],
        kl_coef=kl_coef,
        aggregation=cfg.aggregation,
        max_len=cfg.max_new_tokens,
    )
    ptx_loss = ptx_lm_loss(models, cfg, params, ptx)
    loss = pg + cfg.ptx_coef * ptx_loss
    sg = jax.lax.stop_gradient
    log_ratio = jnp.where(mask != 0, sg(logp) - mb["old_logprobs"], 0.0)
    aux = {
        "policy_loss": stats["pg_loss"],
        "kl_loss": stats["kl_loss"],
        "ptx_loss": ptx_loss,
        "entropy": sg(entropy),
        "log_ratio_absmax": jnp.max(jnp.abs(log_ratio)),
        "pg_clip_frac": stats["pg_clip_frac"],
        "approx_kl": stats["approx_kl"],
        "ratio_mean": stats["ratio_mean"],
        "kl_ref": stats["kl_ref"],
    }
    return loss, aux
