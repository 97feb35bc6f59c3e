"""Stage `grpo`: critic-free RL (GRPO, Dr.GRPO, RLOO) from the SFT model against the reward
model or, with `gold_reward`, the world's gold scorer (RLVR). docs/method.md, "Critic-free RL".

The stage is the `ppo` stage's driver (stages/ppo.py) with these defaults: `group_size` G
samples of each prompt in the rollout, `advantage` "grpo" | "dr_grpo" | "rloo" (group-relative,
rl/critic_free.py), no value network (its keys are gone from the section), the KL to the
reference in the loss as GRPO's k3 term (`kl_penalty="loss"`; "reward" puts it in the reward,
PPO's convention) and optional ptx (`ptx_coef` > 0). Rollout and update are PPO's two
compiled programs, parameterised, not copies; checkpoints, resume and export (the EMA policy)
are PPO's too.
"""

from __future__ import annotations

import ml_collections

from instructrl.stages import ppo

# PPO's value-function and GAE settings: no meaning without a critic.
_CRITIC_KEYS = (
    "value_head_on_policy", "vf_coef", "cliprange_value", "gamma", "lam", "whiten_rewards",
    "whiten_advantages", "value_optimizer",
)  # fmt: skip


def default_config() -> ml_collections.ConfigDict:
    """GRPO as Shao et al. (2024) run it, at PPO's 512 episodes an iteration: 64 prompts x
    G = 8 samples, beta = 0.04 on the k3 KL in the loss, one epoch, no ptx."""
    c = ppo.default_config()
    for key in _CRITIC_KEYS:
        del c[key]
    c.kind = "grpo"
    c.advantage = "grpo"
    c.batch_size = 64
    c.group_size = 8
    c.kl_penalty = "loss"
    c.kl_coef = 0.04
    c.ptx_coef = 0.0
    return c


run = ppo.run
