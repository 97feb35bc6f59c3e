"""The PPO stage's config section and the PPOConfig it makes, apart from the driver
(instructrl/stages/ppo.py re-exports them): the planner and the benchmarks read them without
the driver's data-pipeline imports."""

from __future__ import annotations

import ml_collections

from instructrl.rl import ppo

DRIVER_KEYS = (
    "kind",
    "init_from",
    "reward_from",
    "tokenizer_from",
    "num_iterations",
    "log_every",
    "gold_every",
    "gold_reward",
    "gold_reward_scale",
    "checkpoint_every",
    "max_to_keep",
    "ema_horizon",
    "data",  # optional per-stage overrides of config.data (driver.data_config)
)


def default_config() -> ml_collections.ConfigDict:
    """The paper's PPO-ptx: 256k episodes = 500 iterations of 512, minibatch 64, 1 epoch,
    β = 0.02, γ_ptx = 27.8 with 8 pretraining sequences per episode, EMA 0.992. Plain PPO is
    the same with ptx_coef = 0."""
    c = ppo.default_ppo_config()
    c.kind = "ppo"
    c.init_from = "sft"
    c.reward_from = "rm"
    c.tokenizer_from = "tokenizer"
    c.num_iterations = 500
    c.log_every = 1
    c.gold_every = 0  # iterations; > 0 scores rollouts with the world's gold scorers
    c.gold_reward = False  # True: the gold scorer replaces the RM (an oracle; see above)
    c.gold_reward_scale = 1.0  # score = scale x gold score in [0, 1] (no RM normalisation)
    c.checkpoint_every = 50
    c.max_to_keep = 2
    # In RM standard deviations measured on the demonstrations (Normalization.score_std), so
    # it means the same whatever the RM's scale: -1 = one sd below an average demonstration.
    # With gold_reward, in units of gold_reward_scale.
    c.no_stop_penalty = -1.0
    # The EMA's time constant as a share of the run's optimizer updates (ppo.ema_decay_for_run):
    # the paper's 0.992 at its 4,000 updates. ema_decay >= 0 sets the decay itself instead.
    c.ema_horizon = ppo.PAPER_EMA_HORIZON
    c.ema_decay = -1.0
    return c


def ppo_config(
    c: ml_collections.ConfigDict, name: str, stop_token: int, pad_id: int, penalty_unit: float
) -> ppo.PPOConfig:
    """The PPOConfig of stage section `c`: `no_stop_penalty` x `penalty_unit` (one RM sd, or
    gold_reward_scale) in score units, and the EMA decay from `ema_horizon` and the run's
    num_iterations x num_minibatches x num_epochs updates unless `ema_decay` >= 0 sets it."""
    updates = c.num_iterations * c.num_minibatches * c.num_epochs
    ema_decay = c.ema_decay if c.ema_decay >= 0 else ppo.ema_decay_for_run(c.ema_horizon, updates)
    return ppo.PPOConfig.from_config(
        c, name=name, extra_keys=DRIVER_KEYS, stop_token=stop_token, pad_id=pad_id,
        no_stop_penalty=c.no_stop_penalty * penalty_unit, ema_decay=ema_decay,
    )  # fmt: skip


# PPO's value-function and GAE settings: no meaning without a critic (stage kind `grpo`).
CRITIC_KEYS = (
    "value_head_on_policy", "vf_coef", "cliprange_value", "gamma", "lam", "whiten_rewards",
    "whiten_advantages", "value_optimizer",
)  # fmt: skip


def grpo_default_config() -> ml_collections.ConfigDict:
    """GRPO as Shao et al. (2024) run it, at PPO's 512 episodes an iteration: 64 prompts x
    G = 8 samples, beta = 0.04 on the k3 KL in the loss, one epoch, no ptx."""
    c = default_config()
    for key in CRITIC_KEYS:
        del c[key]
    c.kind = "grpo"
    c.advantage = "grpo"
    c.batch_size = 64
    c.group_size = 8
    c.kl_penalty = "loss"
    c.kl_coef = 0.04
    c.ptx_coef = 0.0
    return c


def rloo_config(grpo: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """RLOO (Ahmadian et al., 2024) as a copy of a GRPO section: leave-one-out advantages and
    the KL to the reference in the reward, not in the loss."""
    c = ml_collections.ConfigDict(grpo.to_dict())
    c.update(advantage="rloo", kl_penalty="reward")
    return c
