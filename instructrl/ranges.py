"""The allowed range of every numeric config value, checked before a run starts.

`check(config)` walks the root keys, `config.data`, `config.model`, `config.mesh` and the
section of every stage in `config.stages` (by its `kind`, with its `optimizer`,
`value_optimizer`, `data` and `model` subsections) and raises one ConfigError naming the
first value out of range:

    config key 'pretrain.batch_size' = -8: must be >= 1
    config key 'pretrain.num_steps' = -1: must be >= 0 (0 = train num_epochs epochs)

The tables below are the declaration: each numeric key of each stage kind's
`default_config()` has a rule (tests/unit/test_ranges.py checks that none is missing), with
the meaning of 0 where 0 means something other than zero. Relations between keys (k_min <=
k_max, num_minibatches divides batch_size, ...) stay with the code that uses them.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import ml_collections

from instructrl.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Range:
    """A numeric value's allowed range: ge/gt/le/lt bounds (None = open), `also` values
    allowed besides (e.g. -1 for a mesh axis), `none` whether None is allowed, and `note`
    the meaning of a special value, shown in the message."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    also: tuple[float, ...] = ()
    none: bool = False
    note: str = ""

    def ok(self, v: Any) -> bool:
        if v is None:
            return self.none
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return True  # not a number: the type is the override parser's business
        if v in self.also:
            return True
        if isinstance(v, float) and math.isnan(v):
            return False
        return (
            (self.ge is None or v >= self.ge)
            and (self.gt is None or v > self.gt)
            and (self.le is None or v <= self.le)
            and (self.lt is None or v < self.lt)
        )

    def describe(self) -> str:
        parts = []
        if self.ge is not None:
            parts.append(f">= {self.ge:g}")
        if self.gt is not None:
            parts.append(f"> {self.gt:g}")
        if self.le is not None:
            parts.append(f"<= {self.le:g}")
        if self.lt is not None:
            parts.append(f"< {self.lt:g}")
        text = "must be " + " and ".join(parts) if parts else "must be a number"
        if self.also:
            text += " or " + " or ".join(f"{a:g}" for a in self.also)
        if self.note:
            text += f" ({self.note})"
        return text


ANY = Range()  # any number (seeds, a penalty's sign is the user's choice)
POSITIVE = Range(ge=1)  # counts: batch sizes, epochs, steps, intervals
NONNEG = Range(ge=0)
GT0 = Range(gt=0)
UNIT = Range(ge=0, le=1)  # [0, 1]
PROB = Range(ge=0, lt=1)  # [0, 1): dropout, decay rates
ALL_IF_0 = "0 = all"


def zero_means(note: str) -> Range:
    return Range(ge=0, note=f"0 = {note}")


OPTIMIZER = {
    "lr": GT0,
    "warmup_steps": NONNEG,
    "warmup_init": UNIT,
    "end_ratio": UNIT,
    "b1": PROB,
    "b2": PROB,
    "eps": NONNEG,
    "weight_decay": NONNEG,
    "max_grad_norm": zero_means("no clipping"),
}

DATA = {
    "validation_fraction": PROB,
    "max_prompt_len": POSITIVE,
    "max_response_len": POSITIVE,
    "min_response_len": NONNEG,
    "seq_len": Range(ge=2),
    "max_responses": Range(ge=2, also=(0,), note="0 = the largest K in the dataset"),
    "ptx_ratio": NONNEG,
    "seed": ANY,
    "num_epochs": zero_means("repeat forever"),
    "num_workers": zero_means("read in the main process"),
    "num_threads": zero_means("read in the main thread, without prefetch"),
}

MODEL = {
    "vocab_size": POSITIVE,
    "max_len": POSITIVE,
    "num_layers": POSITIVE,
    "d_model": POSITIVE,
    "num_heads": POSITIVE,
    "d_ff": POSITIVE,
    "num_kv_heads": Range(ge=1, none=True, note="None = num_heads"),
    "head_dim": Range(ge=1, none=True, note="None = d_model / num_heads"),
    "rope_theta": GT0,
    "rope_factor": Range(ge=1),
    "rope_low_freq_factor": GT0,
    "rope_high_freq_factor": GT0,
    "rope_original_max_len": Range(ge=1, none=True, note="None unless rope_scaling='llama3'"),
    "norm_eps": GT0,
    "dropout": PROB,
    "attention_dropout": PROB,
}

MESH = {"data": Range(ge=1, also=(-1,), note="-1 = the remaining devices")}
MESH.update(fsdp=MESH["data"], tensor=MESH["data"])

_TRAINING = {
    "batch_size": POSITIVE,
    "accum_steps": POSITIVE,
    "num_epochs": POSITIVE,
    "num_steps": zero_means("train num_epochs epochs"),
    "eval_batches": zero_means("the whole validation split"),
    "log_every": POSITIVE,
    "checkpoint_every": POSITIVE,
    "max_to_keep": POSITIVE,
}

LM = {
    **_TRAINING,
    "dropout": Range(lt=1, note="< 0 keeps the model's"),
    "ptx_fraction": PROB,
    "ptx_rows": zero_means("round(ptx_fraction x batch_size)"),
    "select_num_prompts": POSITIVE,
    "eval_every_epochs": POSITIVE,
}

RM = {
    **_TRAINING,
    "dropout": PROB,
    "eval_every": zero_means("at the end only"),
    "normalize_num": POSITIVE,
}

PPO = {
    # rl.rollout.PPOConfig
    "batch_size": POSITIVE,
    "num_minibatches": POSITIVE,
    "num_epochs": POSITIVE,
    "max_new_tokens": POSITIVE,
    "temperature": GT0,
    "top_k": zero_means("off"),
    "logprob_chunk": zero_means("off: all response positions in one pass"),
    "top_p": Range(gt=0, le=1, note="1 = off"),
    "stop_token": ANY,  # set by the driver from the tokenizer
    "pad_id": ANY,  # set by the driver from the tokenizer
    "no_stop_penalty": ANY,
    "kl_coef": NONNEG,
    "kl_target": GT0,
    "kl_horizon": GT0,
    "gamma": UNIT,
    "lam": UNIT,
    "cliprange": GT0,
    "cliprange_value": GT0,
    "vf_coef": NONNEG,
    "ptx_coef": zero_means("plain PPO"),
    "ptx_ratio": NONNEG,
    "ema_decay": Range(
        ge=0, lt=1, also=(-1.0,), note="0 = export the last policy, -1 = from ema_horizon"
    ),
    "ema_horizon": zero_means("no EMA"),
    "warmup_iterations": NONNEG,
    "group_size": POSITIVE,
    # the stage driver (stages/ppo.py)
    "num_iterations": POSITIVE,
    "log_every": POSITIVE,
    "gold_every": zero_means("never"),
    "gold_reward_scale": ANY,
    "checkpoint_every": POSITIVE,
    "max_to_keep": POSITIVE,
}

DPO = {
    **_TRAINING,
    "dropout": PROB,
    "beta": GT0,
    "ptx_coef": zero_means("no ptx term"),
    "ptx_rows": zero_means("batch_size"),
}

WORLD = {
    "seed": ANY,
    "num_pretrain": POSITIVE,
    "num_pretrain_heldout": NONNEG,
    "num_demonstrations": POSITIVE,
    "num_rm": NONNEG,
    "num_ppo": NONNEG,
    "num_eval": NONNEG,
    "num_public": NONNEG,
    "demo_error_rate": UNIT,
    "fewshot_k": NONNEG,
    "fewshot_max_chars": POSITIVE,
}

COLLECT = {
    "k_min": Range(ge=2),
    "k_max": Range(ge=2),
    "temperature": GT0,
    "num_labelers": POSITIVE,
    "target_agreement": UNIT,
    "seed": ANY,
}

EVAL = {
    "num_prompts": zero_means("all"),
    "num_samples": POSITIVE,
    "temperature": NONNEG,
    "max_new_tokens": zero_means("data.max_response_len + 1"),
    "batch_size": POSITIVE,
    "heldout_num": zero_means("all"),
    "public_max_new_tokens": POSITIVE,
    "best_of_n": zero_means("off"),
}

SMOKE = {"batch_size": POSITIVE, "prompt_len": POSITIVE, "max_new_tokens": POSITIVE}
TOKENIZER = {"vocab_size": POSITIVE}

# Stage kind -> the rules of its section's keys (subsections: SUBSECTIONS).
KINDS: dict[str, dict[str, Range]] = {
    "smoke": SMOKE,
    "world": WORLD,
    "tokenizer": TOKENIZER,
    "pretrain": LM,
    "sft": LM,
    "collect": COLLECT,
    "rm": RM,
    "ppo": PPO,
    "grpo": {**PPO, "group_size": Range(ge=2, note="samples per prompt")},
    "dpo": DPO,
    "eval": EVAL,
}
SUBSECTIONS = {"optimizer": OPTIMIZER, "value_optimizer": OPTIMIZER, "data": DATA, "model": MODEL}
ROOT = {"seed": ANY}


def _check_section(section: Any, rules: Mapping[str, Range], prefix: str) -> None:
    if not isinstance(section, (ml_collections.ConfigDict, Mapping)):
        return
    for key, rule in rules.items():
        if key in section and not rule.ok(section[key]):
            raise ConfigError(f"config key '{prefix}{key}' = {section[key]!r}: {rule.describe()}")


def check(config: ml_collections.ConfigDict, stage_names: list[str] | None = None) -> None:
    """ConfigError naming the first numeric value out of its range (see the module doc).
    `stage_names`: the sections to check by kind (default: every section with a known
    `kind`)."""
    _check_section(config, ROOT, "")
    for name, rules in (("data", DATA), ("model", MODEL), ("mesh", MESH)):
        if name in config:
            _check_section(config[name], rules, f"{name}.")
    if stage_names is None:
        stage_names = [
            k
            for k, v in config.items()
            if isinstance(v, ml_collections.ConfigDict) and v.get("kind") in KINDS
        ]
    for name in stage_names:
        section = config.get(name)
        if section is None or section.get("kind") not in KINDS:
            continue  # a kind of someone else's (main names unknown kinds itself)
        _check_section(section, KINDS[section.kind], f"{name}.")
        for sub, rules in SUBSECTIONS.items():
            if sub in section:
                _check_section(section[sub], rules, f"{name}.{sub}.")
