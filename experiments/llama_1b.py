r"""A Llama-architecture 1B (TinyLlama-1.1B) from Hugging Face through SFT, RM and PPO-ptx.

    python -m instructrl.main --config=experiments/llama_1b.py:data=DATA,init=checkpoints/llama_1b --workdir=DIR

First convert the checkpoint (config.json, model.safetensors, tokenizer.model), e.g.
TinyLlama/TinyLlama_v1.1 from the Hub; `convert` copies its SentencePiece tokenizer.model
into the export, which is where this config looks for it:

    python -m instructrl.convert --hf_dir=HF_TINYLLAMA --out=checkpoints/llama_1b

Arguments: data=DIR (JSONL files, see experiments/paper.py), init=DIR (the converted export;
policy, RM and value network start from it), tokenizer=PATH (default INIT, whose
tokenizer.model convert copied), smoke, seed=N.

Shape (TinyLlama-1.1B, read back from the export at run time; `config.model` is what
`python -m instructrl.plan` uses): 22 layers, d 2048, 32 heads of 64, 4 kv heads (GQA),
d_ff 5632, SwiGLU, RMSNorm (eps 1e-5), RoPE (theta 10000), no biases, untied embeddings,
vocab 32000 (the Llama-2 SentencePiece vocabulary), context 2048. Llama-3.2-1B (16 layers,
8 kv heads, theta 500000, rope_type "llama3", tokenizer.json) converts the same way; the
model is read from the export, so only `config.model` (for `plan`) would differ.

Mesh: pure FSDP over the slice (fsdp=-1); the vocabulary 32000 = 250 x 128 also allows a
tensor axis. Stages and hyperparameters are the paper's (experiments/paper.py).
"""

import ml_collections

from experiments import paper
from instructrl import config as config_lib


def model(smoke: bool) -> ml_collections.ConfigDict:
    m = paper.gpt3_model("1p3b", smoke=smoke)
    m.update(position="rope", norm="rmsnorm", mlp="swiglu", use_bias=False, tie_embeddings=False,
             rope_theta=10000.0, norm_eps=1e-5)  # fmt: skip
    if smoke:
        m.update(num_kv_heads=2, d_ff=128)
    else:
        m.update(vocab_size=32000, max_len=2048, num_layers=22, d_model=2048, num_heads=32,
                 num_kv_heads=4, d_ff=5632)  # fmt: skip
    return m


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    a = config_lib.parse_arg(
        arg, smoke=False, seed=0, data="data/instructgpt", init="checkpoints/llama_1b", tokenizer=""
    )
    return paper.pipeline(
        model=model(a.smoke),
        reward_model=model(a.smoke),
        mesh=dict(data=1, fsdp=-1, tensor=1),
        data=a.data,
        base=a.init,
        rm_base=a.init,
        tokenizer=a.tokenizer,
        smoke=a.smoke,
        seed=a.seed,
    )
