"""PPO settings: `PPOConfig` (hashable, closed over by the compiled rollout and update
programs) and `default_ppo_config` (its ml_collections form with the optimizer sub-configs).

Shared by PPO and the critic-free kinds (GRPO, Dr.GRPO, RLOO): `advantage` picks the estimator.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import ml_collections

from instructrl.errors import ConfigError
from instructrl.rl.objectives import ADVANTAGE_MODES, AGGREGATIONS

# Keys of the `ppo.optimizer` / `ppo.value_optimizer` sub-configs are train_lib's.
_OPTIMIZER_SECTIONS = ("optimizer", "value_optimizer")
ADVANTAGES = ("gae", *ADVANTAGE_MODES)


@dataclasses.dataclass(frozen=True)
class PPOConfig:
    """PPO settings (hashable: closed over by the compiled programs). Defaults: the paper's."""

    batch_size: int = 512  # prompts per iteration (episodes: batch_size x group_size)
    num_minibatches: int = 8  # minibatch 64
    num_epochs: int = 1
    max_new_tokens: int = 256  # response length N
    temperature: float = 1.0  # sampling AND log-prob temperature
    top_k: int = 0  # 0 = off (filtering during rollouts is a known failure mode)
    top_p: float = 1.0  # 1.0 = off
    # > 0: policy/reference log-probs and entropy over this many response positions at a
    # time, so [B, N, V] logits never exist at once (large vocabularies); 0 = one pass.
    logprob_chunk: int = 0
    stop_token: int = -1  # must be set: the tokenizer's EOS id (or a template's end of turn)
    pad_id: int = 0
    penalize_no_stop: bool = True
    # Score of a response without a stop token (Ziegler et al.), in the rollout's normalised
    # score units. The ppo stage reads its config key `no_stop_penalty` in RM standard
    # deviations (measured on the demonstrations) and converts (stages/ppo.py).
    no_stop_penalty: float = -1.0
    kl_coef: float = 0.02  # beta (initial beta when adaptive)
    adaptive_kl: bool = False
    kl_target: float = 6.0
    kl_horizon: float = 10000.0
    gamma: float = 1.0
    lam: float = 0.95
    whiten_rewards: bool = False
    whiten_advantages: bool = True
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    vf_coef: float = 0.1  # only when the value head shares the policy trunk
    value_head_on_policy: bool = False  # False: separate value network initialised from the RM
    # gamma of PPO-ptx (0 = plain PPO). It multiplies the pretraining LM loss as a token mean
    # over its rows (losses.lm_loss), added to the per-minibatch PPO loss (token means too).
    ptx_coef: float = 27.8
    ptx_ratio: float = 8.0  # pretraining sequences per episode
    # EMA of the policy params, updated after every optimizer step; the evaluated model. The
    # ppo stage sets it from `ema_horizon` and the run length (ema_decay_for_run).
    ema_decay: float = 0.992
    warmup_iterations: int = 10  # LR warm-up from optimizer.warmup_init * lr, in iterations
    # Critic-free RL (stage kind `grpo`, rl/critic_free.py). "gae": PPO, advantages from a
    # value function by GAE. "grpo" | "dr_grpo" | "rloo": group-relative advantages over the
    # group_size samples of each prompt (rl/objectives.py group_advantages), no value network.
    advantage: str = "gae"
    group_size: int = 1  # samples per prompt in the rollout (G); >= 2 when critic-free
    # Where the KL to the reference enters: "reward" (PPO's -beta x log-ratio per token, in
    # the return) or "loss" (GRPO: beta x the k3 estimator per token, in the loss; critic-free
    # only). beta is the controller's either way.
    kl_penalty: str = "reward"
    # Critic-free token weighting (objectives.AGGREGATIONS); "" = by advantage: grpo
    # "token_mean_per_seq", dr_grpo and rloo "constant" (a sum over the sequence's tokens /
    # max_new_tokens: no length normalisation).
    loss_aggregation: str = ""

    @property
    def critic_free(self) -> bool:
        return self.advantage != "gae"

    @property
    def separate_value_network(self) -> bool:
        """A value network of its own (the RM's architecture), not a head on the policy and
        not critic-free."""
        return not (self.value_head_on_policy or self.critic_free)

    @property
    def episodes(self) -> int:
        """Episodes (sampled responses) per iteration."""
        return self.batch_size * self.group_size

    @property
    def aggregation(self) -> str:
        """The critic-free loss's token weighting (loss_aggregation or its default)."""
        if self.loss_aggregation:
            return self.loss_aggregation
        return "token_mean_per_seq" if self.advantage == "grpo" else "constant"

    @property
    def minibatch_size(self) -> int:
        return self.episodes // self.num_minibatches

    @property
    def updates_per_iteration(self) -> int:
        return self.num_minibatches * self.num_epochs

    @property
    def ptx_batch_size(self) -> int:
        """Pretraining rows per iteration (0 without ptx): ptx_ratio per episode."""
        return round(self.ptx_ratio * self.episodes) if self.ptx_coef > 0 else 0

    @classmethod
    def from_config(
        cls, cfg: Mapping[str, Any], *, name: str = "ppo", extra_keys=(), **overrides: Any
    ) -> PPOConfig:
        """From a ConfigDict section; unknown keys (not in `extra_keys`, e.g. the driver's
        own) are a ConfigError naming `name.key`. `overrides` win (e.g. stop_token=tok.eos_id).
        """
        d = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
        fields = {f.name for f in dataclasses.fields(cls)}
        for key in d:
            if key not in fields and key not in _OPTIMIZER_SECTIONS and key not in extra_keys:
                raise ConfigError(f"config key '{name}.{key}' does not exist")
        values = {k: v for k, v in d.items() if k in fields}
        values.update(overrides)
        out = cls(**values)
        out.validate(name)
        return out

    def validate(self, name: str = "ppo") -> None:
        """ConfigError naming the first bad key."""
        checks = [
            ("stop_token", self.stop_token >= 0, "must be set (the tokenizer's EOS id)"),
            ("temperature", self.temperature > 0, "must be > 0"),
            ("num_minibatches", self.num_minibatches >= 1, "must be >= 1"),
            ("num_epochs", self.num_epochs >= 1, "must be >= 1"),
            ("max_new_tokens", self.max_new_tokens >= 1, "must be >= 1"),
            (
                "group_size",
                self.group_size >= (2 if self.critic_free else 1),
                f"must be >= {2 if self.critic_free else 1} (advantage={self.advantage!r})",
            ),
            (
                "batch_size",
                self.batch_size >= 1 and self.episodes % self.num_minibatches == 0,
                f"x group_size={self.group_size} must be a positive multiple of "
                f"num_minibatches={self.num_minibatches}",
            ),
            ("top_k", self.top_k >= 0, "must be >= 0"),
            ("top_p", 0 < self.top_p <= 1, "must be in (0, 1]"),
            ("kl_coef", self.kl_coef >= 0, "must be >= 0"),
            ("ptx_coef", self.ptx_coef >= 0, "must be >= 0"),
            ("ema_decay", 0 <= self.ema_decay < 1, "must be in [0, 1)"),
            ("lam", 0 <= self.lam <= 1, "must be in [0, 1]"),
            ("gamma", 0 <= self.gamma <= 1, "must be in [0, 1]"),
            ("warmup_iterations", self.warmup_iterations >= 0, "must be >= 0"),
        ]
        choices = [
            ("advantage", ADVANTAGES),
            ("kl_penalty", ("reward", "loss") if self.critic_free else ("reward",)),
            ("loss_aggregation", ("", *AGGREGATIONS)),
        ]
        checks = [
            (key, getattr(self, key) in allowed, f"must be one of {allowed}")
            for key, allowed in choices
        ] + checks
        for key, ok, why in checks:
            if not ok:
                raise ConfigError(f"config key '{name}.{key}' = {getattr(self, key)!r}: {why}")
        if self.ptx_coef > 0 and (
            self.ptx_batch_size < self.num_minibatches or self.ptx_batch_size % self.num_minibatches
        ):
            raise ConfigError(
                f"config key '{name}.ptx_ratio' = {self.ptx_ratio}: ptx_ratio * batch_size = "
                f"{self.ptx_batch_size} must be a positive multiple of num_minibatches"
            )


def default_ppo_config() -> ml_collections.ConfigDict:
    """The paper's PPO-ptx settings (docs/method.md §3) plus the optimizer sub-configs.

    `optimizer` (policy) and `value_optimizer` take train_lib.default_optimizer_config keys;
    their warm-up is set from `warmup_iterations` (do not set warmup_steps). The policy LR is
    not given in docs/method.md: 1e-5 is a placeholder to tune. The value LR is the paper's 9e-6.
    """
    c = ml_collections.ConfigDict(dataclasses.asdict(PPOConfig()))
    c.optimizer = ml_collections.ConfigDict(
        {"lr": 1e-5, "schedule": "constant", "warmup_init": 0.1}
    )
    c.value_optimizer = ml_collections.ConfigDict(
        {"lr": 9e-6, "schedule": "constant", "warmup_init": 0.1}
    )
    return c
