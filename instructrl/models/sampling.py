"""Autoregressive sampling with a KV cache, and log-probs of given tokens.

`sample` is pure and traceable: call it inside your own jit (the PPO rollout does), or use
`sample_jit`, which compiles once per (model, shapes, static settings). The prompt is
prefilled in one forward pass, then a `lax.while_loop` decodes one token per step (stopping
early once every row has emitted `stop_token`).

Log-probs: every sampled token's log-prob is taken from the FULL temperature-scaled
distribution log_softmax(logits / temperature), before top-k/top-p filtering, so it equals
what `sequence_logprobs` computes at the same temperature (PPO's policy/reference log-probs).
Greedy decoding reports temperature-1 log-probs.

Not here: the model itself (transformer.py), PPO rewards and losses.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from instructrl.models.transformer import Transformer, init_cache, positions_from_mask

__all__ = [
    "SampleOutput",
    "filter_logits",
    "init_cache",
    "response_logprobs",
    "sample",
    "sample_jit",
    "sequence_logprobs",
]


class SampleOutput(NamedTuple):
    tokens: jax.Array  # [B,N] int32; pad_id after a row's stop token
    logprobs: jax.Array  # [B,N] f32 log_softmax(logits / temperature) at tokens; 0 where mask == 0
    mask: jax.Array  # [B,N] int32; 1 up to and including the stop token


def _check_filter(top_k: int, top_p: float) -> None:
    if top_k < 0 or not 0.0 < top_p <= 1.0:
        raise ValueError(f"sampling: need top_k >= 0 and 0 < top_p <= 1, got {top_k}, {top_p}")


def filter_logits(logits: jax.Array, *, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
    """Sets logits outside the top-k / nucleus set to -inf. logits f32 [..., V].

    top_k keeps the k largest (all tokens tied with the k-th are kept); 0 = off.
    top_p then keeps the smallest prefix of tokens sorted by probability (softmax of the
    top-k-filtered logits) whose mass reaches top_p, at least one token, and every token tied
    with the last one kept; 1.0 = off.
    Apply after dividing by the temperature (the nucleus depends on it).
    """
    _check_filter(top_k, top_p)
    neg_inf = jnp.array(-jnp.inf, logits.dtype)
    if 0 < top_k < logits.shape[-1]:
        kth = lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, neg_inf, logits)
    if top_p < 1.0:
        logits = jnp.where(
            _nucleus(jax.nn.softmax(logits.astype(jnp.float32), axis=-1), top_p), logits, neg_inf
        )
    return logits


def _nucleus(probs: jax.Array, top_p: float) -> jax.Array:
    """Bool [..., V]: probs >= tau, tau the smallest value with mass(probs > tau) < top_p.

    That is the sorted-prefix nucleus (ties included). tau is found by bisection on the bit
    patterns of non-negative f32 values, which order like the values: 31 masked sums over the
    vocabulary instead of sorting it (a full sort costs ~10 ms per step at V=8192 on a CPU).
    """
    bits_shape = (*probs.shape[:-1], 1)
    # Invariant: the answer lies in [lo, hi] and the predicate holds at hi (mass above max = 0).
    lo = jnp.ones(bits_shape, jnp.int32)  # smallest positive float: tokens with p = 0 never kept
    hi = jnp.max(lax.bitcast_convert_type(probs, jnp.int32), axis=-1, keepdims=True)

    def halve(_, bounds):
        lo, hi = bounds
        mid = lo + (hi - lo) // 2
        tau = lax.bitcast_convert_type(mid, jnp.float32)
        ok = jnp.sum(jnp.where(probs > tau, probs, 0.0), axis=-1, keepdims=True) < top_p
        return jnp.where(ok, lo, mid + 1), jnp.where(ok, mid, hi)

    _, hi = lax.fori_loop(0, 31, halve, (jnp.minimum(lo, hi), hi))
    return probs >= lax.bitcast_convert_type(hi, jnp.float32)


def _draw(key: jax.Array, logits: jax.Array) -> jax.Array:
    """One token per row from softmax(logits [B,V]) by inverse CDF: one uniform per row.

    On a CPU this is several times cheaper than Gumbel-max (V random numbers and 2V logs per
    row). Tokens with logit -inf (probability 0) are never drawn.
    """
    p = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))
    u = jax.random.uniform(key, (*p.shape[:-1], 1), p.dtype)
    return inverse_cdf(p, u)


def inverse_cdf(p: jax.Array, u: jax.Array, block: int = 128) -> jax.Array:
    """The first index i with cdf[i] > u * cdf[-1] and p[i] > 0, per row of p [B,V] >= 0
    (u [B,1] in [0, 1)); if rounding leaves none, the last index with p > 0.

    Two levels instead of one cumulative sum over V: the sums of blocks of `block` entries
    are accumulated, the block holding u is picked, and only its entries are accumulated.
    XLA:CPU runs a cumsum over [B, V] as a reduce-window costing ~4% (batch 8) to 6%
    (batch 64) of a decoding step at V = 8192; this is 2 x V adds and a [B, block] cumsum.
    """
    b, v = p.shape
    nb = -(-v // block)
    blocks = jnp.pad(p, ((0, 0), (0, nb * block - v))).reshape(b, nb, block)
    ends = jnp.cumsum(jnp.sum(blocks, axis=-1), axis=-1)  # [B, nb]
    target = u * ends[:, -1:]
    # First block whose running total passes the target (it has mass: an empty block does
    # not raise the total); none only through rounding, then the last block with mass.
    hit_block = ends > target
    has_mass = jnp.sum(blocks, axis=-1) > 0
    last_block = nb - 1 - jnp.argmax(has_mass[:, ::-1], axis=-1)
    j = jnp.where(jnp.any(hit_block, axis=-1), jnp.argmax(hit_block, axis=-1), last_block)
    inside = jnp.take_along_axis(blocks, j[:, None, None], axis=1)[:, 0]  # [B, block]
    before = jnp.take_along_axis(ends, jnp.maximum(j - 1, 0)[:, None], axis=1)
    before = jnp.where(j[:, None] > 0, before, 0.0)  # [B, 1]
    cdf = before + jnp.cumsum(inside, axis=-1)
    hit = (cdf > target) & (inside > 0)
    last = block - 1 - jnp.argmax((inside > 0)[:, ::-1], axis=-1)
    return j * block + jnp.where(jnp.any(hit, axis=-1), jnp.argmax(hit, axis=-1), last)


def _choose(logits, key, temperature, top_k, top_p, greedy):
    """logits f32 [B,V] -> (token int32 [B], logprob f32 [B] from the unfiltered distribution)."""
    if greedy:
        token = jnp.argmax(logits, axis=-1)
        scaled = logits
    else:
        scaled = logits / temperature
        token = _draw(key, filter_logits(scaled, top_k=top_k, top_p=top_p))
    logp = jax.nn.log_softmax(scaled, axis=-1)
    return token.astype(jnp.int32), jnp.take_along_axis(logp, token[:, None], axis=-1)[:, 0]


def _decoding_model(model: Transformer, params) -> tuple[Transformer, dict]:
    """For tied embeddings, an untied twin whose unembedding is the table transposed once.

    Same numbers; the per-step [B,D] x [D,V] product then reads the table in the layout
    XLA:CPU multiplies fastest (~8% of a decoding step at V=8192).
    """
    if not model.config.tie_embeddings:
        return model, params
    config = dataclasses.replace(model.config, tie_embeddings=False)
    params = {**params, "unembed": params["embed"]["token"].T}
    return Transformer(config, head=model.head), params


def sample(
    model: Transformer,
    params,
    prompt_tokens: jax.Array,
    prompt_mask: jax.Array,
    rng: jax.Array,
    *,
    max_new_tokens: int,
    temperature: float | jax.Array = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    greedy: bool = False,
    stop_token: int | None = None,
    pad_id: int = 0,
    decode_segment: int = 32,
) -> SampleOutput:
    """Samples `max_new_tokens` continuations of LEFT-padded prompts.

    prompt_tokens/prompt_mask int32 [B,P] (each row needs >= 1 real token; unpacked prompts).
    params: the model's (unboxed) "params" tree. Generated tokens continue each row's
    positions and segment id; pads are never attended to. Once a row emits `stop_token` it
    is done: later entries are pad_id with mask 0 and logprob 0. decode_segment: the shortest
    decoding loop (decode_segments); it changes speed, and the numbers only by rounding.
    Returns SampleOutput(tokens [B,N] int32, logprobs [B,N] f32, mask [B,N] int32).
    """
    if max_new_tokens < 1:
        raise ValueError(f"sample: max_new_tokens must be >= 1, got {max_new_tokens}")
    if isinstance(temperature, (int, float)) and not greedy and temperature <= 0:
        raise ValueError(f"sample: temperature must be > 0 (or greedy=True), got {temperature}")
    _check_filter(top_k, top_p)
    prompt_tokens = jnp.asarray(prompt_tokens, jnp.int32)
    prompt_mask = jnp.asarray(prompt_mask, jnp.int32)
    batch, p_len = prompt_tokens.shape
    n = max_new_tokens
    model, params = _decoding_model(model, params)
    variables = {"params": params}
    choose = functools.partial(
        _choose, temperature=temperature, top_k=top_k, top_p=top_p, greedy=greedy
    )

    positions = positions_from_mask(prompt_mask)
    ends = decode_segments(n, decode_segment)
    cache = init_cache(model.config, batch, p_len + ends[0] - 1)
    logits, cache = model.apply(
        variables, prompt_tokens, positions, prompt_mask, cache=cache, last_only=True
    )
    last_real = prompt_mask[:, -1] != 0
    segment = jnp.where(last_real, prompt_mask[:, -1], 1)
    first_pos = jnp.where(last_real, positions[:, -1] + 1, 0)

    def emit(state, i, logits):
        """Draws token i from logits [B,V] and writes it (or pad if the row is done)."""
        tokens, logprobs, mask, done = state
        token, logp = choose(logits, jax.random.fold_in(rng, i))
        valid = ~done
        token = jnp.where(valid, token, pad_id)
        if stop_token is not None:
            done = done | (token == stop_token)
        tokens = lax.dynamic_update_slice(tokens, token[:, None], (0, i))
        logprobs = lax.dynamic_update_slice(logprobs, jnp.where(valid, logp, 0.0)[:, None], (0, i))
        mask = lax.dynamic_update_slice(mask, valid.astype(jnp.int32)[:, None], (0, i))
        return tokens, logprobs, mask, done

    state = (
        jnp.full((batch, n), pad_id, jnp.int32),
        jnp.zeros((batch, n), jnp.float32),
        jnp.zeros((batch, n), jnp.int32),
        jnp.zeros((batch,), bool),
    )
    state = emit(state, 0, logits)

    def cond(carry, end):
        i, _, state = carry
        return (i < end) & ~jnp.all(state[3])

    def body(carry):
        i, cache, state = carry
        tokens, _, mask = state[:3]
        prev = lax.dynamic_slice(tokens, (0, i - 1), (batch, 1))
        prev_mask = lax.dynamic_slice(mask, (0, i - 1), (batch, 1)) * segment[:, None]
        pos = (first_pos + i - 1)[:, None]
        logits, cache = model.apply(variables, prev, pos, prev_mask, cache=cache, last_only=True)
        return i + 1, cache, emit(state, i, logits)

    # Token i (>= 1) is decoded with a cache of p_len + i slots in use; each segment's loop
    # holds only the slots its last token needs, so early tokens do not read empty ones.
    carry = (jnp.int32(1), cache, state)
    for end in ends:
        i, cache, state = carry
        carry = (i, grow_cache(cache, p_len + end - 1), state)
        carry = lax.while_loop(functools.partial(cond, end=end), body, carry)
    tokens, logprobs, mask, _ = carry[2]
    return SampleOutput(tokens, logprobs, mask)


def decode_segments(n: int, min_len: int = 32, max_segments: int = 4) -> list[int]:
    """Ends of the decoding loops for n new tokens: segments of max(min_len, n / max_segments)
    tokens (one loop when n <= min_len). Attention reads every slot of the cache it is given,
    so a loop per segment with a cache sized to that segment reads p + n/2 + segment/2 slots
    per token on average instead of p + n (cpu7m, batch 64, 32 + 128 tokens: the KV cache is
    ~80% of the bytes a decoding step reads). Each segment compiles its own loop body."""
    size = max(min_len, -(-n // max_segments))
    return [min(end, n) for end in range(size, n + size, size)]


def grow_cache(cache: dict, length: int) -> dict:
    """The KV cache with `length` slots: new slots empty (mask 0, never attended to)."""
    extra = length - cache["mask"].shape[1]
    if extra <= 0:
        return cache
    pad = lambda x, axis: jnp.pad(x, [(0, extra) if a == axis else (0, 0) for a in range(x.ndim)])  # noqa: E731
    layers = tuple({k: pad(v, 2) for k, v in layer.items()} for layer in cache["layers"])
    return {"index": cache["index"], "mask": pad(cache["mask"], 1), "layers": layers}


sample_jit = jax.jit(
    sample,
    static_argnums=(0,),
    static_argnames=(
        "max_new_tokens",
        "top_k",
        "top_p",
        "greedy",
        "stop_token",
        "pad_id",
        "decode_segment",
    ),
)
sample_jit.__doc__ = (
    "`sample` compiled once per (model, shapes, static settings); temperature is traced."
)


def sequence_logprobs(
    model: Transformer,
    params,
    tokens: jax.Array,
    positions: jax.Array,
    mask: jax.Array,
    targets: jax.Array,
    target_mask: jax.Array,
    temperature: float | jax.Array = 1.0,
) -> jax.Array:
    """Per-token log_softmax(logits / temperature)[targets] by one full forward pass.

    tokens/positions/mask/targets/target_mask [B,T]; targets[t] is predicted from logits[t].
    Returns f32 [B,T], 0 where target_mask == 0.
    """
    logits = model.apply({"params": params}, tokens, positions, mask) / temperature
    picked = jnp.take_along_axis(logits, jnp.asarray(targets, jnp.int32)[..., None], axis=-1)[
        ..., 0
    ]
    logp = picked - jax.nn.logsumexp(logits, axis=-1)
    return jnp.where(jnp.asarray(target_mask) != 0, logp, 0.0)


def response_logprobs(
    model: Transformer,
    params,
    prompt_tokens: jax.Array,
    prompt_mask: jax.Array,
    response_tokens: jax.Array,
    response_mask: jax.Array,
    temperature: float | jax.Array = 1.0,
) -> jax.Array:
    """Log-probs of right-padded responses [B,N] after LEFT-padded prompts [B,P], in one pass.

    Recomputes `sample`'s logprobs (same temperature) for PPO's policy and reference.
    Returns f32 [B,N], 0 where response_mask == 0.
    """
    prompt_mask = jnp.asarray(prompt_mask, jnp.int32)
    p_len = prompt_tokens.shape[1]
    segment = jnp.where(prompt_mask[:, -1:] != 0, prompt_mask[:, -1:], 1)
    tokens = jnp.concatenate([prompt_tokens, response_tokens], axis=1).astype(jnp.int32)
    mask = jnp.concatenate([prompt_mask, (jnp.asarray(response_mask) != 0) * segment], axis=1)
    # Response token j is predicted at index P-1+j; the last index predicts nothing we need.
    inputs, inputs_mask = tokens[:, :-1], mask[:, :-1]
    logp = sequence_logprobs(
        model,
        params,
        inputs,
        positions_from_mask(inputs_mask),
        inputs_mask,
        tokens[:, 1:],
        mask[:, 1:],
        temperature,
    )
    return logp[:, p_len - 1 :]
