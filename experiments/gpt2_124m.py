r"""GPT-2 124M from the Hugging Face checkpoint through SFT, RM and PPO-ptx (paper settings).

    python -m instructrl.main --config=experiments/gpt2_124m.py:data=DATA,init=checkpoints/gpt2,tokenizer=TOK --workdir=DIR

First convert the checkpoint (config.json + model.safetensors of `gpt2` from the Hub):

    python -m instructrl.convert --hf_dir=HF_GPT2 --out=checkpoints/gpt2

Arguments: data=DIR (JSONL files, see experiments/paper.py), init=DIR (the converted export;
the policy, the RM and the value network all start from it), tokenizer=PATH (default INIT),
smoke, seed=N. Shape: 12 layers, d 768, 12 heads, d_ff 3072, context 1024, learned positions,
LayerNorm, GELU (tanh), tied embeddings, vocab 50257 (kept: the converted embedding has 50257
rows; an odd vocabulary cannot be split over a tensor axis, hence pure data parallelism).

Tokenizer: GPT-2's byte-level BPE is read from the checkpoint's `tokenizer.json` (Hugging
Face tokenizers backend); `convert` copies it (with tokenizer_config.json etc.) into the
export, where `tokenizer` defaults to. Checkpoints that ship only vocab.json + merges.txt
need a tokenizer.json first (`AutoTokenizer.from_pretrained(d).save_pretrained(d)`).

Stages and hyperparameters are the paper's (experiments/paper.py) with lengths halved to the
1024-token context (prompts up to 512 tokens, responses up to 512).
"""

import ml_collections

from experiments import paper
from instructrl import config as config_lib


def model(smoke: bool) -> ml_collections.ConfigDict:
    m = paper.gpt3_model("1p3b", smoke=smoke)  # GPT-2 and GPT-3 share the block layout
    if not smoke:
        m.update(vocab_size=50257, max_len=1024, num_layers=12, d_model=768, num_heads=12,
                 d_ff=3072)  # fmt: skip
    return m


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    a = config_lib.parse_arg(
        arg, smoke=False, seed=0, data="data/instructgpt", init="checkpoints/gpt2", tokenizer=""
    )
    return paper.pipeline(
        model=model(a.smoke),
        reward_model=model(a.smoke),
        mesh=dict(data=-1, fsdp=1, tensor=1),
        data=a.data,
        base=a.init,
        rm_base=a.init,
        tokenizer=a.tokenizer,
        max_prompt_len=512,
        seq_len=1024,
        smoke=a.smoke,
        seed=a.seed,
    )
