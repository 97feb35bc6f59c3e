"""Speed of the SFT and RM train steps, and model FLOPs utilisation (MFU), on this machine.

    python -m experiments.benchmarks.train_speed [--quick] [--models=small,large,gpt2_10m]

For each model, times the train step the stages run (train_lib.make_train_step +
jit_train_step with the stages' loss functions, explicit shardings on a 1-device mesh, state
donated, clipped AdamW) on synthetic batches of the stages' layout, and reports tokens/s and
  MFU = (model FLOPs per step / step seconds) / matmul peak FLOP/s
  model FLOPs per token = 6 * N + 12 * num_layers * d_model * seq_len   (forward + backward)
  N = parameters of the matrix multiplications: every kernel, plus the token embedding when it
      is also the unembedding (LM head, tied); not the position table, biases or norms, and
      for the RM (scalar head) not the token embedding, which it only looks up;
  peak = 2 n^3 / t of an n x n f32 matmul (n = 2048) through jax in the same process: what
      XLA's own matmul reaches on these cores, not the chip's datasheet figure.
Models: `small` and `large` are the tiny experiment's sizes (experiments/tiny_instructgpt.py,
seq 128, its batch sizes); `gpt2_10m` is a ~10M-parameter GPT-2-style model at seq 256.

Shared machines: each repetition times the matmul and then the steps back to back, and MFU is
the median over repetitions of their ratio, so both see the same background load. `mfu` uses
wall time; `mfu_cpu` uses this process's CPU time (FLOPs per CPU-second over the matmul's),
which is much less sensitive to other processes taking cores. Both rise when other processes
leave this one about one core (the big matmul gains more from the second core than the step).
`tokens_per_s` is the best repetition. Read `load_avg_1min` before trusting a figure.

Tried on a 2-core AMD EPYC (jax 0.10.2, gpt2_10m SFT step): XLA's default (YNNPACK fusions
of dots) was best; --xla_cpu_experimental_ynn_fusion_type= (off) cost ~20%; xnnpack, onednn or
YNN eltwise/reduce fusions made no difference beyond run-to-run noise; remat on was no faster.
Batch size mattered most (see MODELS). glibc returns freed buffers over its mmap threshold to
the OS, so every large activation is page-faulted in again on each step; keeping them with
  MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=4294967296 MALLOC_TOP_PAD_=1073741824
doubled the [8192, 320] x [320, 1280] matmul and gave the gpt2_10m step ~5-10%. The JSON
records XLA_FLAGS and these variables.

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from experiments import tiny_instructgpt
from experiments.benchmarks.timing import timed
from instructrl import losses, sharding, train_lib
from instructrl.models import ModelConfig, Transformer
from instructrl.stages.reward import rewards_of

GPT2_10M = dict(
    vocab_size=8192, max_len=256, num_layers=6, d_model=320, num_heads=5, d_ff=1280,
    position="learned", norm="layernorm", mlp="gelu", use_bias=True, tie_embeddings=True,
)  # fmt: skip

# name -> (model config dict, seq_len, SFT sequences per batch, RM prompts per batch, RM K)
MODELS: dict[str, tuple[dict[str, Any], int, int, int, int]] = {
    "small": (tiny_instructgpt.model_config("small", 384, 128).to_dict(), 128, 32, 32, 6),
    "large": (tiny_instructgpt.model_config("large", 384, 128).to_dict(), 128, 32, 32, 6),
    # 8192 tokens per step: at 4096 the step spends a larger share outside the big matmuls
    # (measured MFU ~0.45-0.5 at batch 16 against ~0.56-0.6 at 32, 2 idle cores).
    "gpt2_10m": (GPT2_10M, 256, 32, 8, 4),
}
MATMUL_N = 2048


# ------------------------------------------------------------------ FLOPs and timing


def matmul_params(params: Any, head: str) -> int:
    """N of the 6N rule (see module docstring) from a params tree (abstract is fine)."""
    n = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        name = jax.tree_util.keystr(path)
        if leaf.ndim < 2 or "position" in name:
            continue
        if "embed" in name and head != "lm":
            continue
        n += math.prod(leaf.shape)
    return n


def flops_per_token(config: ModelConfig, n_matmul: int, seq_len: int) -> float:
    return 6.0 * n_matmul + 12.0 * config.num_layers * config.d_model * seq_len


def matmul_runner(n: int = MATMUL_N) -> Callable[[], None]:
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    mm = jax.jit(lambda x, y: x @ y)
    mm(a, b).block_until_ready()
    return lambda: mm(a, b).block_until_ready()


def matmul_rate(run: Callable[[], None], tries: int = 3) -> tuple[float, float]:
    """Best (wall, CPU) FLOP/s of `tries` n x n matmuls."""
    times = [timed(run) for _ in range(tries)]
    flops = 2.0 * MATMUL_N**3
    return flops / min(t[0] for t in times), flops / min(t[1] for t in times)


# ------------------------------------------------------------------ the stages' steps


def _lm_loss(model: Transformer):
    # The SFT/pretrain loss of instructrl/stages/lm.py (token-weighted mean NLL).
    def loss_fn(params, batch, rng):
        logits = model.apply(
            {"params": params}, batch["tokens"], batch["positions"], batch["mask"],
            deterministic=False, rngs={"dropout": rng},
        )  # fmt: skip
        total, count = losses.lm_loss_sum(logits, batch["targets"], batch["loss_mask"])
        return total / jnp.maximum(count, 1.0), {"weight": count}

    return loss_fn


def _rm_loss(model: Transformer):
    # The RM loss of instructrl/stages/reward.py (K-wise, all pairs of a prompt in one row).
    def loss_fn(params, batch, rng):
        r = rewards_of(model, params, batch, deterministic=False, rng=rng)
        total, count = losses.reward_loss_sum(r, batch["pair_mask"])
        correct, pairs = losses.reward_accuracy(r, batch["pair_mask"])
        metrics = {"accuracy": correct / jnp.maximum(pairs, 1.0), "weight": count}
        return total / jnp.maximum(count, 1.0), metrics

    return loss_fn


def sft_batch(rng: np.random.Generator, batch: int, seq: int, vocab: int) -> dict:
    """An SFT batch [batch, seq] with the first quarter of each row as (unscored) prompt."""
    tokens = rng.integers(4, vocab, (batch, seq + 1)).astype(np.int32)
    ones = np.ones((batch, seq), np.int32)
    loss_mask = ones.copy()
    loss_mask[:, : seq // 4] = 0
    positions = np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, seq)).copy()
    return dict(tokens=tokens[:, :-1], targets=tokens[:, 1:], loss_mask=loss_mask, mask=ones,
                positions=positions)  # fmt: skip


def rm_batch(rng: np.random.Generator, batch: int, k: int, seq: int, vocab: int) -> dict:
    """An RM batch: [batch, k, seq] rows, every response ranked (0 best), all pairs valid."""
    tokens = rng.integers(4, vocab, (batch, k, seq)).astype(np.int32)
    mask = np.ones((batch, k, seq), np.int32)
    positions = np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, k, seq)).copy()
    pair_mask = np.triu(np.ones((k, k), np.float32), 1)
    return dict(tokens=tokens, mask=mask, positions=positions,
                response_mask=np.ones((batch, k), np.int32),
                pair_mask=np.broadcast_to(pair_mask, (batch, k, k)).copy())  # fmt: skip


def step_runner(model_dict: dict, head: str, batch: dict, seq: int):
    """(run(n): n blocking train steps, ModelConfig, abstract params), built as the stages do."""
    config = ModelConfig.from_dict(model_dict)
    model = Transformer(config, head=head)
    mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1)))
    rules = sharding.DEFAULT_RULES
    dummy = [np.zeros((1, seq), np.int32)] * 2 + [np.ones((1, seq), np.int32)]
    abstract_params, param_sh = sharding.abstract_params_and_shardings(model, dummy, mesh, rules)
    params = sharding.init_params_sharded(model, jax.random.key(0), dummy, mesh, rules)
    opt_cfg = train_lib.default_optimizer_config()
    opt_cfg.lr = 1e-4
    optimizer = train_lib.make_optimizer(opt_cfg, 10_000)
    _, state_sh = train_lib.abstract_train_state(optimizer, abstract_params, param_sh, mesh)
    state = jax.jit(
        lambda p: train_lib.create_train_state(p, optimizer, jax.random.key(1)),
        out_shardings=state_sh,
    )(params)
    loss_fn = _lm_loss(model) if head == "lm" else _rm_loss(model)
    with sharding.mesh_context(mesh, rules):
        step = train_lib.jit_train_step(
            train_lib.make_train_step(loss_fn, optimizer), state_sh, sharding.batch_sharding(mesh)
        )
    device_batch = sharding.shard_batch(batch, mesh)
    box = [state]

    def run(n: int) -> None:
        with sharding.mesh_context(mesh, rules):
            for _ in range(n):
                box[0], metrics = step(box[0], device_batch, box[0].rng)
        jax.block_until_ready(metrics["loss"])

    run(2)  # compile and warm up
    return run, config, abstract_params


def bench_step(kind: str, model_name: str, quick: bool, mm: Callable[[], None]) -> dict:
    model_dict, seq, sft_b, rm_b, rm_k = MODELS[model_name]
    if quick:
        sft_b, rm_b = max(sft_b // 4, 2), max(rm_b // 4, 1)
    rng = np.random.default_rng(0)
    vocab = model_dict["vocab_size"]
    if kind == "sft":
        head, batch, tokens = "lm", sft_batch(rng, sft_b, seq, vocab), sft_b * seq
    else:
        head, batch, tokens = "scalar", rm_batch(rng, rm_b, rm_k, seq, vocab), rm_b * rm_k * seq
    run, config, params = step_runner(model_dict, head, batch, seq)
    n_matmul = matmul_params(params, head)
    flops = flops_per_token(config, n_matmul, seq) * tokens
    steps, reps = (1, 3) if quick else (2, 5)
    walls, ratios, cpu_ratios, peaks = [], [], [], []
    for _ in range(reps):
        mm_wall, mm_cpu = matmul_rate(mm)
        wall, cpu = timed(lambda: run(steps))
        walls.append(wall / steps)
        ratios.append(flops * steps / wall / mm_wall)
        cpu_ratios.append(flops * steps / cpu / mm_cpu)
        peaks.append(mm_wall)
    return {
        "batch": list(batch["tokens"].shape[:-1]),
        "tokens_per_step": tokens,
        "params": train_lib.count_params(params),
        "matmul_params": n_matmul,
        "gflops_per_step": round(flops / 1e9, 2),
        "step_s_best": round(min(walls), 4),
        "step_s_median": round(statistics.median(walls), 4),
        "tokens_per_s": round(tokens / min(walls), 1),
        "mfu": round(statistics.median(ratios), 3),
        "mfu_cpu": round(statistics.median(cpu_ratios), 3),
        "matmul_gflops_best": round(max(peaks) / 1e9, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller batches, fewer repetitions")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated subset")
    args = parser.parse_args()
    names = [m for m in args.models.split(",") if m]
    unknown = sorted(set(names) - set(MODELS))
    if unknown:
        parser.error(f"--models: unknown {unknown} (known: {', '.join(MODELS)})")

    load_before = os.getloadavg()[0]
    mm = matmul_runner()
    results = {}
    for name in names:
        results[name] = {"seq_len": MODELS[name][1]}
        for kind in ("sft", "rm"):
            results[name][kind] = bench_step(kind, name, args.quick, mm)
    print(
        json.dumps(
            {
                "benchmark": "train_speed",
                "quick": args.quick,
                "device": jax.devices()[0].device_kind,
                "cores": len(os.sched_getaffinity(0)),
                "xla_flags": os.environ.get("XLA_FLAGS", ""),
                "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")},
                "load_avg_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
                "matmul": f"{MATMUL_N}x{MATMUL_N} f32",
                "models": results,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
