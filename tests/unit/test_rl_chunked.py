"""PPOConfig.logprob_chunk: policy/reference log-probs, entropy and values computed a chunk of
response positions at a time (rl/rollout.py chunked_logprobs) equal the one-pass path, and
so do their gradients, for tied and untied heads, a chunk that does not divide N, and the
value head on the policy trunk."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from instructrl.models import ModelConfig, Transformer
from instructrl.rl import ppo

V, P, N, B = 97, 5, 7, 3


def _batch():
    rng = np.random.default_rng(0)
    prompt = rng.integers(1, V, (B, P)).astype(np.int32)
    prompt_mask = (np.arange(P)[None] >= np.array([[0], [2], [4]])).astype(np.int32)
    response = rng.integers(1, V, (B, N)).astype(np.int32)
    response_mask = (np.arange(N)[None] < np.array([[7], [3], [1]])).astype(np.int32)
    return prompt * prompt_mask, prompt_mask, response * response_mask, response_mask


@pytest.mark.parametrize("tied", [True, False])
def test_chunked_logprobs_equal_one_pass(tied):
    config = ModelConfig(
        vocab_size=V, max_len=16, num_layers=1, d_model=16, num_heads=2, d_ff=32,
        position="rope", norm="rmsnorm", mlp="swiglu", use_bias=False, tie_embeddings=tied,
    )  # fmt: skip
    model = Transformer(config)
    seq = _batch()
    dummy = jnp.ones((1, P + N), jnp.int32)
    params = model.init(jax.random.key(1), dummy, dummy, dummy)["params"]
    params = jax.tree.map(lambda x: x * 4.0, params)  # peaked logits: differences show
    head = {"kernel": jnp.full((16, 1), 0.1), "bias": jnp.array([0.2])}

    def forward(p, chunk):
        logp, ent, values = ppo.policy_forward(model, p, *seq, 0.7, value_head=head, chunk=chunk)
        return logp, ent, values

    def objective(p, chunk):
        logp, ent, values = forward(p, chunk)
        return jnp.sum(logp * jnp.arange(N)) + ent + jnp.sum(values)

    want = jax.jit(forward, static_argnums=1)(params, 0)
    want_grad = jax.jit(jax.grad(objective), static_argnums=1)(params, 0)
    close = lambda a, b: np.testing.assert_allclose(  # noqa: E731
        a, b, rtol=1e-4, atol=1e-5 * max(1.0, float(np.abs(b).max()))
    )
    for chunk in (3, 16):  # 3 leaves a part chunk; 16 > N pads one chunk
        got = jax.jit(forward, static_argnums=1)(params, chunk)
        for a, b in zip(got, want, strict=True):
            close(a, b)
        jax.tree.map(close, jax.jit(jax.grad(objective), static_argnums=1)(params, chunk),
                     want_grad)  # fmt: skip
    assert np.all(np.asarray(want[0])[seq[3] == 0] == 0) and np.asarray(want[0]).min() < -1
