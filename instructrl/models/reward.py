"""Scoring with a trained reward model: raw scalar, normalisation, and text-level `score`.

The RM is the SFT model with its unembedding replaced by a scalar head read at the last
non-padding token of `[BOS] prompt response [EOS]` (docs/method.md §2). Its loss is invariant
to a shift, so after training the RM stage fits a `Normalization`:

  demonstrations  bias so that labeler demonstrations score mean 0 (the paper)
  policy          gain and bias so that a policy's samples score mean 0, std 1 (Ziegler et al.)

`normalized = gain * raw + bias`. The export folder of the RM stage holds params,
model_config.json and `reward_normalization.json`; `RewardModel.load(dir)` reads all three.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from instructrl import checkpoint as ckpt_lib
from instructrl.models import ModelConfig, Transformer, positions_from_mask

NORMALIZATION_FILE = "reward_normalization.json"
NORMALIZE_MODES = ("none", "demonstrations", "policy")


@dataclasses.dataclass(frozen=True)
class Normalization:
    gain: float = 1.0
    bias: float = 0.0
    mode: str = "none"
    raw_mean: float = 0.0  # of the raw scores the fit used
    raw_std: float = 1.0
    count: int = 0

    @classmethod
    def fit(cls, raw: np.ndarray, mode: str) -> Normalization:
        """raw f32 [N]: scores of demonstrations ("demonstrations") or policy samples ("policy")."""
        if mode not in NORMALIZE_MODES:
            raise ValueError(f"normalize: mode {mode!r} not in {NORMALIZE_MODES}")
        raw = np.asarray(raw, np.float64)
        mean, std = (float(raw.mean()), float(raw.std())) if raw.size else (0.0, 1.0)
        if mode == "none":
            return cls(mode=mode, raw_mean=mean, raw_std=std, count=raw.size)
        if raw.size == 0:
            raise ValueError(f"normalize ({mode}): no scores to fit on")
        if mode == "demonstrations":
            return cls(1.0, -mean, mode, mean, std, raw.size)
        gain = 1.0 / max(std, 1e-6)
        return cls(gain, -mean * gain, mode, mean, std, raw.size)

    def apply(self, raw: jax.Array) -> jax.Array:
        return self.gain * raw + self.bias

    @property
    def score_std(self) -> float:
        """Standard deviation of the normalised scores the fit used (one "RM sd")."""
        return abs(self.gain) * self.raw_std

    @classmethod
    def load(cls, export_dir: str) -> Normalization:
        """The normalisation saved next to an RM export (identity when there is none)."""
        path = os.path.join(export_dir, NORMALIZATION_FILE)
        if not os.path.exists(path):
            return cls()
        with open(path) as f:
            return cls(**json.load(f))


def score_tokens(
    model: Transformer,
    params: Any,
    tokens: jax.Array,
    positions: jax.Array,
    mask: jax.Array,
    gain: jax.Array | float = 1.0,
    bias: jax.Array | float = 0.0,
) -> jax.Array:
    """Normalised RM score f32 [B] of token rows [B,T] (read at each row's last real token)."""
    raw = model.apply({"params": params}, tokens, positions, mask)
    return gain * raw + bias


def encode_pairs(
    tokenizer: Any,
    prompts: Sequence[str],
    responses: Sequence[str],
    seq_len: int,
    stopped: Sequence[bool] | None = None,
    chat: Any = None,
) -> tuple[np.ndarray, np.ndarray]:
    """`[BOS] prompt response [EOS]` right-padded to [B, seq_len] (the RM training layout);
    no EOS where stopped[i] is False. Overlong rows keep their start and lose the EOS, as
    in the data pipeline. With `chat` (a chat_format.ChatFormat) its layout instead: the
    rendered prompt, the response's assistant-turn ids and the template's stop token."""
    if len(prompts) != len(responses):
        raise ValueError(f"score: {len(prompts)} prompts but {len(responses)} responses")
    stopped = [True] * len(responses) if stopped is None else stopped
    tokens = np.full((len(prompts), seq_len), tokenizer.pad_id, np.int32)
    mask = np.zeros((len(prompts), seq_len), np.int32)
    for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        if chat is not None and not chat.plain:
            stop = [chat.stop_id] if stopped[i] else []
            seq = [*chat.prompt_ids(p), *chat.response_ids(p, r), *stop]
        else:
            eos = [tokenizer.eos_id] if stopped[i] else []
            seq = [tokenizer.bos_id, *tokenizer.encode(p), *tokenizer.encode(r), *eos]
        seq = seq[:seq_len]
        tokens[i, : len(seq)] = seq
        mask[i, : len(seq)] = 1
    return tokens, mask


@dataclasses.dataclass
class RewardModel:
    """A loaded RM: `rm.score(prompts, responses)` -> normalised scores np.float32 [N]."""

    model: Transformer
    params: Any
    normalization: Normalization
    tokenizer: Any = None
    seq_len: int = 0
    chat: Any = None  # a chat_format.ChatFormat: score its rows (encode_pairs)

    @classmethod
    def load(
        cls, export_dir: str, tokenizer: Any = None, shardings: Any = None, chat: Any = None
    ) -> RewardModel:
        params, model_dict = ckpt_lib.load_exported(export_dir, shardings)
        norm = Normalization.load(export_dir)
        config = ModelConfig.from_dict(model_dict)
        model = Transformer(config, head="scalar")
        return cls(model, params, norm, tokenizer, config.max_len, chat)

    def __post_init__(self):
        # One compiled scorer per RewardModel; rows are padded to whole batches below, so
        # every call reuses it.
        self._score = jax.jit(
            lambda p, t, m: score_tokens(self.model, p, t, positions_from_mask(m), m)
        )

    def raw_tokens(self, tokens: np.ndarray, mask: np.ndarray, batch_size: int = 64) -> np.ndarray:
        """Raw scores f32 [N] of token rows [N,T] (any padding side)."""
        n = len(tokens)
        pad = -n % batch_size
        if pad:  # padding rows copy row 0 (a real row); their scores are dropped
            tokens = np.concatenate([tokens, np.repeat(tokens[:1], pad, axis=0)])
            mask = np.concatenate([mask, np.repeat(mask[:1], pad, axis=0)])
        out = []
        for s in range(0, len(tokens), batch_size):
            rows = (jnp.asarray(tokens[s : s + batch_size]), jnp.asarray(mask[s : s + batch_size]))
            out.append(np.asarray(self._score(self.params, *rows)))
        return np.concatenate(out)[:n] if out else np.zeros((0,), np.float32)

    def score(
        self,
        prompts: Sequence[str],
        responses: Sequence[str],
        *,
        stopped: Sequence[bool] | None = None,
        raw: bool = False,
        no_stop_score: float | None = None,
    ) -> np.ndarray:
        """Normalised (or raw) scores f32 [N]. `stopped[i]` False: response i never emitted
        EOS, so it is scored without one (like a truncated RM training row), or gets
        `no_stop_score` when that is given (the PPO penalty)."""
        if self.tokenizer is None:
            raise ValueError(
                "RewardModel.score needs a tokenizer (RewardModel.load(..., tokenizer))"
            )
        stopped = [True] * len(responses) if stopped is None else list(stopped)
        tokens, mask = encode_pairs(
            self.tokenizer, prompts, responses, self.seq_len, stopped, self.chat
        )
        scores = self.raw_tokens(tokens, mask)
        if not raw:
            scores = np.asarray(self.normalization.apply(scores), np.float32)
        if no_stop_score is not None:
            scores = np.where(np.asarray(stopped), scores, np.float32(no_stop_score))
        return scores


def score(rm: RewardModel, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
    """Normalised RM scores np.float32 [N] of (prompt, response) texts."""
    return rm.score(prompts, responses)


def rewards_of(model, params, batch, *, deterministic=True, rng=None) -> jax.Array:
    """Raw rewards f32 [B, K] of an RM batch (tokens/positions/mask [B, K, T]), or of a
    packed one (data.examples.pack_responses: rows [R, T'] and response_row [B, K])."""
    rngs = None if deterministic else {"dropout": rng}
    if "response_row" in batch:
        rows = [batch[key] for key in ("tokens", "positions", "mask")]
        r = model.apply({"params": params}, *rows, deterministic=deterministic, rngs=rngs)
        return r[batch["response_row"]]
    b, k, t = batch["tokens"].shape
    flat = [batch[key].reshape(b * k, t) for key in ("tokens", "positions", "mask")]
    r = model.apply({"params": params}, *flat, deterministic=deterministic, rngs=rngs)
    return r.reshape(b, k)
