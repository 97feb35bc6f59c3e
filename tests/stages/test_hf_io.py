"""The import_hf / convert_data / export_hf stages (instructrl/stages/hf_io.py) on their own:
what convert_data writes, and one-line errors naming the config key or file. The whole
round trip through a checkpoint is tests/e2e/test_hf_model.py; here a checkpoint that greedily
writes the stop token shows transformers and our sampler stop at the same place."""

import json

import ml_collections
import pytest

from instructrl.errors import ConfigError, InputError
from instructrl.stages import hf_io


def _config(**sections) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict({"stages": list(sections)})
    for name, (kind, values) in sections.items():
        config[name] = hf_io.default_config(kind)
        config[name].update(values)
    return config


def test_convert_data_writes_our_records(tmp_path):
    alpaca = [{"instruction": "Say hi.", "input": "", "output": "Hi!"}]
    hh = {"chosen": "\n\nHuman: a?\n\nAssistant: yes", "rejected": "\n\nHuman: a?\n\nAssistant: no"}
    (tmp_path / "alpaca.json").write_text(json.dumps(alpaca))
    (tmp_path / "hh.jsonl").write_text(json.dumps(hh) + "\n")
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "Tell me.", "id": 7}\n')
    config = _config(
        data=("convert_data", dict(demonstrations=str(tmp_path / "alpaca.json"),
                                   comparisons=str(tmp_path / "hh.jsonl"),
                                   prompts=str(tmp_path / "prompts.jsonl"))),
    )  # fmt: skip
    hf_io.run(config, "data", str(tmp_path / "run"))
    out = tmp_path / "run" / "data"
    read = lambda name: [json.loads(x) for x in (out / name).read_text().splitlines()]  # noqa: E731
    assert read("demonstrations.jsonl") == [
        {"prompt": "\n\nHuman: Say hi.\n\nAssistant:", "completion": " Hi!"}
    ]
    assert read("comparisons.jsonl") == [
        {"prompt": "\n\nHuman: a?\n\nAssistant:", "chosen": " yes", "rejected": " no"}
    ]
    assert read("prompts.jsonl") == [{"prompt": "Tell me.", "id": 7}]


def test_errors_name_the_key_or_file(tmp_path):
    workdir = str(tmp_path / "run")
    with pytest.raises(ConfigError, match=r"'imp\.hf_dir' is empty"):
        hf_io.run(_config(imp=("import_hf", {})), "imp", workdir)
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text('{"model_type": "qwen3"}')
    with pytest.raises(InputError, match=r"ckpt: no tokenizer\.model or tokenizer\.json"):
        hf_io.run(_config(imp=("import_hf", dict(hf_dir=str(tmp_path / "ckpt")))), "imp", workdir)
    missing = str(tmp_path / "nope.json")
    with pytest.raises(ConfigError, match=r"'data\.demonstrations': .*nope\.json not found"):
        hf_io.run(_config(data=("convert_data", dict(demonstrations=missing))), "data", workdir)
    config = _config(out=("export_hf", dict(export_from="ppo_ptx")))
    config.ppo_ptx = ml_collections.ConfigDict({"kind": "ppo"})
    with pytest.raises(InputError, match=r"'out\.export_from': input stage 'ppo_ptx' has not"):
        hf_io.run(config, "out", workdir)
    with pytest.raises(ValueError, match="kind='nope'"):
        hf_io.default_config("nope")


def _stopping_qwen3(
    folder: str, vocab_size: int, prompt_ids: list[int], stop_id: int, eos_id: int
) -> int:
    """A tiny random untied Qwen3 saved in `folder` (its generation_config's EOS: `eos_id`, not
    the template's stop) whose lm_head row of `stop_id` is a scaled copy of the row of the k-th
    greedy token, k >= 2 the first that is new, so greedy decoding writes the stop token there
    instead; returns k."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.Qwen3Config(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64,
        tie_word_embeddings=False, initializer_range=0.2, eos_token_id=eos_id,
        pad_token_id=eos_id, bos_token_id=None,
    )  # fmt: skip
    model = transformers.Qwen3ForCausalLM(config).eval()
    with torch.no_grad():
        ids = torch.tensor([prompt_ids])
        greedy = model.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=None)
        greedy = greedy[0, len(prompt_ids) :].tolist()
        k = next(i for i in range(2, 8) if greedy[i] not in greedy[:i] and greedy[i] != stop_id)
        head = model.lm_head.weight
        head[stop_id] = head[greedy[k]] * 1.05  # wins where greedy[k] had the top (> 0) logit
    model.save_pretrained(folder, safe_serialization=True)
    return k


def test_exported_generation_stops_where_our_sampler_does(tmp_path):
    """Greedy decoding stops on the template's stop token (<|im_end|>) after a few tokens, at
    the same position with the same tokens in transformers' `generate` (stopping only by the
    generation_config.json export_hf writes) and in our sampler."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    import jax
    import numpy as np

    from instructrl import chat_format, checkpoint, convert, sample, tokenizer
    from instructrl.data import default_data_config
    from instructrl.models import ModelConfig, Transformer, sample_jit
    from tests.unit.test_chat_format import qwen3_folder

    hf_dir = qwen3_folder(tmp_path / "qwen3")
    tok = tokenizer.load(hf_dir)
    chat = chat_format.ChatFormat(tok, "model")
    ids = chat.prompt_ids("Name a colour.")
    k = _stopping_qwen3(hf_dir, tok.vocab_size, ids, chat.stop_id, eos_id=tok.pad_id)
    ours = str(tmp_path / "run" / "ppo" / "export")  # as a stage's export, for the CLI below
    convert.convert(hf_dir, ours)
    config = _config(out=("export_hf", dict(export_from=ours, tokenizer_from=hf_dir)))
    config.data = default_data_config()
    config.data.chat_template = "model"
    hf_io.run(config, "out", str(tmp_path / "run"))
    out = str(tmp_path / "run" / "out" / "hf")
    generation = json.loads((tmp_path / "run" / "out" / "hf" / hf_io.GENERATION_CONFIG).read_text())
    assert generation["eos_token_id"] == [chat.stop_id, tok.pad_id]

    ref = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = ref.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)
    theirs = theirs[0, len(ids) :].tolist()
    params, model_dict = checkpoint.load_exported(ours)
    model = Transformer(ModelConfig.from_dict(model_dict))
    tokens = np.asarray([ids], np.int32)
    got = sample_jit(model, params, tokens, np.ones_like(tokens), jax.random.key(0),
                     max_new_tokens=8, greedy=True, stop_token=chat.stop_id, pad_id=tok.pad_id)  # fmt: skip
    mask = np.asarray(got.mask)[0]
    ours = np.asarray(got.tokens)[0][mask > 0].tolist()
    assert ours == theirs
    assert len(theirs) == k + 1 and theirs[-1] == chat.stop_id and chat.stop_id not in theirs[:-1]
    assert mask.tolist() == [1] * (k + 1) + [0] * (7 - k)

    # python -m instructrl.sample reads the stage's template and tokenizer from its config.json
    stage_config = {"data": {"chat_template": "model"}, "ppo": {"tokenizer_from": hf_dir}}
    (tmp_path / "run" / "ppo" / "config.json").write_text(json.dumps(stage_config))
    (tmp_path / "prompts.jsonl").write_text(json.dumps({"prompt": "Name a colour."}) + "\n")
    argv = [f"--workdir={tmp_path / 'run'}", "--stage=ppo", f"--prompts={tmp_path / 'prompts.jsonl'}",
            f"--out={tmp_path / 'samples.jsonl'}", "--greedy", "--max_new_tokens=8", "--batch_size=1"]  # fmt: skip
    assert sample.main(argv) == 0
    line = json.loads((tmp_path / "samples.jsonl").read_text())
    assert line["responses"] == [chat.response_text("Name a colour.", theirs[:-1])]
    assert line["stopped"] == [True]
