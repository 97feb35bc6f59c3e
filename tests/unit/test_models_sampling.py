"""KV-cache decoding and sampling against full forwards and exact filtered distributions."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from instructrl.models import (
    ModelConfig,
    Transformer,
    filter_logits,
    init_cache,
    positions_from_mask,
    response_logprobs,
    sample_jit,
    sampling,
)
from tests.unit.test_models_transformer import STYLES, make_params, rand_tokens

# Left-padded prompts; row 1 uses segment id 2, which generated tokens must continue.
PROMPT_MASK = jnp.array([[0, 0, 0, 1, 1, 1], [2, 2, 2, 2, 2, 2], [0, 0, 0, 0, 0, 1]], jnp.int32)
SEGMENT = PROMPT_MASK[:, -1:]
N_NEW = 6


@pytest.fixture(scope="module", params=sorted(STYLES))
def lm(request):
    model, params = make_params(STYLES[request.param])
    fwd = jax.jit(lambda p, t, pos, m: model.apply({"params": p}, t, pos, m))
    return model, params, fwd


def np_log_softmax(x):
    x = np.asarray(x, np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def full_forward_logits(fwd, params, prompt, prompt_mask, response, response_mask):
    """Logits [B,N,V] predicting each response token, from ONE full forward of prompt+response."""
    tokens = jnp.concatenate([prompt, response], axis=1)
    mask = jnp.concatenate([prompt_mask, response_mask * prompt_mask[:, -1:]], axis=1)
    logits = fwd(params, tokens, positions_from_mask(mask), mask)
    p = prompt.shape[1]
    return np.asarray(logits[:, p - 1 : p - 1 + response.shape[1]])


# ---------------------------------------------------------------- filtering


def np_filter(logits, top_k, top_p):
    """Naive float64 top-k then top-p keep-set per row."""
    keep = np.ones(logits.shape, bool)
    for b, row in enumerate(np.asarray(logits, np.float64)):
        if top_k:
            keep[b] = row >= np.sort(row)[::-1][top_k - 1]
        probs = np.where(keep[b], np.exp(row - row.max()), 0.0)
        probs /= probs.sum()
        mass = 0.0
        nucleus = np.zeros_like(keep[b])
        for i in np.argsort(-probs, kind="stable"):
            if keep[b, i] and (mass < top_p or not nucleus.any()):
                nucleus[i] = True
                mass += probs[i]
        keep[b] &= nucleus | (probs >= probs[nucleus].min())  # ties at the boundary are kept
    return keep


@pytest.mark.parametrize(
    "top_k,top_p", [(0, 1.0), (3, 1.0), (0, 0.5), (5, 0.8), (0, 1e-6), (1, 0.9), (16, 0.95)]
)
def test_filter_logits_against_numpy(top_k, top_p):
    logits = np.random.default_rng(top_k).normal(0, 2, (8, 16)).astype(np.float32)
    logits[0, :4] = 3.0  # a tie at the top
    got = np.isfinite(filter_logits(jnp.asarray(logits), top_k=top_k, top_p=top_p))
    np.testing.assert_array_equal(got, np_filter(logits, top_k, top_p))
    with pytest.raises(ValueError, match="top_p"):
        filter_logits(jnp.asarray(logits), top_p=0.0)


def controlled_model(logits_row):
    """A model whose logits are `logits_row` [V] for every input (final norm scale 0, bias e_0)."""
    v = len(logits_row)
    cfg = ModelConfig(
        vocab_size=v, max_len=16, num_layers=1, d_model=v, num_heads=2, d_ff=8, tie_embeddings=False
    )
    model, params = make_params(cfg)
    params = dict(params)
    params["final_norm"] = {"scale": jnp.zeros(v), "bias": jnp.zeros(v).at[0].set(1.0)}
    params["unembed"] = jnp.zeros((v, v)).at[0].set(jnp.asarray(logits_row, jnp.float32))
    return model, params


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (1.3, 0, 0.7), (0.8, 5, 0.8)])
def test_sample_frequencies_match_filtered_distribution(temperature, top_k, top_p):
    logits = np.array([2.0, 1.5, 1.0, 0.9, 0.5, 0.0, -0.5, -1.0])
    model, params = controlled_model(logits)
    b, n = 1000, 4
    prompts = jnp.ones((b, 2), jnp.int32)
    out = sample_jit(
        model,
        params,
        prompts,
        prompts,
        jax.random.key(1),
        max_new_tokens=n,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
    )
    scaled = logits / temperature
    keep = np_filter(scaled[None], top_k, top_p)[0]
    want = np.where(keep, np.exp(scaled - scaled.max()), 0.0)
    want /= want.sum()
    freq = np.bincount(np.asarray(out.tokens).ravel(), minlength=len(logits)) / (b * n)
    assert np.all(freq[~keep] == 0)
    tol = 5 * np.sqrt(want * (1 - want) / (b * n)) + 1e-9  # 5 sigma per token
    assert np.all(np.abs(freq - want) <= tol), (freq, want)
    # Log-probs come from the full (unfiltered) temperature-scaled distribution.
    np.testing.assert_allclose(
        out.logprobs, np_log_softmax(scaled)[np.asarray(out.tokens)], rtol=1e-5
    )
    assert np.all(np.asarray(out.mask) == 1)


def test_greedy_stops_every_row_early():
    model, params = controlled_model(np.array([0.0, 3.0, 1.0, 2.0]))
    prompts = jnp.ones((3, 2), jnp.int32)
    out = sample_jit(
        model,
        params,
        prompts,
        prompts,
        jax.random.key(0),
        max_new_tokens=5,
        greedy=True,
        stop_token=1,
        pad_id=2,
    )
    np.testing.assert_array_equal(out.tokens, [[1, 2, 2, 2, 2]] * 3)
    np.testing.assert_array_equal(out.mask, [[1, 0, 0, 0, 0]] * 3)
    np.testing.assert_allclose(
        out.logprobs[:, 0], np_log_softmax(np.array([0.0, 3.0, 1.0, 2.0]))[1], rtol=1e-6
    )
    np.testing.assert_array_equal(out.logprobs[:, 1:], 0)


# ---------------------------------------------------------------- KV cache and decoding


def test_kv_cache_decode_matches_full_forward(lm):
    model, params, fwd = lm
    prompt = rand_tokens(0, PROMPT_MASK.shape)
    response = rand_tokens(1, (3, N_NEW))
    full_mask = jnp.concatenate([PROMPT_MASK, jnp.ones((3, N_NEW), jnp.int32) * SEGMENT], axis=1)
    tokens = jnp.concatenate([prompt, response], axis=1)
    positions = positions_from_mask(full_mask)
    want = np.asarray(fwd(params, tokens, positions, full_mask))

    step = jax.jit(lambda p, t, pos, m, c: model.apply({"params": p}, t, pos, m, cache=c))
    p_len = prompt.shape[1]
    cache = init_cache(model.config, 3, p_len + N_NEW)
    logits, cache = step(params, prompt, positions[:, :p_len], PROMPT_MASK, cache)
    real = np.asarray(PROMPT_MASK) != 0
    np.testing.assert_allclose(
        np.asarray(logits)[real], want[:, :p_len][real], rtol=1e-5, atol=1e-5
    )
    for i in range(N_NEW):
        sl = slice(p_len + i, p_len + i + 1)
        logits, cache = step(params, tokens[:, sl], positions[:, sl], full_mask[:, sl], cache)
        np.testing.assert_allclose(logits[:, 0], want[:, sl][:, 0], rtol=1e-5, atol=1e-5)
    assert int(cache["index"]) == p_len + N_NEW


@pytest.mark.parametrize("decode_segment", [32, 2])  # one decoding loop; loops of 2 tokens
def test_greedy_equals_argmax_rollout_and_stop(lm, decode_segment):
    model, params, fwd = lm
    prompt = rand_tokens(2, PROMPT_MASK.shape)
    # Naive rollout: one full forward per new token over a fixed-size right-padded buffer.
    p_len = prompt.shape[1]
    tokens = jnp.concatenate([prompt, jnp.zeros((3, N_NEW), jnp.int32)], axis=1)
    mask = jnp.concatenate([PROMPT_MASK, jnp.zeros((3, N_NEW), jnp.int32)], axis=1)
    want_lp = []
    for i in range(N_NEW):
        logits = fwd(params, tokens, positions_from_mask(mask), mask)[:, p_len - 1 + i]
        tokens = tokens.at[:, p_len + i].set(jnp.argmax(logits, -1))
        mask = mask.at[:, p_len + i].set(SEGMENT[:, 0])
        want_lp.append(np_log_softmax(logits)[np.arange(3), np.argmax(logits, -1)])
    greedy, want_lp = np.asarray(tokens[:, p_len:]), np.stack(want_lp, 1)

    # Stop at the token row 0 emits third: each row is cut after its first occurrence of it
    # (rows without one run to the end and must equal the rollout throughout).
    stop = int(greedy[0, 2])
    pad_id = 63 if stop != 63 else 62
    out = sample_jit(
        model,
        params,
        prompt,
        PROMPT_MASK,
        jax.random.key(0),
        max_new_tokens=N_NEW,
        greedy=True,
        stop_token=stop,
        pad_id=pad_id,
        decode_segment=decode_segment,
    )
    ends = []
    for row in range(3):
        hits = np.flatnonzero(greedy[row] == stop)
        end = hits[0] + 1 if len(hits) else N_NEW
        ends.append(end)
        np.testing.assert_array_equal(out.tokens[row, :end], greedy[row, :end])
        np.testing.assert_allclose(
            out.logprobs[row, :end], want_lp[row, :end], rtol=1e-5, atol=1e-6
        )
        np.testing.assert_array_equal(out.tokens[row, end:], pad_id)
        np.testing.assert_array_equal(out.mask[row], np.arange(N_NEW) < end)
        np.testing.assert_array_equal(out.logprobs[row, end:], 0)
    assert ends[0] <= 3  # the stop really cut row 0


@pytest.mark.parametrize("decode_segment", [32, 2])
def test_sampled_logprobs_equal_full_forward(lm, decode_segment):
    model, params, fwd = lm
    prompt = rand_tokens(3, PROMPT_MASK.shape)
    temperature = 0.7
    kw = dict(max_new_tokens=N_NEW, top_k=8, top_p=0.9, stop_token=5, decode_segment=decode_segment)
    out = sample_jit(
        model, params, prompt, PROMPT_MASK, jax.random.key(3), temperature=temperature, **kw
    )
    logits = full_forward_logits(fwd, params, prompt, PROMPT_MASK, out.tokens, out.mask)
    want = np_log_softmax(logits / temperature)
    want = np.take_along_axis(want, np.asarray(out.tokens)[..., None], -1)[..., 0] * np.asarray(
        out.mask
    )
    np.testing.assert_allclose(out.logprobs, want, rtol=1e-5, atol=1e-5)
    ranks = (logits > np.take_along_axis(logits, np.asarray(out.tokens)[..., None], -1)).sum(-1)
    assert np.all(ranks[np.asarray(out.mask) == 1] < 8)  # top-k was applied
    got = jax.jit(response_logprobs, static_argnums=0)(
        model, params, prompt, PROMPT_MASK, out.tokens, out.mask, temperature
    )
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_sampler_compiles_once_per_shape():
    model, params = controlled_model(np.array([0.0, 1.0, 0.5, 0.2]))
    prompts = jnp.ones((2, 3), jnp.int32)
    args = (model, params, prompts, prompts)
    kw = dict(max_new_tokens=3, top_k=3)
    first = sample_jit(*args, jax.random.key(0), temperature=1.0, **kw)
    size = sample_jit._cache_size()
    second = sample_jit(*args, jax.random.key(1), temperature=0.5, **kw)
    third = sample_jit(*args, jax.random.key(0), temperature=1.0, **kw)
    assert sample_jit._cache_size() == size
    np.testing.assert_array_equal(first.tokens, third.tokens)
    assert not np.array_equal(first.logprobs, second.logprobs)
    sample_jit(*args, jax.random.key(0), **dict(kw, max_new_tokens=1))
    assert sample_jit._cache_size() == size + 1


@pytest.mark.parametrize("style", sorted(STYLES))
def test_bf16_sampling_matches_an_f32_forward(style):
    """bf16 compute (f32 params): each sampled token's log-prob, as the KV-cache sampler
    reports it, matches an f32 full forward of the same params over the same tokens to bf16
    accuracy (the f32 sampler matches to 1e-5; garbage is off by nats)."""
    model, params = make_params(dataclasses.replace(STYLES[style], num_layers=1))
    fwd = jax.jit(lambda p, t, pos, m: model.apply({"params": p}, t, pos, m))
    bf16 = Transformer(dataclasses.replace(model.config, dtype="bfloat16"))
    prompt = rand_tokens(5, PROMPT_MASK.shape)
    temperature = 0.8
    out = sample_jit(
        bf16,
        params,
        prompt,
        PROMPT_MASK,
        jax.random.key(0),
        max_new_tokens=N_NEW,
        temperature=temperature,
        stop_token=7,
    )
    assert out.tokens.shape == (3, N_NEW) and out.logprobs.dtype == jnp.float32
    mask = np.asarray(out.mask)
    logits = full_forward_logits(fwd, params, prompt, PROMPT_MASK, out.tokens, out.mask)
    want = np_log_softmax(logits / temperature)
    want = np.take_along_axis(want, np.asarray(out.tokens)[..., None], -1)[..., 0] * mask
    got = np.asarray(out.logprobs)
    assert mask.sum() >= 2 * N_NEW and np.all(got[mask == 0] == 0)
    np.testing.assert_allclose(got, want, atol=0.1)  # bf16: ~3 significant digits per op
    assert np.abs(got - want)[mask > 0].mean() < 0.03
    assert np.abs(want[mask > 0]).mean() > 1.0  # the log-probs themselves are not near 0


@pytest.mark.parametrize("v,block", [(5, 128), (300, 128), (1000, 16), (8192, 128)])
def test_inverse_cdf_vs_numpy_float64(v, block):
    """The two-level inverse CDF picks the token a float64 cumulative sum picks, for every
    draw not within rounding of a boundary; zero-probability tokens are never picked, even
    at u = 0 or u -> 1, and a row with one possible token always gets it."""
    rng = np.random.default_rng(v)
    b = 64
    p = rng.random((b, v)) ** 4
    p[rng.random((b, v)) < 0.3] = 0.0  # banned tokens, whole blocks included
    p[0, :] = 0.0
    p[0, v // 2] = 1.0  # one possible token
    p[1, : min(v, 2 * block)] = 0.0  # leading empty blocks
    p[1, -1] = max(p[1, -1], 0.5)
    u = rng.random((b, 1))
    u[2], u[3], u[4] = 0.0, 1.0 - 2**-24, 0.5
    got = np.asarray(
        sampling.inverse_cdf(jnp.asarray(p, jnp.float32), jnp.asarray(u, jnp.float32), block)
    )
    p32 = p.astype(np.float32).astype(np.float64)
    cdf = np.cumsum(p32, axis=-1)
    target = u * cdf[:, -1:]
    want = np.argmax((cdf > target) & (p32 > 0), axis=-1)
    gap = np.min(np.abs(cdf - target), axis=-1) / cdf[:, -1]
    clear = gap > 1e-5
    assert clear.sum() > b // 2
    np.testing.assert_array_equal(got[clear], want[clear])
    assert np.all(p32[np.arange(b), got] > 0)
    assert got[0] == v // 2
    assert got[3] == np.flatnonzero(p32[3])[-1] or clear[3]


def test_decode_segments_cover_every_token_once():
    for n in (1, 5, 31, 32, 33, 70, 128, 1000):
        ends = sampling.decode_segments(n)
        assert ends[-1] == n and ends == sorted(set(ends)) and len(ends) <= 4, (n, ends)
        assert ends[0] >= min(n, 32)
    assert sampling.decode_segments(24) == [24]  # short responses: one loop, as before
    assert sampling.decode_segments(128) == [32, 64, 96, 128]
    assert sampling.decode_segments(6, 2) == [2, 4, 6]
