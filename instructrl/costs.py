"""Analytic costs of a model from its config alone: parameter counts, model FLOPs, and
per-device bytes of activations, weights and the KV cache on a (data, fsdp, tensor) mesh;
and the chips they are set against. `instructrl.plan` builds its reports on these."""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp

from instructrl.models import ModelConfig

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    peak_flops: float  # dense bf16 FLOP/s per chip
    hbm_gib: float
    hbm_bytes_per_s: float


CHIPS = {
    "v4": Chip("TPU v4", 275e12, 32, 1.23e12),
    "v5e": Chip("TPU v5e", 197e12, 16, 0.82e12),
    "v5p": Chip("TPU v5p", 459e12, 95, 2.77e12),
    "h100": Chip("H100 SXM", 989e12, 80, 3.35e12),
    "h200": Chip("H200 SXM", 989e12, 139, 4.8e12),  # H100 compute; 141 GB HBM3e, ~139 GiB usable
}


def param_count(mc: ModelConfig, head: str = "lm") -> int:
    """Parameters of Transformer(mc, head), from the formula (tests check it against the model)."""
    d, f = mc.d_model, mc.d_ff
    hd, kd = mc.num_heads * mc.dim_head, mc.kv_heads * mc.dim_head
    norm = d * (1 if mc.norm == "rmsnorm" else 2)
    n_mlp, bias = (3 if mc.mlp == "swiglu" else 2), int(mc.use_bias)
    layer = d * (2 * hd + 2 * kd) + n_mlp * d * f + 2 * norm
    layer += bias * (hd + 2 * kd + d + (n_mlp - 1) * f + d)  # q, k, v, o, up (+ gate), down
    layer += int(mc.qkv_bias) * (hd + 2 * kd)
    layer += int(mc.qk_norm) * 2 * mc.dim_head * (1 if mc.norm == "rmsnorm" else 2)
    total = mc.vocab_size * d + (mc.max_len * d if mc.position == "learned" else 0)
    total += mc.num_layers * layer + norm
    if head == "scalar":
        return total + d + 1
    return total + (0 if mc.tie_embeddings else d * mc.vocab_size)


def block_matmul_params(mc: ModelConfig) -> int:
    hd, kd = mc.num_heads * mc.dim_head, mc.kv_heads * mc.dim_head
    return mc.d_model * (2 * hd + 2 * kd) + (3 if mc.mlp == "swiglu" else 2) * mc.d_model * mc.d_ff


def forward_flops(mc: ModelConfig, tokens: int, kv_len: int, head: str = "lm") -> float:
    """Model FLOPs of a forward over `tokens` tokens that each attend `kv_len` keys: 2 per
    multiply-add of every weight matmul (the unembedding for head="lm"), plus QK^T and PV."""
    matmul = mc.num_layers * block_matmul_params(mc)
    matmul += mc.d_model * (mc.vocab_size if head == "lm" else 1)
    attention = 4 * mc.num_layers * kv_len * mc.num_heads * mc.dim_head
    return float(tokens) * (2 * matmul + attention)


def _split(n: int, parts: int) -> int:
    """Per-device extent of a dim split over `parts` devices (whole when it does not divide)."""
    return n // parts if n % parts == 0 else n


def activation_bytes(
    mc: ModelConfig,
    rows: int,
    seq: int,
    mesh: dict[str, int],
    *,
    train: bool,
    logits: bool,
    kv_len: int = 0,
    logit_positions: int = 0,
) -> dict[str, int]:
    """Estimated per-device activations of a forward (train: and backward) over [rows, seq]
    tokens, rows split over data x fsdp, heads/mlp/vocab over tensor.

    saved: kept for the backward (a rematerialised block keeps only its input); working: one
    block's intermediates (twice while its backward runs); logits: f32 logits and their
    softmax (and gradient). An estimate: XLA fuses some of these, keeps others longer.
    logit_positions > 0: logits of that many positions per row exist at once, not `seq`
    (PPO's logprob_chunk: [rows, chunk, V] per rematerialised chunk; its backward recomputes
    one chunk's logits, softmax and gradient, the same 3 copies).
    """
    tp, s, f32 = mesh["tensor"], jnp.dtype(mc.dtype).itemsize, 4
    b = math.ceil(rows / (mesh["data"] * mesh["fsdp"]))
    t, h, k = b * seq, _split(mc.num_heads, tp), _split(mc.kv_heads, tp)
    block = (
        t * mc.dim_head * (2 * h + 2 * k) * s  # q, k, v, attention output
        + b * h * seq * (kv_len or seq) * (2 * f32 + s)  # f32 scores and probs, probs in dtype
        + t * _split(mc.d_ff, tp) * s * (3 if mc.mlp == "swiglu" else 2)  # MLP hidden (+ gate)
        + t * mc.d_model * (2 * f32 + 3 * s)  # f32 norm statistics, residual stream
    )
    saved = mc.num_layers * (t * mc.d_model * s if mc.remat else block) if train else 0
    logit_rows = b * (logit_positions or seq)
    logit = logit_rows * _split(mc.vocab_size, tp) * f32 * (3 if train else 2) if logits else 0
    return {"saved": saved, "working": block * (2 if train else 1), "logits": logit}


def weight_bytes(mc: ModelConfig, mesh: dict[str, int]) -> int:
    """Block weights a forward materialises per device: the stacked copy of every block's
    params that the layer scan makes (transformer.py `_scan_blocks`), plus one block gathered
    over fsdp in the compute dtype, double-buffered."""
    n = block_matmul_params(mc)
    stacked = mc.num_layers * n * jnp.dtype(mc.param_dtype).itemsize
    stacked //= mesh["fsdp"] * mesh["tensor"]
    return stacked + 2 * n * jnp.dtype(mc.dtype).itemsize // mesh["tensor"]


def kv_cache_bytes(mc: ModelConfig, rows: int, length: int, mesh: dict[str, int]) -> int:
    """Per-device KV cache of the sampler: k and v [B, K, S, Dh] per layer in the compute dtype."""
    b = math.ceil(rows / (mesh["data"] * mesh["fsdp"]))
    per_layer = 2 * b * _split(mc.kv_heads, mesh["tensor"]) * length * mc.dim_head
    return mc.num_layers * per_layer * jnp.dtype(mc.dtype).itemsize


def combine_passes(*passes: dict[str, int]) -> int:
    """Passes of one program whose saved activations and logits all live until the backward;
    one working set at a time."""
    return sum(p["saved"] + p["logits"] for p in passes) + max(p["working"] for p in passes)
