"""Hugging Face import/export (instructrl/hf.py, instructrl/convert.py) against transformers.

Tiny random GPT-2 and Llama models are built with transformers (nothing is downloaded) and
saved as safetensors; we check logits on left-padded batches, greedy decoding, the export
back to transformers, loading onto an 8-device mesh, the error messages and the CLI.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import flax.linen as nn
import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from instructrl import checkpoint, convert, hf
from instructrl.models import ModelConfig, Transformer, positions_from_mask, sample_jit
from instructrl.tokenizer import Tokenizer
from tests.conftest import run_in_subprocess

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

V = 100


def _hf_model(kind: str, **overrides):
    torch.manual_seed(0)
    # A large init range makes the logits peaked, so greedy decoding has no near-ties.
    if kind == "gpt2":
        config = transformers.GPT2Config(
            n_layer=2, n_embd=32, n_head=4, vocab_size=V, n_positions=64, initializer_range=0.1
        )
        model = transformers.GPT2LMHeadModel(config)
    else:
        config = transformers.LlamaConfig(
            vocab_size=V,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            tie_word_embeddings=False,
            initializer_range=0.1,
            **overrides,
        )
        model = transformers.LlamaForCausalLM(config)
    model.generation_config.eos_token_id = None  # decode the full length, like our sampler
    model.generation_config.pad_token_id = 0
    return model.eval()


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """kind -> (HF model, single-file dir, sharded dir with model.safetensors.index.json)."""
    out = {}
    for kind in ("gpt2", "llama"):
        model = _hf_model(kind)
        root = tmp_path_factory.mktemp(kind)
        single, sharded = str(root / "single"), str(root / "sharded")
        model.save_pretrained(single, safe_serialization=True)
        model.save_pretrained(sharded, safe_serialization=True, max_shard_size="20KB")
        assert os.path.exists(os.path.join(sharded, hf.INDEX_FILE))
        out[kind] = (model, single, sharded)
    return out


def _left_padded_batch(seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, V, (4, 11)).astype(np.int32)
    mask = np.ones_like(tokens)
    mask[1, :3] = 0
    mask[2, :10] = 0  # a single real token
    mask[3, :6] = 0
    return tokens * mask, mask


def _hf_logits(model, tokens, mask):
    positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)  # HF's left-padding positions
    with torch.no_grad():
        out = model(
            input_ids=torch.tensor(tokens, dtype=torch.long),
            attention_mask=torch.tensor(mask, dtype=torch.long),
            position_ids=torch.tensor(positions, dtype=torch.long),
        )
    return out.logits.float().numpy()


def _our_logits(model, params, tokens, mask):
    apply = jax.jit(lambda p, t, m: model.apply({"params": p}, t, positions_from_mask(m), m))
    return np.asarray(apply(params, tokens, mask))


def _assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_logits_match_transformers_on_left_padded_batch(hf_dirs, kind):
    hf_model, single, sharded = hf_dirs[kind]
    model, params = hf.from_pretrained(single)
    _, params_sharded = hf.from_pretrained(sharded)
    _assert_trees_equal(params, params_sharded)
    assert model.config.dropout == 0.0 and model.config.tie_embeddings == (kind == "gpt2")

    tokens, mask = _left_padded_batch()
    ours, ref = _our_logits(model, params, tokens, mask), _hf_logits(hf_model, tokens, mask)
    real = mask == 1
    diff = np.abs(ours - ref)[real].max()
    print(f"{kind}: max |logits - transformers| = {diff:.2e} (|logits| <= {np.abs(ref).max():.1f})")
    assert diff < 1e-4
    assert np.abs(ref).max() > 1.0  # the comparison is not trivially small


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_greedy_generation_matches_transformers(hf_dirs, kind):
    hf_model, single, _ = hf_dirs[kind]
    model, params = hf.from_pretrained(single)
    n = 8
    padded, padded_mask = _left_padded_batch(seed=1)
    unpadded = np.random.default_rng(2).integers(1, V, padded.shape).astype(np.int32)
    for tokens, mask in ((unpadded, np.ones_like(unpadded)), (padded, padded_mask)):
        with torch.no_grad():
            ref = hf_model.generate(
                input_ids=torch.tensor(tokens, dtype=torch.long),
                attention_mask=torch.tensor(mask, dtype=torch.long),
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
            )[:, tokens.shape[1] :].numpy()
        out = sample_jit(
            model, params, tokens, mask, jax.random.key(0), max_new_tokens=n, greedy=True
        )
        np.testing.assert_array_equal(np.asarray(out.tokens), ref)
        assert len(np.unique(ref)) > 5  # not a degenerate repeat-one-token model
        assert np.asarray(out.mask).all()


def test_bf16_checkpoint_and_reader(tmp_path):
    model = _hf_model("llama").to(torch.bfloat16)
    model.save_pretrained(str(tmp_path), safe_serialization=True)
    path = str(tmp_path / hf.WEIGHTS_FILE)
    ours = hf.read_safetensors(path)
    state = model.state_dict()
    for name, array in ours.items():
        assert array.dtype == np.dtype("bfloat16"), name
        np.testing.assert_array_equal(array.astype(np.float32), state[name].float().numpy())
    _, params32 = hf.from_pretrained(str(tmp_path), dtype="float32")
    m16, params16 = hf.from_pretrained(str(tmp_path), dtype="bfloat16")
    assert m16.config.param_dtype == m16.config.dtype == "bfloat16"
    assert {x.dtype for x in jax.tree.leaves(params16)} == {np.dtype("bfloat16")}
    for a, b in zip(jax.tree.leaves(params16), jax.tree.leaves(params32), strict=True):
        np.testing.assert_array_equal(np.asarray(a).astype(np.float32), np.asarray(b))
    torch_q = state["model.layers.1.self_attn.q_proj.weight"].float().numpy()  # [H*Dh, D]
    q = np.asarray(params32["block_1"]["attn"]["q"]["kernel"])  # [D, H, Dh]
    np.testing.assert_array_equal(q.reshape(32, -1), torch_q.T)

    # An f32 file reads the same as with safetensors' own numpy loader.
    f32 = str(tmp_path / "f32.safetensors")
    save_file({"a": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.ones(5, np.int64)}, f32)
    ref = load_file(f32)
    got = hf.read_safetensors(f32)
    assert got.keys() == ref.keys()
    for k in ref:
        assert got[k].dtype == ref[k].dtype
        np.testing.assert_array_equal(got[k], ref[k])


def _random_model(kind: str, seed: int = 0, **overrides):
    if kind == "gpt2":
        config = ModelConfig(
            vocab_size=V, max_len=32, num_layers=2, d_model=32, num_heads=4, d_ff=64
        )
    else:
        config = ModelConfig(
            vocab_size=V,
            max_len=32,
            num_layers=2,
            d_model=32,
            num_heads=4,
            d_ff=48,
            num_kv_heads=2,
            position="rope",
            norm="rmsnorm",
            mlp="swiglu",
            use_bias=False,
            tie_embeddings=False,
            norm_eps=1e-6,
        )
    config = dataclasses.replace(config, **overrides)
    model = Transformer(config)
    x = np.zeros((1, 4), np.int32)
    params = jax.eval_shape(lambda: nn.unbox(model.init(jax.random.key(0), x, x, x + 1)["params"]))
    # Random norms and biases too (not ones/zeros), so a swapped scale/bias cannot go unnoticed.
    rng = np.random.default_rng(seed)
    return model, jax.tree.map(lambda a: rng.normal(0, 0.3, a.shape).astype(np.float32), params)


@pytest.mark.parametrize(
    "kind,overrides",
    [
        ("gpt2", {}),
        ("llama", {}),
        # Llama with projection biases, a head_dim other than d_model / heads, tied embeddings.
        ("llama", {"use_bias": True, "head_dim": 16, "tie_embeddings": True, "rope_theta": 500.0}),
    ],
)
def test_to_pretrained_loads_in_transformers(tmp_path, kind, overrides):
    model, params = _random_model(kind, **overrides)
    hf.to_pretrained(model, params, str(tmp_path))
    loaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    assert type(loaded).__name__ == ("GPT2LMHeadModel" if kind == "gpt2" else "LlamaForCausalLM")
    tokens, mask = _left_padded_batch(seed=3)
    ours, ref = _our_logits(model, params, tokens, mask), _hf_logits(loaded, tokens, mask)
    assert np.abs(ours - ref)[mask == 1].max() < 1e-4

    model2, params2 = hf.from_pretrained(str(tmp_path))
    assert model2.config == model.config
    _assert_trees_equal(params2, params)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_import_then_export_reproduces_the_hf_tensors(hf_dirs, tmp_path, kind):
    _, single, _ = hf_dirs[kind]
    model, params = hf.from_pretrained(single)
    hf.to_pretrained(model, params, str(tmp_path))
    original, written = (
        load_file(os.path.join(single, hf.WEIGHTS_FILE)),
        hf.read_safetensors(str(tmp_path / hf.WEIGHTS_FILE)),
    )
    assert written.keys() == original.keys()
    for name, array in original.items():
        np.testing.assert_array_equal(written[name], array, err_msg=name)


def test_weight_table_covers_every_hf_element():
    for kind, overrides in (("gpt2", {}), ("llama", {"use_bias": True, "head_dim": 16})):
        config = _random_model(kind, **overrides)[0].config
        covered: dict[str, int] = {}
        for e in hf.weight_table(config):
            buffer = np.zeros(e.shape)
            view = e.view(buffer)
            assert np.shares_memory(view, buffer)  # export writes through these views
            covered[e.name] = covered.get(e.name, 0) + view.size
        shapes = {e.name: e.shape for e in hf.weight_table(config)}
        assert covered == {n: int(np.prod(s)) for n, s in shapes.items()}


def test_config_round_trip_and_family():
    for kind in ("gpt2", "llama"):
        config = _random_model(kind)[0].config
        assert hf.config_from_hf(hf.hf_config_from(config)) == config
        c2 = dataclasses.replace(config, dropout=0.1, dtype="bfloat16")
        assert hf.config_from_hf(hf.hf_config_from(c2), compute_dtype="bfloat16") == (
            dataclasses.replace(config, dtype="bfloat16")
        )
    with pytest.raises(ValueError, match="neither GPT-2"):
        hf.family(ModelConfig(V, 32, 1, 32, 4, 64, position="rope"))


@pytest.mark.slow
def test_sharded_load_on_8_device_mesh(hf_dirs):
    code = f"""
    import jax, numpy as np
    from jax.sharding import PartitionSpec as P
    from instructrl import hf, sharding
    from instructrl.models import positions_from_mask
    assert jax.device_count() == 8
    mesh = sharding.make_mesh({{"data": 2, "fsdp": 2, "tensor": 2}})
    tokens = np.arange(1, 25, dtype=np.int32).reshape(4, 6)
    mask = np.ones_like(tokens); mask[1, :2] = 0
    for path in {[hf_dirs[k][2] for k in ("gpt2", "llama")]!r}:
        model, ref = hf.from_pretrained(path)
        _, params = hf.from_pretrained(path, mesh=mesh)
        for (p, a), b in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(ref)):
            assert a.sharding.mesh.shape == mesh.shape, p
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=str(p))
            for shard in a.addressable_shards:  # each device holds exactly its slice
                np.testing.assert_array_equal(np.asarray(shard.data), np.asarray(b)[shard.index])
        q = params["block_0"]["attn"]["q"]["kernel"]
        assert q.sharding.spec == P("fsdp", "tensor", None), q.sharding.spec
        assert q.addressable_shards[0].data.shape == (16, 2, 8)
        with sharding.mesh_context(mesh):
            fwd = jax.jit(lambda p, t, m: model.apply({{"params": p}}, t, positions_from_mask(m), m))
            got = np.asarray(fwd(params, tokens, mask))
        want = np.asarray(model.apply({{"params": ref}}, tokens, positions_from_mask(mask), mask))
        print(path, np.abs(got - want).max())
        np.testing.assert_allclose(got, want, atol=1e-5)
    print("ok")
    """
    assert "ok" in run_in_subprocess(code, num_devices=8)


# ---- errors ---------------------------------------------------------------------------------


@pytest.fixture
def llama_dir(tmp_path):
    model, params = _random_model("llama")
    path = tmp_path / "llama"
    hf.to_pretrained(model, params, str(path))
    return path


def _edit_weights(path, fn):
    file = str(path / hf.WEIGHTS_FILE)
    tensors = load_file(file)
    fn(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def _edit_config(path, **changes):
    config = json.loads((path / hf.CONFIG_FILE).read_text())
    config.update(changes)
    (path / hf.CONFIG_FILE).write_text(json.dumps(config))


def _error(path) -> str:
    with pytest.raises(ValueError) as info:
        hf.from_pretrained(str(path))
    message = str(info.value)
    assert "\n" not in message
    return message


def test_wrong_shape_names_the_tensor(llama_dir):
    name = "model.layers.0.self_attn.k_proj.weight"
    _edit_weights(llama_dir, lambda t: t.update({name: np.zeros((32, 32), np.float32)}))
    assert f"{name}: expected (16, 32), got (32, 32)" in _error(llama_dir)


def test_missing_and_unexpected_tensors(llama_dir):
    _edit_weights(
        llama_dir, lambda t: t.update({"model.layers.2.mlp.up_proj.weight": t["lm_head.weight"]})
    )
    assert "model.layers.2.mlp.up_proj.weight: unexpected tensor" in _error(llama_dir)
    _edit_weights(
        llama_dir,
        lambda t: [t.pop("model.layers.2.mlp.up_proj.weight"), t.pop("model.norm.weight")],
    )
    assert "model.norm.weight: missing tensor" in _error(llama_dir)


def test_unsupported_configs(llama_dir, tmp_path):
    _edit_config(llama_dir, rope_parameters={"rope_type": "yarn", "rope_theta": 5e5, "factor": 8.0})
    assert "rope_parameters.rope_type='yarn' is not supported" in _error(llama_dir)
    _edit_config(llama_dir, rope_parameters=None, rope_scaling={"type": "linear", "factor": 2.0})
    assert "rope_scaling.rope_type='linear'" in _error(llama_dir)
    _edit_config(llama_dir, rope_scaling=None, hidden_act="gelu")
    assert "hidden_act='gelu' is not supported" in _error(llama_dir)
    _edit_config(llama_dir, hidden_act="silu", model_type="gemma")
    message = _error(llama_dir)
    assert "config.json: model_type='gemma' is not supported (supported: gpt2, llama," in message
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / hf.CONFIG_FILE).write_text(json.dumps({"model_type": "gpt2"}))
    assert "config.json: missing key 'vocab_size'" in _error(tmp_path / "empty")
    _edit_config(llama_dir, model_type="llama")
    (llama_dir / hf.WEIGHTS_FILE).unlink()
    assert "no model.safetensors or model.safetensors.index.json" in _error(llama_dir)


def test_sharded_index_naming_a_missing_tensor(hf_dirs, tmp_path):
    import shutil

    _, _, sharded = hf_dirs["gpt2"]
    broken = tmp_path / "broken"
    shutil.copytree(sharded, broken)
    index = json.loads((broken / hf.INDEX_FILE).read_text())
    index["weight_map"]["transformer.h.9.ln_1.weight"] = "model-00001-of-00008.safetensors"
    (broken / hf.INDEX_FILE).write_text(json.dumps(index))
    assert "transformer.h.9.ln_1.weight: listed in model-00001-of-00008" in _error(broken)


# ---- tokenizer and the convert command --------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    text = root / "corpus.txt"
    text.write_text(
        "\n".join(f"the quick brown fox {i} jumps over the lazy dog" for i in range(50))
    )
    return Tokenizer.train([str(text)], 300, str(root / "tok"))


def test_convert_cli_writes_a_loadable_export(tmp_path, tokenizer_model, capsys):
    model, params = _random_model("gpt2")
    hf_dir, out = tmp_path / "hf", tmp_path / "export"
    hf.to_pretrained(model, params, str(hf_dir), tokenizer_path=tokenizer_model)
    tok = hf.load_tokenizer(str(hf_dir))
    assert tok is not None and tok.vocab_size == Tokenizer.load(tokenizer_model).vocab_size
    written = json.loads((hf_dir / hf.CONFIG_FILE).read_text())
    assert (written["bos_token_id"], written["eos_token_id"], written["pad_token_id"]) == (2, 3, 0)

    assert convert.main([f"--hf_dir={hf_dir}", f"--out={out}"]) == 0
    loaded, model_config = checkpoint.load_exported(str(out))
    assert ModelConfig.from_dict(model_config) == model.config
    _assert_trees_equal(loaded, params)
    assert (out / hf.TOKENIZER_FILE).read_bytes() == Path(tokenizer_model).read_bytes()
    assert hf.load_tokenizer(str(out / "params")) is None

    capsys.readouterr()
    assert convert.main([f"--hf_dir={tmp_path / 'nope'}", f"--out={tmp_path / 'x'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "config.json: missing" in err and "\n" not in err
    assert not (tmp_path / "x").exists()


def test_convert_copies_a_hugging_face_tokenizer(tmp_path, capsys):
    """A checkpoint with tokenizer.json (no tokenizer.model): convert copies it with its
    config files, the export loads it, and to_pretrained writes its special ids back."""
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from instructrl import tokenizer as tokenizer_lib
    from instructrl.hf_tokenizer import HFTokenizer

    raw = RawTokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,  # the tokenizer need not fit the model's vocabulary here
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    raw.train_from_iterator(["the quick brown fox 🤖 jumps"] * 20, trainer)
    src = tmp_path / "tok"
    src.mkdir()
    raw.save(str(src / "tokenizer.json"))
    config = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "chat_template": "{{ 1 }}"}
    (src / "tokenizer_config.json").write_text(json.dumps(config))

    model, params = _random_model("llama")
    hf_dir, out = tmp_path / "hf", tmp_path / "export"
    hf.to_pretrained(model, params, str(hf_dir), tokenizer_path=str(src))
    assert sorted(os.listdir(hf_dir)) == [
        "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"
    ]  # fmt: skip
    written = json.loads((hf_dir / hf.CONFIG_FILE).read_text())
    tok = hf.load_tokenizer(str(hf_dir))
    assert isinstance(tok, HFTokenizer) and tok.chat_template == "{{ 1 }}"
    assert (written["eos_token_id"], written["pad_token_id"]) == (tok.eos_id, tok.pad_id)
    assert "bos_token_id" not in written  # the tokenizer has none

    capsys.readouterr()
    assert convert.main([f"--hf_dir={hf_dir}", f"--out={out}"]) == 0
    assert "(tokenizer: tokenizer.json)" in capsys.readouterr().out
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (src / name).read_bytes()
    assert not (out / hf.TOKENIZER_FILE).exists()
    loaded = tokenizer_lib.load(str(out))
    assert loaded.encode("the fox 🤖") == tok.encode("the fox 🤖") and loaded.stop_id == tok.eos_id


def test_convert_to_hf_writes_a_trained_export_back(tmp_path, tokenizer_model, capsys):
    """`convert --to_hf`: an export (what every stage writes, e.g. PPO's policy) becomes a
    checkpoint transformers loads with the same logits, with the tokenizer and its ids; a
    folder that is not an export is one line and exit 2, with nothing written."""
    model, params = _random_model("llama")
    export, out = tmp_path / "ppo_ptx" / "export", tmp_path / "hf_out"
    checkpoint.export_params(params, dataclasses.asdict(model.config), str(export))
    capsys.readouterr()
    argv = ["--to_hf", f"--export={export}", f"--out={out}", f"--tokenizer={tokenizer_model}"]
    assert convert.main(argv) == 0
    assert f"wrote {out} (llama; tokenizer: {tokenizer_model})" in capsys.readouterr().out
    loaded = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
    tokens, mask = _left_padded_batch(seed=5)
    ours, ref = _our_logits(model, params, tokens, mask), _hf_logits(loaded, tokens, mask)
    assert np.abs(ours - ref)[mask == 1].max() < 1e-4
    written = json.loads((out / hf.CONFIG_FILE).read_text())
    assert (written["bos_token_id"], written["eos_token_id"], written["pad_token_id"]) == (2, 3, 0)
    assert (out / hf.TOKENIZER_FILE).read_bytes() == Path(tokenizer_model).read_bytes()

    capsys.readouterr()  # transformers' loading progress
    assert convert.main(["--to_hf", f"--export={tmp_path}", f"--out={tmp_path / 'y'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "model_config.json (not an export folder)" in err and "\n" not in err
    assert not (tmp_path / "y").exists()
