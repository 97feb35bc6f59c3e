"""Reinforcement learning against a reward: the compiled programs of each RL algorithm.

`rollout.py` samples episodes and scores them (policy, reference, value and reward in one
program); `ppo.py` is PPO's update (GAE, clipped losses, epochs and minibatches as scans,
the ptx term). The stage driver that runs them is `instructrl/stages/ppo.py`.
`objectives.py` holds the losses of the methods beside PPO (DPO, IPO, GRPO, Dr.GRPO, DAPO,
RLOO) as pure functions; `critic_free.py` runs GRPO, Dr.GRPO and RLOO inside PPO's update
(stage `grpo`); the `dpo` stage (instructrl/stages/dpo.py) runs DPO / IPO.
"""
