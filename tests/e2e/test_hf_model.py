"""experiments/hf_model.py end to end on a tiny random Qwen3 checkpoint built here (nothing is
downloaded): convert_data (Alpaca, HH-RLHF) -> import_hf -> rm -> sft -> ppo_ptx -> export_hf
through `python -m instructrl.main`, then the exported policy loads in transformers and its
greedy `generate` (stopping by the exported generation_config.json) gives exactly the tokens
our greedy sampler gives, for prompts rendered with the checkpoint's chat template."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from instructrl import chat_format, checkpoint, tokenizer
from instructrl.models import ModelConfig, Transformer, sample_jit
from tests.conftest import REPO, subprocess_env
from tests.unit.test_chat_format import qwen3_folder

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

EXPERIMENT = os.path.join(REPO, "experiments", "hf_model.py")
STAGES = ("convert_data", "import_hf", "rm", "sft", "ppo_ptx", "export_hf")
COLOURS = ["red", "blue", "green", "yellow", "black", "white", "pink", "grey"]
NEW_TOKENS = 12


def _write_data(folder) -> list[str]:
    """alpaca.json, hh_rlhf.jsonl, prompts.jsonl, pretrain.txt; returns the PPO prompts."""
    os.makedirs(folder)
    alpaca = [
        {"instruction": f"Name the colour after {c}.", "input": "", "output": f"It is {d}."}
        for c, d in zip(COLOURS, COLOURS[1:] + COLOURS[:1], strict=True)
    ]
    alpaca += [{"instruction": "Repeat the word.", "input": c, "output": c} for c in COLOURS]
    hh = []
    for i, c in enumerate(COLOURS * 2):
        ask = f"\n\nHuman: What colour is {c}?\n\nAssistant:"
        if i % 2:
            ask = f"\n\nHuman: hi\n\nAssistant: Hello!{ask}"
        hh.append({"chosen": f"{ask} {c}, surely.", "rejected": f"{ask} I do not know."})
    prompts = [f"Tell me about {c}." for c in COLOURS]
    with open(os.path.join(folder, "alpaca.json"), "w") as f:
        json.dump(alpaca, f)
    for name, rows in (("hh_rlhf.jsonl", hh), ("prompts.jsonl", [{"prompt": p} for p in prompts])):
        with open(os.path.join(folder, name), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    with open(os.path.join(folder, "pretrain.txt"), "w") as f:
        f.write(" ".join(f"The {c} sky is {d}." for c in COLOURS for d in COLOURS))
    return prompts


def _qwen3_checkpoint(folder: str) -> None:
    """A random Qwen3 model saved next to the tokenizer in `folder`."""
    tok = tokenizer.load(folder)
    torch.manual_seed(0)
    config = transformers.Qwen3Config(
        vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
        tie_word_embeddings=True, initializer_range=0.1, eos_token_id=tok.stop_id,
        pad_token_id=tok.pad_id, bos_token_id=None,
    )  # fmt: skip
    transformers.Qwen3ForCausalLM(config).save_pretrained(folder, safe_serialization=True)


@pytest.mark.slow
def test_hf_model_experiment_round_trip(tmp_path):
    hf_dir = qwen3_folder(tmp_path / "qwen3")
    _qwen3_checkpoint(hf_dir)
    prompts = _write_data(tmp_path / "data")
    workdir = tmp_path / "run"
    command = [
        sys.executable, "-m", "instructrl.main",
        f"--config={EXPERIMENT}:hf={hf_dir},data={tmp_path / 'data'},scale=tiny",
        f"--workdir={workdir}",
    ]  # fmt: skip
    proc = subprocess.run(
        command, env=subprocess_env(1), cwd=REPO, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    assert "16 comparisons records kept" in proc.stderr  # the multi-turn HH prompts fit too
    for stage in STAGES:
        assert (workdir / stage / "DONE").exists(), stage
    for stage in ("rm", "ppo_ptx"):
        lines = (workdir / stage / "metrics.jsonl").read_text().splitlines()
        assert lines and all(np.isfinite(v) for v in json.loads(lines[-1]).values())

    # The exported policy in transformers against our sampler on the PPO-ptx export.
    out = str(workdir / "export_hf" / "hf")
    tok = tokenizer.load(out)
    chat = chat_format.ChatFormat(tok, "model")
    generation = json.loads((workdir / "export_hf" / "hf" / "generation_config.json").read_text())
    assert generation["eos_token_id"][0] == chat.stop_id
    assert tok.id_to_piece(chat.stop_id) == "<|im_end|>"
    ref = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    params, model_dict = checkpoint.load_exported(str(workdir / "ppo_ptx" / "export"))
    model = Transformer(ModelConfig.from_dict(model_dict))
    for prompt in prompts[:2]:
        ids = chat.prompt_ids(prompt)
        assert ids == transformers.AutoTokenizer.from_pretrained(out).apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, return_dict=False
        )
        tokens = np.asarray([ids], np.int32)
        with torch.no_grad():
            logits = ref(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
        positions = np.arange(len(ids), dtype=np.int32)[None]
        got = model.apply({"params": params}, tokens, positions, np.ones_like(tokens))
        np.testing.assert_allclose(np.asarray(got), logits, atol=1e-4, rtol=1e-4)
        ours = sample_jit(model, params, tokens, np.ones_like(tokens), jax.random.key(0),
                          max_new_tokens=NEW_TOKENS, greedy=True, stop_token=chat.stop_id,
                          pad_id=tok.pad_id)  # fmt: skip
        ours = np.asarray(ours.tokens)[0][np.asarray(ours.mask)[0] > 0].tolist()
        with torch.no_grad():
            theirs = ref.generate(
                input_ids=torch.tensor(tokens, dtype=torch.long),
                attention_mask=torch.ones(tokens.shape, dtype=torch.long),
                max_new_tokens=NEW_TOKENS,
                do_sample=False,
            )[0, len(ids) :].tolist()
        assert ours == theirs, prompt
