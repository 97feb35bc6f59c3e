"""Qwen2, Qwen3, Llama-3 (llama3 RoPE scaling) and Mistral checkpoints (instructrl/hf.py).

Tiny random models are built with transformers (GQA, tied and untied heads, nothing is
downloaded) and saved as safetensors; we check our logits on a left-padded batch in float32
and bfloat16, the export back to transformers, greedy decoding, the llama3 frequencies and
the one-line errors for what we do not implement. GPT-2/Llama basics live in test_hf.py.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os

import jax
import numpy as np
import pytest

from instructrl import costs, hf
from instructrl.errors import ConfigError
from instructrl.models import ModelConfig, Transformer, sample_jit
from instructrl.models.transformer import rope_inv_freq
from tests.unit.test_hf import (
    V,
    _assert_trees_equal,
    _hf_logits,
    _left_padded_batch,
    _our_logits,
    _random_model,
)

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# Llama 3.1's scaling on a tiny model: with theta 100 and head_dim 8 the wavelengths are
# 6.3, 20, 63 and 199 against 64/4 and 64/1, so every branch of the rule is taken.
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 100.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}
# case -> (HF config class, model class, config overrides, expected ModelConfig fields)
CASES = {
    "qwen2_tied": (
        "Qwen2Config",
        "Qwen2ForCausalLM",
        {"tie_word_embeddings": True},
        {"qkv_bias": True, "use_bias": False, "tie_embeddings": True},
    ),
    "qwen2_untied": (
        "Qwen2Config",
        "Qwen2ForCausalLM",
        {
            "tie_word_embeddings": False,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e6},
        },
        {"qkv_bias": True, "tie_embeddings": False, "rope_theta": 1e6},
    ),
    "qwen3_tied": (  # head_dim 16 != hidden 32 / 4 heads, as in real Qwen3 models
        "Qwen3Config",
        "Qwen3ForCausalLM",
        {"tie_word_embeddings": True, "head_dim": 16},
        {"qk_norm": True, "qkv_bias": False, "head_dim": 16, "tie_embeddings": True},
    ),
    "llama3_untied": (
        "LlamaConfig",
        "LlamaForCausalLM",
        {
            "tie_word_embeddings": False,
            "max_position_embeddings": 128,
            "rope_parameters": LLAMA3_ROPE,
        },
        {"rope_scaling": "llama3", "rope_factor": 8.0, "rope_original_max_len": 64},
    ),
}


def _hf_model(case: str):
    config_cls, model_cls, overrides, _ = CASES[case]
    torch.manual_seed(0)
    kwargs = dict(
        vocab_size=V,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        initializer_range=0.1,  # peaked logits: no near-ties in greedy decoding
    )
    config = getattr(transformers, config_cls)(**(kwargs | overrides))
    model = getattr(transformers, model_cls)(config)
    with torch.no_grad():  # random norms and biases, so a swapped or dropped one shows
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                p.copy_(
                    1 + 0.3 * torch.randn_like(p) if "norm" in name else 0.3 * torch.randn_like(p)
                )
    model.generation_config.eos_token_id = None  # decode the full length, like our sampler
    model.generation_config.pad_token_id = 0
    return model.eval()


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """case -> (HF model, its save_pretrained directory)."""
    out = {}
    for case in CASES:
        model = _hf_model(case)
        path = str(tmp_path_factory.mktemp(case))
        model.save_pretrained(path, safe_serialization=True)
        out[case] = (model, path)
    return out


def _max_rel_diff(ours, ref, mask):
    return np.abs(ours - ref)[mask == 1].max() / max(1.0, np.abs(ref).max())


@pytest.mark.parametrize("case", CASES)
def test_logits_match_transformers_in_float32(hf_dirs, case):
    hf_model, path = hf_dirs[case]
    model, params = hf.from_pretrained(path)
    c = model.config
    assert c.kv_heads == 2 < c.num_heads
    for key, value in CASES[case][3].items():
        assert getattr(c, key) == value, key
    tokens, mask = _left_padded_batch()
    ref = _hf_logits(hf_model, tokens, mask)
    diff = _max_rel_diff(_our_logits(model, params, tokens, mask), ref, mask)
    print(f"{case}: max |logits - transformers| / max(1, |logits|) = {diff:.1e}")
    assert diff < 1e-4
    assert np.abs(ref).max() > 1.0  # the comparison is not trivially small


@pytest.mark.parametrize("case", CASES)
def test_bf16_checkpoint_loads_as_bf16_and_matches(tmp_path, case):
    """A bf16 checkpoint loaded with dtype="bfloat16": bf16 params equal to the file's, and
    logits off the f32 evaluation of the same weights by no more than transformers' bf16."""
    hf16 = _hf_model(case).to(torch.bfloat16)
    hf16.save_pretrained(str(tmp_path), safe_serialization=True)
    model, params = hf.from_pretrained(str(tmp_path), dtype="bfloat16")
    assert model.config.dtype == model.config.param_dtype == "bfloat16"
    assert {x.dtype for x in jax.tree.leaves(params)} == {np.dtype("bfloat16")}
    q = np.asarray(params["block_1"]["attn"]["q"]["kernel"])  # [D, H, Dh]
    torch_q = hf16.state_dict()["model.layers.1.self_attn.q_proj.weight"].float().numpy()
    np.testing.assert_array_equal(q.astype(np.float32).reshape(32, -1), torch_q.T)

    tokens, mask = _left_padded_batch()
    exact = _hf_logits(copy.deepcopy(hf16).float(), tokens, mask)
    theirs = _hf_logits(hf16, tokens, mask)
    ours = _our_logits(model, params, tokens, mask)
    ours_err, their_err = (_max_rel_diff(x, exact, mask) for x in (ours, theirs))
    print(f"{case} bf16: ours {ours_err:.1e}, transformers {their_err:.1e} off f32")
    assert ours_err < max(2 * their_err, 1e-2)
    assert _max_rel_diff(ours, theirs, mask) < 5e-2


@pytest.mark.parametrize("case", CASES)
def test_export_loads_back_in_transformers(hf_dirs, tmp_path, case):
    hf_model, path = hf_dirs[case]
    model, params = hf.from_pretrained(path)
    out = str(tmp_path / "export")
    hf.to_pretrained(model, params, out)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(loaded) is type(hf_model)
    tokens, mask = _left_padded_batch(seed=3)
    ref = _hf_logits(hf_model, tokens, mask)
    assert _max_rel_diff(_hf_logits(loaded, tokens, mask), ref, mask) < 1e-6
    written, original = (hf.read_safetensors(os.path.join(p, hf.WEIGHTS_FILE)) for p in (out, path))
    assert written.keys() == original.keys()
    for name, array in original.items():
        np.testing.assert_array_equal(written[name], array, err_msg=name)
    model2, params2 = hf.from_pretrained(out)
    assert model2.config == model.config
    _assert_trees_equal(params2, params)


def test_export_of_our_own_qwen2_with_a_free_head_dim(tmp_path):
    model, params = _random_model("llama", qkv_bias=True, head_dim=16, tie_embeddings=True)
    assert hf.family(model.config) == "qwen2"
    hf.to_pretrained(model, params, str(tmp_path))
    loaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    assert type(loaded).__name__ == "Qwen2ForCausalLM"
    tokens, mask = _left_padded_batch(seed=4)
    ours, ref = _our_logits(model, params, tokens, mask), _hf_logits(loaded, tokens, mask)
    assert _max_rel_diff(ours, ref, mask) < 1e-4


@pytest.mark.parametrize("case", ["qwen3_tied", "llama3_untied"])
def test_greedy_generation_matches_transformers(hf_dirs, case):
    hf_model, path = hf_dirs[case]
    model, params = hf.from_pretrained(path)
    n = 8
    tokens, mask = _left_padded_batch(seed=1)
    with torch.no_grad():
        ref = hf_model.generate(
            input_ids=torch.tensor(tokens, dtype=torch.long),
            attention_mask=torch.tensor(mask, dtype=torch.long),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
        )[:, tokens.shape[1] :].numpy()
    out = sample_jit(model, params, tokens, mask, jax.random.key(0), max_new_tokens=n, greedy=True)
    np.testing.assert_array_equal(np.asarray(out.tokens), ref)
    assert len(np.unique(ref)) > 5  # not a degenerate repeat-one-token model


_NO_SCALING = {
    "rope_scaling": "none",
    "rope_factor": 1.0,
    "rope_low_freq_factor": 1.0,
    "rope_high_freq_factor": 4.0,
    "rope_original_max_len": None,
}


def test_llama3_frequencies_equal_transformers():
    """Llama 3.1 8B's numbers, and the tiny test model's, through both implementations."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    llama31 = dict(LLAMA3_ROPE, rope_theta=500000.0, original_max_position_embeddings=8192)
    for rope, d, heads in ((llama31, 4096, 32), (LLAMA3_ROPE, 32, 4)):
        hf_config = transformers.LlamaConfig(
            hidden_size=d, num_attention_heads=heads, max_position_embeddings=131072,
            rope_parameters=dict(rope),
        )  # fmt: skip
        want = ROPE_INIT_FUNCTIONS["llama3"](hf_config)[0].numpy()
        config = hf.config_from_hf(
            dict(hf.hf_config_from(_random_model("llama")[0].config), rope_parameters=rope)
        )
        config = dataclasses.replace(config, d_model=d, num_heads=heads, num_kv_heads=None)
        # The same f32 operations in the same order; XLA's and torch's pow differ by an ulp
        # or two (as for plain RoPE), eagerly and inside a jitted model.
        for got in (rope_inv_freq(config), jax.jit(rope_inv_freq, static_argnums=0)(config)):
            assert got.dtype == want.dtype == np.float32
            np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, atol=0)
        plain = rope_inv_freq(dataclasses.replace(config, **_NO_SCALING))
        assert (np.asarray(got) != np.asarray(plain)).any()


def test_mistral_without_sliding_window_is_a_llama(tmp_path):
    torch.manual_seed(0)
    config = transformers.MistralConfig(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        sliding_window=None, initializer_range=0.1,
    )  # fmt: skip
    hf_model = transformers.MistralForCausalLM(config).eval()
    hf_model.save_pretrained(str(tmp_path), safe_serialization=True)
    model, params = hf.from_pretrained(str(tmp_path))
    assert hf.family(model.config) == "llama" and not model.config.use_bias
    tokens, mask = _left_padded_batch()
    ours, ref = _our_logits(model, params, tokens, mask), _hf_logits(hf_model, tokens, mask)
    assert _max_rel_diff(ours, ref, mask) < 1e-4


# ---- errors and config validation ------------------------------------------------------------


DROP = object()


def _error(path, **changes) -> str:
    """from_pretrained's one-line message after `changes` to config.json (DROP: delete)."""
    config = json.loads((path / hf.CONFIG_FILE).read_text())
    config.update(changes)
    config = {k: v for k, v in config.items() if v is not DROP}
    broken = path.parent / (path.name + "_broken")
    broken.mkdir(exist_ok=True)
    for name in os.listdir(path):
        if name != hf.CONFIG_FILE and not (broken / name).exists():
            os.symlink(path / name, broken / name)
    (broken / hf.CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(ValueError) as info:
        hf.from_pretrained(str(broken))
    message = str(info.value)
    assert "\n" not in message and hf.CONFIG_FILE in message
    return message


def test_unsupported_keys_name_config_json_and_the_key(hf_dirs):
    from pathlib import Path

    qwen2, qwen3 = Path(hf_dirs["qwen2_tied"][1]), Path(hf_dirs["qwen3_tied"][1])
    llama3 = Path(hf_dirs["llama3_untied"][1])
    assert "use_sliding_window=True is not supported" in _error(qwen2, use_sliding_window=True)
    assert "attention_bias=True is not supported" in _error(qwen3, attention_bias=True)
    assert "hidden_act='gelu' is not supported" in _error(qwen3, hidden_act="gelu")
    yarn = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6}
    assert "rope_parameters.rope_type='yarn' is not supported" in _error(
        qwen2, rope_parameters=yarn
    )
    no_low = {k: v for k, v in LLAMA3_ROPE.items() if k != "low_freq_factor"}
    message = _error(llama3, rope_parameters=no_low)
    assert "missing key 'rope_parameters.low_freq_factor'" in message
    bad = dict(LLAMA3_ROPE, low_freq_factor=4.0)  # transformers would divide by zero
    assert "model.rope_low_freq_factor: need 0 <" in _error(llama3, rope_parameters=bad)
    old_style = {"type": "dynamic", "factor": 2.0}  # rope_scaling wins over rope_parameters
    assert "rope_scaling.rope_type='dynamic'" in _error(llama3, rope_scaling=old_style)
    # Mistral's sliding_window defaults to 4096: absent or set, it is a sliding window.
    mistral = {"model_type": "mistral", "architectures": ["MistralForCausalLM"]}
    assert "sliding_window=4096 is not supported" in _error(qwen3, **mistral, sliding_window=4096)
    assert "sliding_window=4096 is not supported" in _error(qwen3, **mistral, sliding_window=DROP)


def test_model_config_validation_and_param_count():
    llama = _random_model("llama")[0].config
    with pytest.raises(ConfigError, match=r"^model\.qkv_bias: only with use_bias=False"):
        dataclasses.replace(llama, use_bias=True, qkv_bias=True)
    with pytest.raises(ConfigError, match=r"^model\.rope_factor: only with rope_scaling='llama3'"):
        dataclasses.replace(llama, rope_factor=8.0)
    llama3 = dict(rope_scaling="llama3", rope_factor=8.0, rope_original_max_len=16)
    dataclasses.replace(llama, **llama3)
    with pytest.raises(ConfigError, match=r"^model\.rope_original_max_len: must be a positive"):
        dataclasses.replace(llama, **(llama3 | {"rope_original_max_len": None}))
    with pytest.raises(ConfigError, match=r"^model\.rope_factor: must be >= 1"):
        dataclasses.replace(llama, **(llama3 | {"rope_factor": 0.5}))
    with pytest.raises(ConfigError, match=r"^model\.rope_scaling: 'llama3' needs position='rope'"):
        dataclasses.replace(_random_model("gpt2")[0].config, **llama3)
    with pytest.raises(ConfigError, match=r"^model\.rope_scaling: 'yarn' not in"):
        dataclasses.replace(llama, rope_scaling="yarn")
    with pytest.raises(ValueError, match=r"^model\.qk_norm: Qwen3 .* no projection biases"):
        hf.family(dataclasses.replace(llama, qk_norm=True, qkv_bias=True))
    assert ModelConfig.from_dict(dataclasses.asdict(llama)) == llama  # old configs: defaults

    x = jax.ShapeDtypeStruct((1, 4), np.int32)
    for overrides in ({"qkv_bias": True}, {"qk_norm": True, "head_dim": 16}, llama3):
        config = dataclasses.replace(llama, **overrides)
        assert hf.config_from_hf(hf.hf_config_from(config)) == config
        for head in ("lm", "scalar"):
            model = Transformer(config, head=head)
            shapes = jax.eval_shape(model.init, jax.random.key(0), x, x, x)["params"]
            n = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(shapes))
            assert costs.param_count(config, head) == n, (overrides, head)
