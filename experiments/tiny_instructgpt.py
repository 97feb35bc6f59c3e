r"""The built-in tiny InstructGPT experiment: the whole pipeline on a CPU in minutes.

    python -m instructrl.main --config=experiments/tiny_instructgpt.py --workdir=runs/demo

Arguments (big_vision style, after ':'): `smoke` shrinks everything to seconds (tests,
notebooks); `full` runs both model sizes and all methods. Example:
`--config=experiments/tiny_instructgpt.py:smoke`.

Stages run in the order of `config.stages`; each writes `DIR/<stage>/`:
  world      synthetic instruction world -> standard JSONL files (skipped with your own data)
  tokenizer  sentencepiece model trained on the pretraining text
  smoke      forward pass + KV-cache sampling check of the model config
"""

import ml_collections

from instructrl import config as config_lib


def model_config(size: str, vocab_size: int, max_len: int) -> ml_collections.ConfigDict:
    """GPT-2-style models; `large` has about 8x the parameters of `small`."""
    shapes = {
        "tiny": dict(num_layers=1, d_model=32, num_heads=2, d_ff=128),
        "small": dict(num_layers=2, d_model=64, num_heads=4, d_ff=256),
        "large": dict(num_layers=4, d_model=128, num_heads=4, d_ff=512),
    }
    return ml_collections.ConfigDict(
        dict(
            vocab_size=vocab_size,
            max_len=max_len,
            position="learned",
            norm="layernorm",
            mlp="gelu",
            use_bias=True,
            tie_embeddings=True,
            dropout=0.0,
            attention_dropout=0.0,
            dtype="float32",
            param_dtype="float32",
            remat=False,
            **shapes[size],
        )
    )


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = config_lib.parse_arg(arg, smoke=False, full=False, size="small", seed=0)
    config = ml_collections.ConfigDict()
    config.seed = arg.seed
    config.stages = "smoke"
    config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))

    vocab_size = 128 if arg.smoke else 512
    max_len = 64 if arg.smoke else 128
    config.model = model_config("tiny" if arg.smoke else arg.size, vocab_size, max_len)

    config.tokenizer = ml_collections.ConfigDict(
        dict(kind="tokenizer", vocab_size=vocab_size, input="", num_lines=2000 if arg.smoke else 0)
    )
    config.smoke = ml_collections.ConfigDict(
        dict(kind="smoke", batch_size=2, prompt_len=8, max_new_tokens=8)
    )
    return config
