"""Transformer: numpy float64 reference, masking (causal, padding, packing), heads, dtypes."""

import dataclasses
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from instructrl.models import ModelConfig, Transformer, init_scalar_from_lm, positions_from_mask

GPT = ModelConfig(vocab_size=64, max_len=32, num_layers=2, d_model=32, num_heads=4, d_ff=64)
LLAMA = ModelConfig(
    vocab_size=64,
    max_len=32,
    num_layers=2,
    d_model=32,
    num_heads=4,
    num_kv_heads=2,
    d_ff=48,
    position="rope",
    norm="rmsnorm",
    mlp="swiglu",
    use_bias=False,
    tie_embeddings=False,
    norm_eps=1e-6,
)
STYLES = {"gpt": GPT, "llama": LLAMA}


@functools.cache
def make_params(cfg, head="lm", seed=0):
    """Random params of the model's shapes; biases and norm scales perturbed too, so no path is trivial.

    Built with numpy from `eval_shape`: compiling `model.init` costs seconds on a busy CPU.
    """
    model = Transformer(cfg, head=head)
    toks = jax.ShapeDtypeStruct((1, 4), jnp.int32)
    abstract = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), toks, toks, toks)["params"])
    rng = np.random.default_rng(seed)

    def leaf(path, x):
        noise = rng.normal(0.0, 0.2, x.shape)
        base = 1.0 if jax.tree_util.keystr(path).endswith("['scale']") else 0.0
        return jnp.asarray(base + noise, x.dtype)

    return model, jax.tree_util.tree_map_with_path(leaf, abstract)


@pytest.fixture(scope="module", params=sorted(STYLES))
def lm(request):
    model, params = make_params(STYLES[request.param])
    fwd = jax.jit(lambda p, t, pos, m: model.apply({"params": p}, t, pos, m))
    return model, params, fwd


def rand_tokens(seed, shape, vocab=64):
    return jnp.asarray(np.random.default_rng(seed).integers(1, vocab, shape), jnp.int32)


# ---------------------------------------------------------------- numpy float64 reference


def np_forward(cfg, params, tokens, positions, mask):
    """Naive float64 forward (loops over rows, heads, queries) -> logits [B,T,V]."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    tokens, positions, mask = (np.asarray(a) for a in (tokens, positions, mask))
    b_size, t_len = tokens.shape
    h, kvh, dh = cfg.num_heads, cfg.kv_heads, cfg.dim_head

    def norm(x, q):
        if cfg.norm == "rmsnorm":
            return q["scale"] * x / np.sqrt(np.mean(x * x, -1, keepdims=True) + cfg.norm_eps)
        mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + cfg.norm_eps) * q["scale"] + q["bias"]

    def dense(x, q, eq):
        y = np.einsum(eq, x, q["kernel"])
        return y + q["bias"] if cfg.use_bias else y

    def rope(x):  # [B,T,N,Dh]; dim i pairs with i + Dh/2
        out = np.empty_like(x)
        for b in range(b_size):
            for t in range(t_len):
                for i in range(dh // 2):
                    ang = positions[b, t] / cfg.rope_theta ** (2 * i / dh)
                    c, s = math.cos(ang), math.sin(ang)
                    x1, x2 = x[b, t, :, i], x[b, t, :, i + dh // 2]
                    out[b, t, :, i] = x1 * c - x2 * s
                    out[b, t, :, i + dh // 2] = x2 * c + x1 * s
        return out

    x = p["embed"]["token"][tokens]
    if cfg.position == "learned":
        x = x + p["embed"]["position"][positions]
    for layer in range(cfg.num_layers):
        blk = p[f"block_{layer}"]
        a = norm(x, blk["ln_1"])
        q = dense(a, blk["attn"]["q"], "btd,dhk->bthk")
        k = dense(a, blk["attn"]["k"], "btd,dhk->bthk")
        v = dense(a, blk["attn"]["v"], "btd,dhk->bthk")
        if cfg.position == "rope":
            q, k = rope(q), rope(k)
        att = np.zeros((b_size, t_len, h, dh))
        for b in range(b_size):
            for head in range(h):
                kv = head // (h // kvh)
                for i in range(t_len):
                    keys = [j for j in range(i + 1) if mask[b, j] == mask[b, i] != 0]
                    if not keys:
                        continue
                    s = np.array([q[b, i, head] @ k[b, j, kv] for j in keys]) / math.sqrt(dh)
                    w = np.exp(s - s.max())
                    w /= w.sum()
                    att[b, i, head] = sum(wj * v[b, j, kv] for wj, j in zip(w, keys, strict=True))
        x = x + dense(att, blk["attn"]["o"], "bthk,hkd->btd")
        m = norm(x, blk["ln_2"])
        up = dense(m, blk["mlp"]["up"], "btd,df->btf")
        if cfg.mlp == "swiglu":
            g = dense(m, blk["mlp"]["gate"], "btd,df->btf")
            hid = g / (1 + np.exp(-g)) * up
        else:
            hid = 0.5 * up * (1 + np.tanh(math.sqrt(2 / math.pi) * (up + 0.044715 * up**3)))
        x = x + dense(hid, blk["mlp"]["down"], "btf,fd->btd")
    x = norm(x, p["final_norm"])
    unembed = p["embed"]["token"].T if cfg.tie_embeddings else p["unembed"]
    return x @ unembed


def test_matches_numpy_reference(lm):
    model, params, fwd = lm
    mask = jnp.array([[0] * 4 + [1] * 8, [1] * 3 + [2] * 5 + [0] * 4], jnp.int32)
    tokens = rand_tokens(0, mask.shape)
    pos = positions_from_mask(mask)
    got = np.asarray(fwd(params, tokens, pos, mask))
    want = np_forward(model.config, params, tokens, pos, mask)
    real = np.asarray(mask) != 0
    np.testing.assert_allclose(got[real], want[real], rtol=1e-4, atol=1e-4)
    assert np.isfinite(got).all()


# ---------------------------------------------------------------- masking


def test_positions_from_mask_against_loop():
    rng = np.random.default_rng(0)
    rows = [[0, 0, 1, 1, 1], [1, 1, 2, 2, 0], [0, 0, 0, 0, 0], [3, 3, 3, 3, 3], [1, 2, 2, 3, 0]]
    rows += [list(np.sort(rng.integers(0, 3, 5))) for _ in range(5)]
    mask = np.array(rows)
    want = np.zeros_like(mask)
    for b in range(len(rows)):
        pos = 0
        for t in range(mask.shape[1]):
            if mask[b, t] == 0:
                continue
            pos = pos + 1 if t > 0 and mask[b, t - 1] == mask[b, t] else 0
            want[b, t] = pos
    np.testing.assert_array_equal(positions_from_mask(jnp.asarray(mask)), want)


def test_causality(lm):
    _, params, fwd = lm
    tokens, mask = rand_tokens(1, (2, 12)), jnp.ones((2, 12), jnp.int32)
    pos = positions_from_mask(mask)
    base = fwd(params, tokens, pos, mask)
    for t in (0, 5, 10):
        changed = tokens.at[:, t + 1 :].set(rand_tokens(t, (2, 11 - t)))
        assert not np.allclose(changed, tokens) or t == 10
        out = fwd(params, changed, pos, mask)
        np.testing.assert_array_equal(out[:, : t + 1], base[:, : t + 1])
    assert not np.allclose(fwd(params, tokens.at[:, 3].set(0), pos, mask)[:, 3:], base[:, 3:])


def test_left_padding_invariance(lm):
    _, params, fwd = lm
    prompt, junk = rand_tokens(2, (7,)), rand_tokens(3, (5,))
    # Row 0: the prompt alone (trailing pads cannot matter, by causality); row 1: left-padded,
    # with junk tokens under the pads.
    tokens = jnp.stack([jnp.concatenate([prompt, junk]), jnp.concatenate([junk, prompt])])
    mask = jnp.array([[1] * 7 + [0] * 5, [0] * 5 + [1] * 7], jnp.int32)
    out = fwd(params, tokens, positions_from_mask(mask), mask)
    np.testing.assert_allclose(out[1, 5:], out[0, :7], rtol=1e-5, atol=1e-5)
    assert np.isfinite(out).all()


def test_packing_equals_separate(lm):
    _, params, fwd = lm
    a, b, pad = rand_tokens(4, (5,)), rand_tokens(5, (6,)), jnp.zeros((1,), jnp.int32)
    packed = jnp.stack([jnp.concatenate([a, b, pad]), jnp.concatenate([b, a, pad])])
    mask = jnp.array([[1] * 5 + [2] * 6 + [0], [1] * 6 + [7] * 5 + [0]], jnp.int32)
    out = fwd(params, packed, positions_from_mask(mask), mask)
    alone = jnp.stack([jnp.concatenate([a, 0 * b, pad]), jnp.concatenate([b, 0 * a, pad])])
    alone_mask = jnp.array([[1] * 5 + [0] * 7, [1] * 6 + [0] * 6], jnp.int32)
    want = fwd(params, alone, positions_from_mask(alone_mask), alone_mask)
    np.testing.assert_allclose(out[0, :5], want[0, :5], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out[1, 6:11], want[0, :5], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out[0, 5:11], want[1, :6], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out[1, :6], want[1, :6], rtol=1e-5, atol=1e-5)


def test_fully_padded_rows_are_finite(lm):
    _, params, fwd = lm
    mask = jnp.array([[0] * 12, [1] * 3 + [0] * 9], jnp.int32)
    out = fwd(params, rand_tokens(6, (2, 12)), positions_from_mask(mask), mask)
    assert np.isfinite(out).all()


# ---------------------------------------------------------------- heads


def test_scalar_head_reads_last_real_token():
    model, params = make_params(GPT, head="scalar")

    @jax.jit
    def both(tokens, mask):
        args = ({"params": params}, tokens, positions_from_mask(mask), mask)
        return model.apply(*args), model.apply(*args, per_token=True)

    tokens = rand_tokens(7, (3, 8))
    right = jnp.array([[1] * 8, [1] * 5 + [0] * 3, [1, 1, 2, 2, 2, 0, 0, 0]], jnp.int32)
    left = jnp.array([[1] * 8, [0] * 3 + [1] * 5, [0, 0, 0, 0, 0, 0, 0, 1]], jnp.int32)
    for mask, last in ((right, [7, 4, 4]), (left, [7, 7, 7])):
        final, per_token = both(tokens, mask)
        assert per_token.shape == (3, 8) and final.shape == (3,) and final.dtype == jnp.float32
        np.testing.assert_allclose(final, per_token[np.arange(3), last], rtol=1e-6)
    assert not np.allclose(final[1], both(tokens, right)[0][1])


def test_init_scalar_from_lm():
    _, lm_params = make_params(LLAMA)  # untied: the LM's unembed must be dropped
    rm_model, rm_params = make_params(LLAMA, head="scalar", seed=3)
    merged = init_scalar_from_lm(lm_params, rm_params)
    assert set(merged) == set(rm_params) and "unembed" not in merged
    np.testing.assert_array_equal(merged["head"]["kernel"], rm_params["head"]["kernel"])
    np.testing.assert_array_equal(
        merged["block_1"]["mlp"]["up"]["kernel"], lm_params["block_1"]["mlp"]["up"]["kernel"]
    )
    mask = jnp.ones((1, 5), jnp.int32)
    assert jax.jit(rm_model.apply)({"params": merged}, mask, mask, mask).shape == (1,)
    with pytest.raises(ValueError, match="shapes differ"):
        init_scalar_from_lm(
            make_params(GPT)[1],
            make_params(GPT, "scalar")[1] | {"final_norm": rm_params["final_norm"]},
        )


def test_eval_shape_large_config_and_logical_names():
    cfg = dataclasses.replace(
        LLAMA,
        vocab_size=32000,
        max_len=4096,
        num_layers=32,
        d_model=4096,
        num_heads=32,
        num_kv_heads=8,
        d_ff=11008,
    )
    model = Transformer(cfg)
    toks = jax.ShapeDtypeStruct((2, 4096), jnp.int32)
    boxed = jax.eval_shape(model.init, jax.random.key(0), toks, toks, toks)["params"]
    n = sum(math.prod(x.shape) for x in jax.tree.leaves(nn.unbox(boxed)))
    d, kv_d = 4096, 8 * 128
    assert n == 2 * 32000 * d + 32 * (2 * d * d + 2 * d * kv_d + 3 * d * 11008 + 2 * d) + d
    specs = nn.get_partition_spec(boxed)
    assert tuple(specs["block_0"]["attn"]["k"]["kernel"]) == ("embed", "kv_heads", "head_dim")
    assert tuple(specs["embed"]["token"]) == ("vocab", "embed")
    assert tuple(specs["unembed"]) == ("embed", "vocab")
    out = jax.eval_shape(lambda p, t: model.apply({"params": p}, t, t, t), nn.unbox(boxed), toks)
    assert out.shape == (2, 4096, 32000) and out.dtype == jnp.float32


# ---------------------------------------------------------------- dtypes, dropout, remat


def test_bf16_compute_with_f32_params(lm):
    model, params, fwd = lm
    bf16 = Transformer(dataclasses.replace(model.config, dtype="bfloat16"))
    mask = jnp.array([[0] * 4 + [1] * 8, [1] * 12], jnp.int32)
    args = (rand_tokens(8, mask.shape), positions_from_mask(mask), mask)
    want = fwd(params, *args)
    got = jax.jit(bf16.apply)({"params": params}, *args)
    assert got.dtype == jnp.float32 and jax.tree.leaves(params)[0].dtype == jnp.float32
    real = np.asarray(mask) != 0
    err = np.asarray(got[real] - want[real])
    assert np.sqrt(np.mean(err**2)) < 0.05 * np.std(want[real]) and np.abs(err).max() < 0.5
    assert not np.array_equal(got, want)


def test_init_dtypes_and_scales():
    cfg = dataclasses.replace(GPT, num_layers=1, param_dtype="bfloat16", dtype="bfloat16")
    model = Transformer(cfg)
    mask = jnp.ones((1, 4), jnp.int32)
    params = nn.unbox(jax.jit(model.init)(jax.random.key(0), mask, mask, mask)["params"])
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params))
    assert abs(float(jnp.std(params["embed"]["token"].astype(jnp.float32))) - 0.02) < 0.004
    np.testing.assert_array_equal(params["block_0"]["ln_1"]["scale"], 1)
    np.testing.assert_array_equal(params["block_0"]["attn"]["q"]["bias"], 0)
    assert jax.jit(model.apply)({"params": params}, mask, mask, mask).dtype == jnp.float32


def test_dropout_only_when_not_deterministic():
    small = dataclasses.replace(GPT, num_layers=1)
    cfg = dataclasses.replace(small, dropout=0.2, attention_dropout=0.2)
    _, params = make_params(small)
    model = Transformer(cfg)
    mask = jnp.ones((2, 8), jnp.int32)
    args = (rand_tokens(9, (2, 8)), positions_from_mask(mask), mask)
    base = jax.jit(Transformer(small).apply)({"params": params}, *args)

    @functools.partial(jax.jit, static_argnums=1)
    def run(seed, deterministic):
        rngs = {"dropout": jax.random.key(seed)}
        return model.apply({"params": params}, *args, deterministic=deterministic, rngs=rngs)

    np.testing.assert_allclose(run(0, True), base, rtol=1e-5, atol=1e-5)
    drop = lambda seed: run(seed, False)  # noqa: E731
    assert not np.allclose(drop(0), base, atol=1e-3)
    assert not np.allclose(drop(0), drop(1), atol=1e-3)
    np.testing.assert_array_equal(drop(0), drop(0))


def test_remat_same_outputs_and_grads():
    model, params = make_params(LLAMA)
    remat = Transformer(dataclasses.replace(LLAMA, remat=True))
    # Includes a fully padded row: its gradients must stay finite too.
    mask = jnp.array([[0, 0, 1, 1, 1, 1, 1, 1], [0] * 8], jnp.int32)
    args = (rand_tokens(10, mask.shape), positions_from_mask(mask), mask)

    def loss(m):
        f = lambda p: jnp.mean(jax.nn.logsumexp(m.apply({"params": p}, *args), -1) * mask)  # noqa: E731
        return jax.jit(jax.value_and_grad(f))

    (v1, g1), (v2, g2) = loss(model)(params), loss(remat)(params)
    np.testing.assert_allclose(v1, v2, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), g1, g2)
    assert all(np.isfinite(g).all() for g in jax.tree.leaves(g1))


# ---------------------------------------------------------------- config


def test_config_from_dict_and_validation():
    d = dataclasses.asdict(LLAMA)
    assert ModelConfig.from_dict(d) == LLAMA
    with pytest.raises(ValueError, match=r"model\.foo: unknown key"):
        ModelConfig.from_dict(d | {"foo": 1})
    with pytest.raises(ValueError, match=r"model\.d_ff: missing"):
        ModelConfig.from_dict({k: v for k, v in d.items() if k != "d_ff"})
    with pytest.raises(ValueError, match=r"model\.norm"):
        dataclasses.replace(GPT, norm="batchnorm")
    with pytest.raises(ValueError, match=r"model\.num_kv_heads"):
        dataclasses.replace(GPT, num_kv_heads=3)
    with pytest.raises(ValueError, match=r"model\.num_layers: must be a positive int"):
        dataclasses.replace(GPT, num_layers=0)
    with pytest.raises(ValueError, match=r"model\.dtype"):
        dataclasses.replace(GPT, dtype="float77")
