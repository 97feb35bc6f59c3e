"""Rotary position embeddings: the inverse frequencies (plain, or rescaled by Llama-3's
"llama3" rule) and their application in the HF "rotate_half" layout. Used by
models/transformer.py; kept apart so the model file stays one screenful per module.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp

if TYPE_CHECKING:
    from instructrl.models.transformer import ModelConfig


def rope_inv_freq(config: ModelConfig) -> jax.Array:
    """RoPE's inverse frequencies f32 [Dh/2], rescaled for rope_scaling="llama3".

    The llama3 rule (as transformers' `_compute_llama3_parameters`, in f32): with wavelength
    w = 2 pi / f and L = rope_original_max_len, keep f where w < L / high_freq_factor, use
    f / factor where w > L / low_freq_factor, and in between (1 - s) f / factor + s f with
    s = (L / w - low_freq_factor) / (high_freq_factor - low_freq_factor).
    """
    dh = config.dim_head
    inv_freq = 1.0 / (config.rope_theta ** (jnp.arange(0, dh, 2, dtype=jnp.float32) / dh))
    if config.rope_scaling == "none":
        return inv_freq
    factor, old_len = config.rope_factor, config.rope_original_max_len
    low, high = config.rope_low_freq_factor, config.rope_high_freq_factor
    # scalar / tensor written as torch evaluates it (reciprocal, then multiply).
    wavelen = (1.0 / inv_freq) * (2 * math.pi)
    scaled = jnp.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = ((1.0 / wavelen) * old_len - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return jnp.where(medium, smoothed, scaled)


def apply_rope(
    x: jax.Array, positions: jax.Array, theta: float, inv_freq: jax.Array | None = None
) -> jax.Array:
    """Rotary embedding on x [B,T,N,Dh] at positions [B,T], HF "rotate_half" layout.

    Dimension i pairs with i + Dh/2 (first half / second half), not interleaved pairs.
    inv_freq [Dh/2] (see `rope_inv_freq`) replaces the plain frequencies of base `theta`.
    """
    dh = x.shape[-1]
    if inv_freq is None:
        inv_freq = 1.0 / (theta ** (jnp.arange(0, dh, 2, dtype=jnp.float32) / dh))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B,T,Dh/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(emb).astype(x.dtype), jnp.sin(emb).astype(x.dtype)
    x1, x2 = x[..., : dh // 2], x[..., dh // 2 :]
    return x * cos + jnp.concatenate([-x2, x1], axis=-1) * sin
