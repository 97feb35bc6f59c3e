r"""Any supported Hugging Face checkpoint through SFT, RM and PPO-ptx, with its tokenizer and chat
template, and the PPO-ptx policy written back as a transformers checkpoint.

    python -m instructrl.main --config=experiments/hf_model.py:hf=HF_DIR,data=DATA_DIR --workdir=DIR

HF_DIR: a transformers checkpoint folder (config.json, model.safetensors or a sharded index,
tokenizer.json + tokenizer_config.json, or tokenizer.model) of a supported model_type: gpt2,
llama (Llama 2, Llama 3.x with llama3 RoPE scaling), mistral (sliding_window null), qwen2
(Qwen2/2.5), qwen3. DATA_DIR holds:

  alpaca.json     SFT demonstrations, Alpaca format ({"instruction", "input", "output"}; a
                  JSON array or JSONL, .gz ok)
  hh_rlhf.jsonl   comparisons, HH-RLHF format ({"chosen", "rejected"} transcripts)
  prompts.jsonl   PPO prompts, {"prompt": ...} lines (plain text or the HH turn layout)
  pretrain.txt    pretraining text for the ptx term (any public corpus; not needed with
                  ptx=False)

Arguments: hf=DIR, data=DIR, template=model|none|PATH.jinja (data.chat_template, default
the checkpoint's template), scale=paper|tiny (`smoke` = tiny), ptx=False (plain PPO, no
pretraining text), seed=N.

Stages, each writing DIR/<stage>/:
  convert_data  alpaca.json and hh_rlhf.jsonl to our records (prompts in the HH turn
             layout, which the chat template renders as user/assistant turns), prompts checked
  import_hf  HF_DIR to params + model_config.json, with its tokenizer files
  rm         the reward model from the imported model (paper: 1 epoch, LR 9e-6, 64 prompts)
  sft        from the imported model (paper: 16 epochs, LR 9.65e-6, batch 32, dropout 0.2),
             the epoch chosen by the RM's score of greedy samples
  ppo_init   paper scale only: SFT for 2 epochs with 10% pretraining loss
  ppo_ptx    PPO-ptx (paper: 512 prompts x 500 iterations, beta 0.02, gamma_ptx 27.8, EMA)
  export_hf  the PPO-ptx policy to DIR/export_hf/hf/ (config.json,
             model.safetensors, the tokenizer files, generation_config.json stopping at the
             template's end of turn), loadable by transformers' from_pretrained
The same export by hand: `python -m instructrl.convert --to_hf --export=DIR/ppo_ptx/export
--tokenizer=DIR/import_hf/export --out=OUT`.

scale=paper: experiments/paper.py's settings (prompts up to 1024 tokens, sequences of 2048;
compute in bfloat16 with remat; PPO log-probs 128 positions at a time, ppo_ptx.logprob_chunk). scale=tiny: the same stages at toy sizes in seconds (no
ppo_init, PPO-ptx starts from SFT, SFT keeps its last step; 128-token sequences, no
validation split; float32), for
tests and a first try on a CPU. `config.model`, what `python -m instructrl.plan` reads, is
HF_DIR/config.json's shape when the folder exists (the stages read the imported export).
"""

import dataclasses
import json
import os

import ml_collections

from experiments import paper
from instructrl import config as config_lib
from instructrl import hf
from instructrl.errors import ConfigError
from instructrl.stages import hf_io

SCALES = ("paper", "tiny")
FILES = dict(demonstrations="alpaca.json", comparisons="hh_rlhf.jsonl", prompts="prompts.jsonl")
PRETRAIN_FILE = "pretrain.txt"


def model(hf_dir: str, tiny: bool) -> ml_collections.ConfigDict:
    """The checkpoint's shape (a GPT-3 smoke shape until HF_DIR exists) and how to run it."""
    path = os.path.join(hf_dir, hf.CONFIG_FILE)
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            m = ml_collections.ConfigDict(
                dataclasses.asdict(hf.config_from_hf(json.load(f), where=path))
            )
    else:
        m = paper.gpt3_model("1p3b", smoke=True)
    m.update(dtype="float32" if tiny else "bfloat16", remat=not tiny)
    return m


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    a = config_lib.parse_arg(
        arg, hf="checkpoints/hf_model", data="data/hf_model", template="model", scale="paper",
        smoke=False, ptx=True, seed=0,
    )  # fmt: skip
    if a.scale not in SCALES:
        raise ConfigError(f"config argument 'scale': {a.scale!r} not in {', '.join(SCALES)}")
    tiny = a.smoke or a.scale == "tiny"
    shape = model(a.hf, tiny)
    config = paper.pipeline(
        model=shape,
        reward_model=shape,
        mesh=dict(data=1, fsdp=-1, tensor=1),
        data="@convert_data",
        base="import_hf",
        rm_base="import_hf",
        tokenizer="import_hf",
        smoke=tiny,
        seed=a.seed,
    )
    config.data.chat_template = a.template
    config.data.pretrain = os.path.join(a.data, PRETRAIN_FILE) if a.ptx else ""

    config.convert_data = hf_io.default_config("convert_data")
    for kind, name in FILES.items():
        config.convert_data[kind] = os.path.join(a.data, name)
    config.import_hf = hf_io.default_config("import_hf")
    config.import_hf.hf_dir = a.hf
    config.export_hf = hf_io.default_config("export_hf")
    config.export_hf.update(export_from="ppo_ptx", tokenizer_from="import_hf")
    stages = config.stages
    if not a.ptx:
        config.ppo_init.ptx_fraction = 0.0
        config.ppo_init.ptx_rows = 0
        config.ppo_ptx.ptx_coef = 0.0
    # Vocabularies of 128k-152k tokens: [64, 1024, V] f32 logits would be ~40 GB per
    # minibatch; score 128 response positions at a time instead (same numbers).
    config.ppo_ptx.logprob_chunk = 0 if tiny else 128
    if tiny:
        tiny_sizes(config)
        stages = [s for s in stages if s != "ppo_init"]
    config.stages = ["convert_data", "import_hf", *stages, "export_hf"]
    return config


def tiny_sizes(config: ml_collections.ConfigDict) -> None:
    """Toy sizes on top of paper.pipeline's smoke settings: a few steps of every stage."""
    config.data.validation_fraction = 0.0  # no validation passes (their compiles) at toy sizes
    config.rm.update(batch_size=4, normalize_num=8)
    config.sft.update(batch_size=4, select_by="last", select_reward_from="")
    config.ppo_ptx.update(
        init_from="sft", batch_size=4, num_minibatches=2, num_iterations=2, max_new_tokens=16,
        ptx_ratio=1.0,
    )  # fmt: skip
