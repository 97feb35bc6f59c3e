"""Decoder-only transformer: GPT-2/GPT-3, Llama and Qwen styles in one Flax Linen module.

One `Transformer` covers these families through `ModelConfig`:
  GPT-2/3: position="learned", norm="layernorm", mlp="gelu" (tanh approximation), use_bias=True.
  Llama:   position="rope" (HF "rotate_half" layout), norm="rmsnorm", mlp="swiglu",
           use_bias=False, num_kv_heads < num_heads (grouped-query attention);
           Llama 3.1+ adds rope_scaling="llama3" (rescaled RoPE frequencies).
  Qwen2:   Llama + qkv_bias=True (biases on q/k/v only).
  Qwen3:   Llama + qk_norm=True (RMSNorm of each q/k head over head_dim, before RoPE).
Numerics follow the Hugging Face implementations so converted checkpoints match them.

Parameter tree (Linen, under "params"; D=d_model, H=heads, K=kv heads, Dh=head_dim, F=d_ff):
  embed/token [V, D]            embed/position [max_len, D]    (learned positions only)
  block_{i}/ln_1/{scale, bias}  block_{i}/ln_2/{scale, bias}   (bias only for layernorm)
  block_{i}/attn/{q,k,v}/kernel [D, H|K, Dh], bias [H|K, Dh]   (bias if use_bias or qkv_bias)
  block_{i}/attn/{q_norm,k_norm}/scale [Dh]                      (qk_norm only)
  block_{i}/attn/o/kernel [H, Dh, D], bias [D]
  block_{i}/mlp/{up,gate}/kernel [D, F], bias [F]  (gate only for swiglu)
  block_{i}/mlp/down/kernel [F, D], bias [D]
  final_norm/{scale, bias}
  unembed [D, V]                (head="lm" and tie_embeddings=False)
  head/kernel [D, 1], bias [1]  (head="scalar")
The trunk names are identical for both heads: `init_scalar_from_lm` builds a reward/value model
from LM params. Params stay per block (block_{i}, easy to read and convert); init and cached
decoding loop over the blocks in Python, the no-cache forward (training, scoring) runs them as
one lax.scan over the stacked block params (faster to compile and to run; see _scan_blocks).

Not here: sampling and the KV-cache decode loop (sampling.py), sharding rules (sharding.py).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from instructrl.errors import ConfigError
from instructrl.models.rope import apply_rope, rope_inv_freq

Cache = dict[str, Any]  # {"index": int32 [], "mask": int32 [B,S], "layers": ({"k","v"}, ...)}

_CHOICES = {
    "position": ("learned", "rope"),
    "norm": ("layernorm", "rmsnorm"),
    "mlp": ("gelu", "swiglu"),
    "rope_scaling": ("none", "llama3"),
}
# The llama3 RoPE fields' values when rope_scaling="none" (they are unused then).
_ROPE_SCALING_DEFAULTS = {
    "rope_factor": 1.0,
    "rope_low_freq_factor": 1.0,
    "rope_high_freq_factor": 4.0,
    "rope_original_max_len": None,
}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    max_len: int
    num_layers: int
    d_model: int
    num_heads: int
    d_ff: int
    num_kv_heads: int | None = None  # GQA; None -> num_heads
    head_dim: int | None = None  # None -> d_model // num_heads
    position: str = "learned"
    norm: str = "layernorm"
    mlp: str = "gelu"
    use_bias: bool = True
    qkv_bias: bool = False  # biases on q/k/v only (Qwen2); use_bias=True already has them
    qk_norm: bool = False  # norm of each q/k head over head_dim before RoPE (Qwen3)
    tie_embeddings: bool = True
    rope_theta: float = 10000.0
    # rope_scaling="llama3": HF's "llama3" rope_type (Llama 3.1+), which divides the low
    # frequencies by rope_factor and interpolates between low_freq_factor and high_freq_factor
    # (wavelengths relative to rope_original_max_len, the pretraining context).
    rope_scaling: str = "none"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_len: int | None = None
    norm_eps: float = 1e-5
    dropout: float = 0.0  # residual + embedding dropout
    attention_dropout: float = 0.0
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    remat: bool = False

    def __post_init__(self):
        for key in ("vocab_size", "max_len", "num_layers", "d_model", "num_heads", "d_ff"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                raise ConfigError(
                    f"model.{key}: must be a positive int, got {getattr(self, key)!r}"
                )
        for key, allowed in _CHOICES.items():
            if getattr(self, key) not in allowed:
                raise ConfigError(f"model.{key}: {getattr(self, key)!r} not in {allowed}")
        for key in ("dtype", "param_dtype"):
            try:
                jnp.dtype(getattr(self, key))
            except TypeError as e:
                raise ConfigError(f"model.{key}: unknown dtype {getattr(self, key)!r}") from e
        if self.num_heads % self.kv_heads:
            raise ConfigError(
                f"model.num_kv_heads: {self.kv_heads} must divide num_heads={self.num_heads}"
            )
        if self.head_dim is None and self.d_model % self.num_heads:
            raise ConfigError(
                f"model.num_heads: {self.num_heads} must divide d_model={self.d_model}"
            )
        if self.position == "rope" and self.dim_head % 2:
            raise ConfigError(f"model.head_dim: rope needs an even head_dim, got {self.dim_head}")
        if self.qkv_bias and self.use_bias:
            raise ConfigError("model.qkv_bias: only with use_bias=False (use_bias has all biases)")
        self._check_rope_scaling()

    def _check_rope_scaling(self):
        if self.rope_scaling == "none":
            for key, default in _ROPE_SCALING_DEFAULTS.items():
                if getattr(self, key) != default:
                    raise ConfigError(f"model.{key}: only with rope_scaling='llama3'")
            return
        if self.position != "rope":
            raise ConfigError(f"model.rope_scaling: {self.rope_scaling!r} needs position='rope'")
        low, high = self.rope_low_freq_factor, self.rope_high_freq_factor
        if not self.rope_factor >= 1:
            raise ConfigError(f"model.rope_factor: must be >= 1, got {self.rope_factor!r}")
        if not 0 < low < high:
            raise ConfigError(
                f"model.rope_low_freq_factor: need 0 < rope_low_freq_factor < "
                f"rope_high_freq_factor, got {low!r} and {high!r}"
            )
        n = self.rope_original_max_len
        if not isinstance(n, int) or n < 1:
            raise ConfigError(f"model.rope_original_max_len: must be a positive int, got {n!r}")

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def dim_head(self) -> int:
        return self.head_dim or self.d_model // self.num_heads

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModelConfig:
        """Builds a config from a dict or ConfigDict; ConfigError names unknown/missing keys."""
        d = d.to_dict() if hasattr(d, "to_dict") else dict(d)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        for key in d:
            if key not in fields:
                raise ConfigError(f"model.{key}: unknown key")
        for name, f in fields.items():
            if f.default is dataclasses.MISSING and name not in d:
                raise ConfigError(f"model.{name}: missing required key")
        return cls(**d)


def positions_from_mask(mask: jax.Array) -> jax.Array:
    """Position ids [B,T] int32 from a mask [B,T] (0 = pad, >0 = segment id).

    0 at each row's first real token (left padding) and again wherever the segment id changes
    (packing); pads get 0. Segments must be contiguous runs.
    """
    mask = jnp.asarray(mask)
    t = jnp.arange(mask.shape[-1], dtype=jnp.int32)
    prev = jnp.pad(mask, ((0, 0), (1, 0)))[:, :-1]
    is_start = (mask != 0) & (mask != prev)
    start = lax.cummax(jnp.where(is_start, t, 0), axis=1)
    return jnp.where(mask != 0, t - start, 0).astype(jnp.int32)


def init_cache(config: ModelConfig, batch: int, max_len: int) -> Cache:
    """Empty KV cache with `max_len` slots: k/v [B, K, S, Dh] per layer in the compute dtype.

    `index` is the next slot to write (shared by all rows; prompts are left-padded), `mask`
    the segment id of each stored key (0 = empty or pad, never attended to).
    """
    shape = (batch, config.kv_heads, max_len, config.dim_head)
    dtype = jnp.dtype(config.dtype)
    layer = lambda: {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}  # noqa: E731
    return {
        "index": jnp.zeros((), jnp.int32),
        "mask": jnp.zeros((batch, max_len), jnp.int32),
        "layers": tuple(layer() for _ in range(config.num_layers)),
    }


def init_scalar_from_lm(lm_params: Mapping, scalar_params: Mapping) -> dict:
    """Reward/value params: the trunk copied from an LM, the fresh scalar `head` kept.

    lm_params, scalar_params: unboxed "params" trees of head="lm" / head="scalar" models of the
    same config. The LM's `unembed` (if untied) is dropped.
    """
    out = {}
    for name, value in scalar_params.items():
        if name == "head":
            out[name] = value
            continue
        if name not in lm_params:
            raise ValueError(f"init_scalar_from_lm: LM params lack trunk entry {name!r}")
        want = jax.tree.map(jnp.shape, value)
        got = jax.tree.map(jnp.shape, lm_params[name])
        if want != got:
            raise ValueError(f"init_scalar_from_lm: shapes differ under {name!r}: {got} vs {want}")
        out[name] = lm_params[name]
    return out


def _normal(std: float):
    return nn.initializers.normal(stddev=std)


def matmul_2d(x: jax.Array, w: jax.Array, n_in: int = 1, **kwargs) -> jax.Array:
    """x [..., *in] @ w [*in, *out] -> [..., *out], computed as one [rows, in] x [in, out]
    product. XLA:CPU runs the 2-D form and its two gradient products as single fast matmuls;
    the N-D dot_general's weight gradient (contracting batch and time at once) became a slow
    matmul after a transposing copy (cpu7m train step: docs/results.md, "Performance")."""
    lead, k_in, out = x.shape[: x.ndim - n_in], w.shape[:n_in], w.shape[n_in:]
    y = jnp.dot(x.reshape(-1, math.prod(k_in)), w.reshape(math.prod(k_in), -1), **kwargs)
    return y.reshape(*lead, *out)


class Proj(nn.Module):
    """x @ kernel (+ bias) contracting x's last `n_in` dims; kernel/bias carry logical names."""

    shape: tuple[int, ...]  # kernel shape
    names: tuple[str | None, ...]
    n_in: int = 1
    use_bias: bool = True
    std: float = 0.02
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(_normal(self.std), self.names),
            self.shape,
            self.param_dtype,
        )
        y = matmul_2d(x.astype(self.dtype), kernel.astype(self.dtype), self.n_in)
        if self.use_bias:
            out_shape, out_names = self.shape[self.n_in :], self.names[self.n_in :]
            bias = self.param(
                "bias",
                nn.with_logical_partitioning(nn.initializers.zeros, out_names),
                out_shape,
                self.param_dtype,
            )
            y = y + bias.astype(self.dtype)
        return y


class Norm(nn.Module):
    """LayerNorm (scale + bias) or RMSNorm (scale only); statistics in f32 like HF."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        pdt, dt = jnp.dtype(cfg.param_dtype), jnp.dtype(cfg.dtype)
        scale = self.param(
            "scale",
            nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
            (x.shape[-1],),
            pdt,
        )
        x32 = x.astype(jnp.float32)
        if cfg.norm == "rmsnorm":
            y = x32 * lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + cfg.norm_eps)
            # HF Llama casts back to the input dtype before multiplying by the weight.
            return scale.astype(dt) * y.astype(dt)
        bias = self.param(
            "bias",
            nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)),
            (x.shape[-1],),
            pdt,
        )
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * lax.rsqrt(var + cfg.norm_eps)
        return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(dt)


def _masked_softmax(scores: jax.Array, mask: jax.Array) -> jax.Array:
    """Softmax over the last axis of f32 scores where mask is True (broadcastable bool).

    A finite floor (not -inf) keeps fully masked rows NaN-free (uniform; their outputs are
    never used). Written out rather than jax.nn.softmax: about twice as fast on XLA:CPU.
    """
    scores = jnp.where(mask, scores, jnp.finfo(scores.dtype).min)
    e = jnp.exp(scores - lax.stop_gradient(jnp.max(scores, axis=-1, keepdims=True)))
    return e * (1.0 / jnp.sum(e, axis=-1, keepdims=True))


class Attention(nn.Module):
    config: ModelConfig
    deterministic: bool = True

    @nn.compact
    def __call__(self, x, positions, attn_mask, layer_cache, index):
        """x [B,T,D], attn_mask bool [B,T,S]; layer_cache {"k","v"} [B,K,S,Dh] or None."""
        cfg = self.config
        h, kvh, dh, d = cfg.num_heads, cfg.kv_heads, cfg.dim_head, cfg.d_model
        dt, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        proj = lambda shape, names, name, n_in=1, std=0.02, bias=cfg.use_bias: Proj(  # noqa: E731
            shape, names, n_in, bias, std, dt, pdt, name=name
        )
        qkv_bias = cfg.use_bias or cfg.qkv_bias
        q = proj((d, h, dh), ("embed", "heads", "head_dim"), "q", bias=qkv_bias)(x)
        k = proj((d, kvh, dh), ("embed", "kv_heads", "head_dim"), "k", bias=qkv_bias)(x)
        v = proj((d, kvh, dh), ("embed", "kv_heads", "head_dim"), "v", bias=qkv_bias)(x)
        q = nn.with_logical_constraint(q, ("batch", "length", "act_heads", None))
        if cfg.qk_norm:
            q, k = Norm(cfg, name="q_norm")(q), Norm(cfg, name="k_norm")(k)
        if cfg.position == "rope":
            inv_freq = rope_inv_freq(cfg)
            q = apply_rope(q, positions, cfg.rope_theta, inv_freq)
            k = apply_rope(k, positions, cfg.rope_theta, inv_freq)
        # Keys/values live as [B,K,S,Dh] (heads before length): the attention dots then read
        # the cache without a per-step transpose of all of it.
        k, v = k.swapaxes(1, 2), v.swapaxes(1, 2)
        new_cache = None
        if layer_cache is not None:
            at = (0, 0, index, 0)
            k = lax.dynamic_update_slice(layer_cache["k"], k.astype(layer_cache["k"].dtype), at)
            v = lax.dynamic_update_slice(layer_cache["v"], v.astype(layer_cache["v"].dtype), at)
            new_cache = {"k": k, "v": v}
        b, t = x.shape[:2]
        g = h // kvh
        # GQA: query head j uses kv head j // G, as HF's repeat_kv. Queries go to [B,K,G*T,Dh]
        # so that both attention products are 4-D batched matmuls (several times faster on
        # XLA:CPU than the equivalent 5-D einsums).
        q = q.reshape(b, t, kvh, g, dh).transpose(0, 2, 3, 1, 4).reshape(b, kvh, g * t, dh)
        scores = jnp.einsum("bkqd,bksd->bkqs", q, k.astype(dt), preferred_element_type=jnp.float32)
        scores = scores.reshape(b, kvh, g, t, -1) * (1.0 / dh**0.5)
        probs = _masked_softmax(scores, attn_mask[:, None, None])
        probs = nn.Dropout(cfg.attention_dropout)(probs, deterministic=self.deterministic)
        probs = probs.reshape(b, kvh, g * t, -1).astype(dt)
        out = jnp.einsum("bkqs,bksd->bkqd", probs, v.astype(dt))
        out = out.reshape(b, kvh, g, t, dh).transpose(0, 3, 1, 2, 4).reshape(b, t, h, dh)
        out = proj(
            (h, dh, d), ("heads", "head_dim", "embed"), "o", 2, 0.02 / (2 * cfg.num_layers) ** 0.5
        )(out)
        return out, new_cache


class Mlp(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        dt, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        up = Proj(
            (cfg.d_model, cfg.d_ff), ("embed", "mlp"), 1, cfg.use_bias, 0.02, dt, pdt, name="up"
        )(x)
        if cfg.mlp == "swiglu":
            gate = Proj(
                (cfg.d_model, cfg.d_ff),
                ("embed", "mlp"),
                1,
                cfg.use_bias,
                0.02,
                dt,
                pdt,
                name="gate",
            )(x)
            hidden = jax.nn.silu(gate) * up
        else:
            hidden = jax.nn.gelu(up, approximate=True)
        hidden = nn.with_logical_constraint(hidden, ("batch", "length", "act_mlp"))
        std = 0.02 / (2 * cfg.num_layers) ** 0.5
        return Proj(
            (cfg.d_ff, cfg.d_model), ("mlp", "embed"), 1, cfg.use_bias, std, dt, pdt, name="down"
        )(hidden)


class Block(nn.Module):
    """Pre-norm residual block: x + drop(attn(ln_1 x)); x + drop(mlp(ln_2 x))."""

    config: ModelConfig
    deterministic: bool = True

    @nn.compact
    def __call__(self, x, positions, attn_mask, layer_cache, index):
        cfg = self.config
        drop = nn.Dropout(cfg.dropout)
        y, new_cache = Attention(cfg, self.deterministic, name="attn")(
            Norm(cfg, name="ln_1")(x), positions, attn_mask, layer_cache, index
        )
        x = x + drop(y, deterministic=self.deterministic)
        x = x + drop(
            Mlp(cfg, name="mlp")(Norm(cfg, name="ln_2")(x)), deterministic=self.deterministic
        )
        return nn.with_logical_constraint(x, ("batch", "length", "act_embed")), new_cache


class Embed(nn.Module):
    config: ModelConfig

    def setup(self):
        cfg = self.config
        pdt = jnp.dtype(cfg.param_dtype)
        self.token = self.param(
            "token",
            nn.with_logical_partitioning(_normal(0.02), ("vocab", "embed")),
            (cfg.vocab_size, cfg.d_model),
            pdt,
        )
        if cfg.position == "learned":
            self.position = self.param(
                "position",
                nn.with_logical_partitioning(_normal(0.01), (None, "embed")),
                (cfg.max_len, cfg.d_model),
                pdt,
            )

    def __call__(self, tokens, positions):
        dt = jnp.dtype(self.config.dtype)
        x = jnp.take(self.token, tokens, axis=0).astype(dt)
        if self.config.position == "learned":
            x = x + jnp.take(self.position, positions, axis=0).astype(dt)
        return x

    def attend(self, x):
        """Tied unembedding: x [B,T,D] -> logits f32 [B,T,V]."""
        table = self.token.astype(x.dtype)
        return matmul_2d(x, table.T, preferred_element_type=jnp.float32)


class ScalarHead(nn.Module):
    """Projection to one scalar replacing the unembedding (reward model / value function)."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x, mask, per_token):
        """x [B,T,D] -> f32 [B,T] (per_token) or [B] at the last index with mask != 0."""
        cfg = self.config
        pdt = jnp.dtype(cfg.param_dtype)
        # std 1/sqrt(D+1), zero bias: the reward-head init of Stiennon et al. (2020).
        init = _normal((cfg.d_model + 1) ** -0.5)
        kernel = self.param(
            "kernel", nn.with_logical_partitioning(init, ("embed", None)), (cfg.d_model, 1), pdt
        )
        bias = self.param(
            "bias", nn.with_logical_partitioning(nn.initializers.zeros, (None,)), (1,), pdt
        )
        values = jnp.einsum("btd,do->bt", x.astype(jnp.float32), kernel.astype(jnp.float32))
        values = values + bias.astype(jnp.float32)[0]
        if per_token:
            return values
        # Fully padded rows read index T-1: finite, meaningless, to be masked by the caller.
        last = mask.shape[1] - 1 - jnp.argmax((mask != 0)[:, ::-1], axis=1)
        return jnp.take_along_axis(values, last[:, None], axis=1)[:, 0]


class Transformer(nn.Module):
    """Decoder-only transformer with an LM head ("lm") or a scalar head ("scalar")."""

    config: ModelConfig
    head: str = "lm"

    @nn.compact
    def __call__(
        self,
        tokens: jax.Array,
        positions: jax.Array,
        mask: jax.Array,
        *,
        deterministic: bool = True,
        per_token: bool = False,
        cache: Cache | None = None,
        last_only: bool = False,
        hidden_only: bool = False,
    ):
        """tokens/positions/mask int32 [B,T]; mask 0 = pad, >0 = segment id.

        Query i attends key j iff j <= i and mask[j] == mask[i] != 0 (with a cache, i and j are
        cache slots; the T new tokens go to slots index..index+T-1).
        Returns head="lm": logits f32 [B,T,V] ([B,V] at index T-1 if last_only);
        head="scalar": f32 [B] at the last index with mask != 0, or [B,T] if per_token.
        hidden_only: the final-norm output [B,T,D] instead (no cache; `lm_logits` of it are
        the logits, e.g. a chunk of positions at a time). With `cache`: (out, new_cache).
        """
        cfg = self.config
        if self.head not in ("lm", "scalar"):
            raise ValueError(f"Transformer.head: {self.head!r} not in ('lm', 'scalar')")
        tokens, positions, mask = (jnp.asarray(a, jnp.int32) for a in (tokens, positions, mask))
        t = tokens.shape[1]
        if cache is None:
            index, kv_mask = 0, mask
            q_slot = k_slot = jnp.arange(t)
        else:
            index = cache["index"]
            kv_mask = lax.dynamic_update_slice(cache["mask"], mask, (0, index))
            q_slot, k_slot = index + jnp.arange(t), jnp.arange(kv_mask.shape[1])
        attn_mask = (
            (k_slot[None, None, :] <= q_slot[None, :, None])
            & (kv_mask[:, None, :] == mask[:, :, None])
            & (mask[:, :, None] != 0)
        )  # [B,T,S]

        embed = Embed(cfg, name="embed")
        x = embed(tokens, positions)
        x = nn.Dropout(cfg.dropout)(x, deterministic=deterministic)
        x = nn.with_logical_constraint(x, ("batch", "length", "act_embed"))
        new_layers = []
        if cache is None and not self.is_initializing():
            x = self._scan_blocks(x, positions, attn_mask, deterministic)
        else:
            block_cls = nn.remat(Block) if cfg.remat else Block
            for i in range(cfg.num_layers):
                layer_cache = None if cache is None else cache["layers"][i]
                x, layer_cache = block_cls(cfg, deterministic, name=f"block_{i}")(
                    x, positions, attn_mask, layer_cache, index
                )
                new_layers.append(layer_cache)
        x = Norm(cfg, name="final_norm")(x)
        if hidden_only and cache is None:
            return x

        if self.head == "lm":
            if last_only:
                x = x[:, -1:]
            if cfg.tie_embeddings:
                out = embed.attend(x)
            else:
                kernel = self.param(
                    "unembed",
                    nn.with_logical_partitioning(_normal(0.02), ("embed", "vocab")),
                    (cfg.d_model, cfg.vocab_size),
                    jnp.dtype(cfg.param_dtype),
                )
                out = jnp.einsum(
                    "btd,dv->btv", x, kernel.astype(x.dtype), preferred_element_type=jnp.float32
                )
            out = nn.with_logical_constraint(out, ("batch", "length", "act_vocab"))
            out = out[:, 0] if last_only else out
        else:
            out = ScalarHead(cfg, name="head")(x, mask, per_token)
        if cache is None:
            return out
        return out, {"index": index + t, "mask": kv_mask, "layers": tuple(new_layers)}

    def _scan_blocks(self, x, positions, attn_mask, deterministic):
        """The blocks as one lax.scan over their stacked block_{i} params (no-cache path).

        Same params and numbers as the per-block loop used by init and cached decoding. The
        scan keeps XLA from fusing the residual-stream gradients of all later layers into each
        layer's backward, which recomputes them per layer (quadratic in depth; ~20% of a CPU
        train step at 6 layers), and compiles one block instead of L. Costs one stacked copy
        of the block params per call.
        """
        cfg = self.config
        params = nn.unbox(self.variables["params"])
        per_layer = [params[f"block_{i}"] for i in range(cfg.num_layers)]
        stacked = jax.tree.map(lambda *p: jnp.stack(p), *per_layer)
        rngs = None
        if not deterministic and (cfg.dropout > 0 or cfg.attention_dropout > 0):
            rngs = jax.random.split(self.make_rng("dropout"), cfg.num_layers)
        block = Block(cfg, deterministic)

        def body(x, layer):
            p, rng = layer
            dropout_rng = None if rng is None else {"dropout": rng}
            y, _ = block.apply({"params": p}, x, positions, attn_mask, None, 0, rngs=dropout_rng)
            return y, None

        # remat=True saves only each block's input. Otherwise matmul outputs are saved and the
        # elementwise work (softmax, GELU, norms) is recomputed in the backward pass: less
        # memory than saving everything, and faster on CPU (~15% per train step) because the
        # big [B,H,T,S] residuals are never written out.
        policy = None if cfg.remat else jax.checkpoint_policies.dots_with_no_batch_dims_saveable
        body = jax.checkpoint(body, prevent_cse=False, policy=policy)
        x, _ = lax.scan(body, x, (stacked, rngs))
        return x


def lm_logits(config: ModelConfig, params: Any, x: jax.Array) -> jax.Array:
    """The LM head of `Transformer` on hidden states x [B,T,D] (its `hidden_only` output):
    logits f32 [B,T,V], the same operations as the model's own head."""
    if config.tie_embeddings:
        table = nn.unbox(params["embed"]["token"]).astype(x.dtype)
        return jnp.einsum("btd,vd->btv", x, table, preferred_element_type=jnp.float32)
    kernel = nn.unbox(params["unembed"]).astype(x.dtype)
    return jnp.einsum("btd,dv->btv", x, kernel, preferred_element_type=jnp.float32)
