r"""The benchmark suite's models and workloads as one experiment config, so the suite and the
memory planner read the same thing:

    python -m instructrl.plan --config=experiments/benchmarks/shapes.py:shape=qwen3_0p6b \
        --mesh=data:1 --chip=h200 --json
    python -m experiments.benchmarks.suite --shape=qwen3_0p6b

Arguments: shape=NAME (a key of MODELS), dtype=float32|bfloat16 (the compute dtype; params
stay float32 for training, the sampler rows cast them to the compute dtype). Stages sft, rm
and ppo hold the batch shapes; `bench` the sampling rows' batches and lengths. Random init:
no stage reads a checkpoint (init_from/reward_from are empty).
"""

from __future__ import annotations

import ml_collections

from instructrl import config as config_lib
from instructrl import train_lib
from instructrl.rl.stage_config import default_config as ppo_stage_config
from instructrl.rl.stage_config import grpo_default_config, rloo_config

_GPT2 = dict(position="learned", norm="layernorm", mlp="gelu", use_bias=True)
_QWEN3 = dict(position="rope", norm="rmsnorm", mlp="swiglu", use_bias=False, qk_norm=True)
MODELS = {
    # CPU --quick: seconds to compile and run.
    "tiny": dict(_GPT2, vocab_size=512, max_len=64, num_layers=2, d_model=64, num_heads=4,
                 d_ff=256),
    "tiny_qwen3": dict(_QWEN3, vocab_size=512, max_len=64, num_layers=2, d_model=64,
                       num_heads=4, num_kv_heads=2, head_dim=32, d_ff=128, norm_eps=1e-6),
    # experiments/benchmarks/model_speed.py's CPU shape (~7M parameters).
    "cpu7m": dict(_GPT2, vocab_size=8192, max_len=256, num_layers=6, d_model=256, num_heads=8,
                  d_ff=1024),
    "gpt2_124m": dict(_GPT2, vocab_size=50257, max_len=1024, num_layers=12, d_model=768,
                      num_heads=12, d_ff=3072),
    # Qwen3-0.6B's config.json as instructrl.hf.config_from_hf maps it (context cut to 4096).
    "qwen3_0p6b": dict(_QWEN3, vocab_size=151936, max_len=4096, num_layers=28, d_model=1024,
                       num_heads=16, num_kv_heads=8, head_dim=128, d_ff=3072, norm_eps=1e-6,
                       rope_theta=1e6),
}  # fmt: skip
# Per shape: train (batch, seq), RM (prompts, K), sampling (batches, prompt, new tokens),
# PPO (batch, minibatches, prompt, new tokens, logprob_chunk).
WORKLOADS = {
    "tiny": dict(train=(4, 32), rm=(2, 3), sample=((4, 8), 8, 16), ppo=(8, 2, 8, 8, 0)),
    "cpu7m": dict(train=(8, 256), rm=(2, 4), sample=((8, 64), 32, 128), ppo=(64, 4, 32, 32, 0)),
    "gpt2_124m": dict(train=(16, 1024), rm=(4, 4), sample=((64, 256), 128, 128),
                      ppo=(256, 4, 128, 128, 0)),
    # Sized so the train rows fit in the half of an H200 gpu_check.sh leaves to jax.
    "qwen3_0p6b": dict(train=(4, 1024), rm=(1, 4), sample=((64, 256), 128, 128),
                       ppo=(128, 8, 128, 128, 128)),
}  # fmt: skip
WORKLOADS["tiny_qwen3"] = WORKLOADS["tiny"]
GROUP_SIZE = 4  # samples per prompt of the critic-free rows (grpo, rloo)


def model(shape: str, dtype: str) -> ml_collections.ConfigDict:
    if shape not in MODELS:
        raise config_lib.ConfigError(f"shape={shape!r}: not one of {', '.join(MODELS)}")
    m = dict(MODELS[shape], dtype=dtype, param_dtype="float32", dropout=0.0)
    return ml_collections.ConfigDict(dict(m, attention_dropout=0.0, tie_embeddings=True))


def _train_section(kind: str, batch: int) -> ml_collections.ConfigDict:
    optimizer = train_lib.default_optimizer_config()
    optimizer.update(lr=1e-5, weight_decay=0.01)
    return ml_collections.ConfigDict(
        dict(kind=kind, init_from="", batch_size=batch, accum_steps=1, optimizer=optimizer)
    )


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    a = config_lib.parse_arg(arg, shape="tiny", dtype="float32")
    if a.dtype not in ("float32", "bfloat16"):
        raise config_lib.ConfigError(f"dtype={a.dtype!r}: float32 or bfloat16")
    c = ml_collections.ConfigDict()
    c.model = model(a.shape, a.dtype)  # checks the shape
    w = WORKLOADS[a.shape]
    c.seed = 0
    c.stages = ["sft", "rm", "ppo", "grpo", "rloo"]
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    (train_batch, seq), (rm_batch, k) = w["train"], w["rm"]
    ppo_batch, minibatches, prompt_len, new_tokens, chunk = w["ppo"]
    c.data = ml_collections.ConfigDict(
        dict(seq_len=seq, max_prompt_len=prompt_len, max_responses=k)
    )
    c.sft = _train_section("sft", train_batch)
    c.rm = _train_section("rm", rm_batch)
    c.ppo = ppo_stage_config()
    c.ppo.update(init_from="", reward_from="", batch_size=ppo_batch, num_iterations=100,
                 num_minibatches=minibatches, max_new_tokens=new_tokens,
                 logprob_chunk=chunk, ptx_coef=0.0)  # fmt: skip
    # GRPO and RLOO at PPO's episodes per iteration: batch / G prompts x G = 4 samples.
    c.grpo = grpo_default_config()
    c.grpo.update({k: c.ppo[k] for k in ("init_from", "reward_from", "num_iterations",
                                         "num_minibatches", "max_new_tokens", "logprob_chunk",
                                         "ptx_coef")})  # fmt: skip
    c.grpo.update(batch_size=ppo_batch // GROUP_SIZE, group_size=GROUP_SIZE)
    c.rloo = rloo_config(c.grpo)
    batches, sample_prompt, sample_new = w["sample"]
    c.bench = ml_collections.ConfigDict(
        dict(shape=a.shape, sample_batches=list(batches), sample_prompt_len=sample_prompt,
             sample_new_tokens=sample_new)
    )  # fmt: skip
    return c
