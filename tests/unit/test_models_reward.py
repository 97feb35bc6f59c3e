"""RM normalisation and text-level scoring (instructrl/models/reward.py)."""

import dataclasses
import json

import flax.linen as nn
import jax
import numpy as np
import pytest

from instructrl import checkpoint
from instructrl.models import ModelConfig, Transformer, positions_from_mask
from instructrl.models.reward import Normalization, RewardModel, encode_pairs
from instructrl.tokenizer import Tokenizer


def test_normalization_fits_the_paper_and_ziegler_targets():
    raw = np.random.default_rng(0).normal(3.0, 2.0, size=1000)
    demos = Normalization.fit(raw, "demonstrations")
    assert demos.gain == 1.0 and abs(np.mean(demos.apply(raw))) < 1e-9
    policy = Normalization.fit(raw, "policy")
    out = policy.apply(raw)
    assert abs(out.mean()) < 1e-9 and abs(out.std() - 1.0) < 1e-9
    assert Normalization.fit(raw, "none").apply(2.5) == 2.5
    with pytest.raises(ValueError, match="mode 'bogus'"):
        Normalization.fit(raw, "bogus")
    with pytest.raises(ValueError, match="no scores"):
        Normalization.fit(np.zeros(0), "policy")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    text = folder / "text.txt"
    text.write_text("\n".join(f"the cat {i} sat on the mat {i % 7}" for i in range(300)))
    return Tokenizer.load(Tokenizer.train([str(text)], 300, str(folder / "tok")))


def test_encode_pairs_layout_and_no_stop(tokenizer):
    tokens, mask = encode_pairs(tokenizer, ["the cat", "a"], ["sat", "mat"], 16, [True, False])
    first = [tokenizer.bos_id, *tokenizer.encode("the cat"), *tokenizer.encode("sat")]
    assert tokens[0, : len(first) + 1].tolist() == [*first, tokenizer.eos_id]
    assert mask[0].sum() == len(first) + 1
    second = [tokenizer.bos_id, *tokenizer.encode("a"), *tokenizer.encode("mat")]
    assert tokens[1, : mask[1].sum()].tolist() == second  # no EOS: it never stopped
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        encode_pairs(tokenizer, ["a", "b"], ["c"], 16)


def test_reward_model_scores_texts_like_the_model(tokenizer, tmp_path):
    config = ModelConfig(vocab_size=320, max_len=24, num_layers=1, d_model=16, num_heads=2, d_ff=32)
    model = Transformer(config, head="scalar")
    dummy = np.ones((1, 24), np.int32)
    params = nn.unbox(model.init(jax.random.key(0), dummy, dummy, dummy)["params"])
    checkpoint.export_params(params, dataclasses.asdict(config), str(tmp_path / "rm"))
    norm = Normalization(gain=2.0, bias=-1.0, mode="policy")
    with open(tmp_path / "rm" / "reward_normalization.json", "w") as f:
        json.dump(dataclasses.asdict(norm), f)
    rm = RewardModel.load(str(tmp_path / "rm"), tokenizer)
    prompts = [f"the cat {i}" for i in range(70)]  # more rows than one batch of 64
    responses = [f"sat on the mat {i % 7}" for i in range(70)]
    stopped = [i % 3 != 0 for i in range(70)]
    tokens, mask = encode_pairs(tokenizer, prompts, responses, 24, stopped)
    expected = np.asarray(model.apply({"params": params}, tokens, positions_from_mask(mask), mask))
    got = rm.score(prompts, responses, stopped=stopped)
    np.testing.assert_allclose(got, 2.0 * expected - 1.0, rtol=1e-5, atol=1e-5)
    raw = rm.score(prompts, responses, stopped=stopped, raw=True)
    np.testing.assert_allclose(raw, expected, rtol=1e-5, atol=1e-5)
    penalised = rm.score(prompts, responses, stopped=stopped, no_stop_score=-7.0)
    assert np.all(penalised[~np.asarray(stopped)] == -7.0)
    np.testing.assert_array_equal(penalised[np.asarray(stopped)], got[np.asarray(stopped)])


def test_packed_rm_batches_give_the_padded_batches_rewards_and_loss():
    """pack_responses keeps only the real responses, cut to the longest row: rewards_of gives
    the same rewards (causal attention, right padding) and the K-wise loss the same value and
    gradient, up to float rounding, on rows of different K and lengths."""
    from instructrl import losses
    from instructrl.data.examples import pack_responses, rm_example
    from instructrl.data.records import LengthLimits
    from instructrl.models.reward import rewards_of

    rng = np.random.default_rng(0)
    limits = LengthLimits(tokenizer=None, max_prompt_len=8, max_response_len=12, seq_len=24)
    rows = []
    for k in (2, 5, 3):  # K_max 6: padded responses in every row
        prompt = [2, *rng.integers(4, 60, rng.integers(1, 7)).tolist()]
        responses = [rng.integers(4, 60, rng.integers(1, 12)).tolist() for _ in range(k)]
        rows.append(rm_example(prompt, responses, rng.permutation(k).tolist(), [], limits, 6,
                               3, 0, [bool(i % 2) for i in range(k)]))  # fmt: skip
    batch = {key: np.stack([r[key] for r in rows]) for key in rows[0]}
    packed = pack_responses(batch, row_multiple=4, len_multiple=8)
    assert packed["tokens"].shape == (12, 24 if batch["mask"][..., 16:].any() else 16)
    assert packed["response_row"].shape == (3, 6) and packed["mask"][10:].sum() == 0
    config = ModelConfig(vocab_size=64, max_len=24, num_layers=2, d_model=16, num_heads=2, d_ff=32)
    model = Transformer(config, head="scalar")
    dummy = np.ones((1, 24), np.int32)
    params = nn.unbox(model.init(jax.random.key(0), dummy, dummy, dummy)["params"])

    def loss(p, b):
        return losses.reward_loss(rewards_of(model, p, b), b["pair_mask"])

    want, got = rewards_of(model, params, batch), rewards_of(model, params, packed)
    real = batch["response_mask"] > 0
    np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(loss(params, packed), loss(params, batch), rtol=1e-6)
    grads = [jax.grad(loss)(params, b) for b in (batch, packed)]
    for a, b in zip(*(jax.tree_util.tree_leaves(g) for g in grads), strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)
