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

from instructrl.rl import stage_config
from instructrl.stages import ppo

# The section's defaults live beside PPO's (rl/stage_config.py) so that benchmarks can read
# them without the data stack.
default_config = stage_config.grpo_default_config

run = ppo.run
