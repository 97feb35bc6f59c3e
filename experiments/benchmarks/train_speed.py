"""Speed of the SFT and RM train steps, and model FLOPs utilisation (MFU) on this machine.

    python -m experiments.benchmarks.train_speed [--quick] [--models=small,large,gpt2_10m]

For each model, times the train step the stages run (train_lib.make_train_step +
jit_train_step with the stages' loss functions, explicit shardings on a 1-device mesh, state
donated, AdamW with clipping) on synthetic batches of the stages' layout, and reports tokens/s
and MFU = model FLOPs/s / peak FLOPs/s, where
  model FLOPs per token = 6 * N + 12 * num_layers * d_model * seq_len   (forward + backward)
  N = parameters of the matrix multiplications: every kernel, plus the token embedding when it
      is also the unembedding (LM head, tied); not the position table, biases or norms, and
      for the RM (scalar head) not the token embedding, which it only looks up;
  peak = 2 n^3 / t of an n x n f32 matmul (n = 2048) timed through jax in the same process
      (the best of repeated timings, before and after the models: the figure XLA's own matmul
      reaches on these cores; it is not the chip's datasheet peak).
Models: `small` and `large` are the tiny experiment's sizes (experiments/tiny_instructgpt.py,
seq 128, its batch sizes); `gpt2_10m` is a ~10M-parameter GPT-2-style model at seq 256.
Each figure is the median over repetitions of a few steps each. On a shared machine read
`load_avg_1min`: other processes take cores from both the matmul and the steps.

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from experiments import tiny_instructgpt
from instructrl import losses, sharding, train_lib
from instructrl.models import ModelConfig, Transformer
from instructrl.stages.reward import rewards_of

GPT2_10M = dict(
    vocab_size=8192, max_len=256, num_layers=6, d_model=320, num_heads=5, d_ff=1280,
    position="learned", norm="layernorm", mlp="gelu", use_bias=True, tie_embeddings=True,
)  # fmt: skip

# name -> (model config dict, seq_len, SFT batch, RM prompts per batch, RM responses K)
MODELS: dict[str, tuple[dict[str, Any], int, int, int, int]] = {
    "small": (tiny_instructgpt.model_config("small", 384, 128).to_dict(), 128, 32, 32, 6),
    "large": (tiny_instructgpt.model_config("large", 384, 128).to_dict(), 128, 32, 32, 6),
    "gpt2_10m": (GPT2_10M, 256, 16, 4, 4),
}


# ------------------------------------------------------------------ FLOPs


def matmul_params(params: Any, head: str) -> int:
    """N of the 6N rule (see module docstring) from a params tree (abstract is fine)."""
    n = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        name = jax.tree_util.keystr(path)
        if leaf.ndim < 2 or "pos" in name:
            continue
        if "embed" in name and head != "lm":
            continue
        n += math.prod(leaf.shape)
    return n


def flops_per_token(config: ModelConfig, n_matmul: int, seq_len: int) -> float:
    return 6.0 * n_matmul + 12.0 * config.num_layers * config.d_model * seq_len


def matmul_peak(n: int = 2048, reps: int = 5) -> float:
    """Best FLOP/s of an n x n @ n x n f32 matmul through jax on this process's cores."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    mm = jax.jit(lambda x, y: x @ y)
    mm(a, b).block_until_ready()
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        mm(a, b).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2.0 * n**3 / best


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
    tokens = rng.integers(4, vocab, (batch, seq + 1)).astype(np.int32)
    ones = np.ones((batch, seq), np.int32)
    loss_mask = ones.copy()
    loss_mask[:, : seq // 4] = 0  # the prompt quarter carries no loss, as in SFT
    positions = np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, seq)).copy()
    return dict(tokens=tokens[:, :-1], targets=tokens[:, 1:], loss_mask=loss_mask, mask=ones,
                positions=positions)  # fmt: skip


def rm_batch(rng: np.random.Generator, batch: int, k: int, seq: int, vocab: int) -> dict:
    tokens = rng.integers(4, vocab, (batch, k, seq)).astype(np.int32)
    mask = np.ones((batch, k, seq), np.int32)
    positions = np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, k, seq)).copy()
    pair_mask = np.triu(np.ones((k, k), np.float32), 1)  # ranking 0 > 1 > ... > k-1
    return dict(tokens=tokens, mask=mask, positions=positions,
                response_mask=np.ones((batch, k), np.int32),
                pair_mask=np.broadcast_to(pair_mask, (batch, k, k)).copy())  # fmt: skip


def make_runner(model_dict: dict, head: str, batch: dict, seq: int):
    """A blocking `run(n)` doing n train steps, and the params tree (for counting)."""
    config = ModelConfig.from_dict(model_dict)
    model = Transformer(config, head=head)
    mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1)))
    rules = sharding.DEFAULT_RULES
    dummy = [np.zeros((1, seq), np.int32)] * 2 + [np.ones((1, seq), np.int32)]
    _, param_sh = sharding.abstract_params_and_shardings(model, dummy, mesh, rules)
    params = sharding.init_params_sharded(model, jax.random.key(0), dummy, mesh, rules)
    opt_cfg = train_lib.default_optimizer_config()
    opt_cfg.lr = 1e-4
    optimizer = train_lib.make_optimizer(opt_cfg, 10_000)
    abstract, state_sh = train_lib.abstract_train_state(
        optimizer, jax.eval_shape(lambda: params), param_sh, mesh
    )
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
    return run, config, abstract.params


def time_steps(run, steps: int, reps: int) -> tuple[float, float]:
    """(best, median) seconds per step over `reps` timings of `steps` steps each."""
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        run(steps)
        times.append((time.perf_counter() - start) / steps)
    return min(times), statistics.median(times)


def bench_model(name: str, quick: bool, peak_ref: list[float]) -> dict[str, Any]:
    model_dict, seq, sft_b, rm_b, rm_k = MODELS[name]
    if quick:
        sft_b, rm_b = max(sft_b // 4, 2), max(rm_b // 4, 1)
    rng = np.random.default_rng(0)
    vocab = model_dict["vocab_size"]
    out: dict[str, Any] = {"seq_len": seq}
    for kind, head, batch, tokens in (
        ("sft", "lm", sft_batch(rng, sft_b, seq, vocab), sft_b * seq),
        ("rm", "scalar", rm_batch(rng, rm_b, rm_k, seq, vocab), rm_b * rm_k * seq),
    ):
        run, config, params = make_runner(model_dict, head, batch, seq)
        peak_ref.append(matmul_peak(reps=3))  # under the load the steps see
        best, median = time_steps(run, 2 if quick else 3, 3 if quick else 7)
        n_matmul = matmul_params(params, head)
        out[kind] = {
            "batch": list(batch["tokens"].shape[:-1]),
            "tokens_per_step": tokens,
            "params": train_lib.count_params(params),
            "matmul_params": n_matmul,
            "flops_per_token": flops_per_token(config, n_matmul, seq),
            "step_s": best,
            "step_s_median": median,
            "tokens_per_s": tokens / best,
        }
    return out


def tokens_of(figures: dict[str, Any]) -> int:
    return figures["tokens_per_step"]


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
    peaks = [matmul_peak()]
    results = {name: bench_model(name, args.quick, peaks) for name in names}
    peaks.append(matmul_peak())
    peak = max(peaks)
    for figures in results.values():
        for kind in ("sft", "rm"):
            f = figures[kind]
            f["mfu"] = f["flops_per_token"] * f["tokens_per_s"] / peak
            f["mfu_median"] = f["flops_per_token"] * tokens_of(f) / f["step_s_median"] / peak
            for key in ("step_s", "step_s_median", "tokens_per_s", "flops_per_token"):
                f[key] = round(f[key], 4 if key.startswith("step") else 1)
            f["mfu"], f["mfu_median"] = round(f["mfu"], 3), round(f["mfu_median"], 3)
    print(
        json.dumps(
            {
                "benchmark": "train_speed",
                "quick": args.quick,
                "device": jax.devices()[0].device_kind,
                "cores": len(os.sched_getaffinity(0)),
                "xla_flags": os.environ.get("XLA_FLAGS", ""),
                "load_avg_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
                "matmul_peak_gflops": round(peak / 1e9, 1),
                "matmul_gflops_each": [round(p / 1e9, 1) for p in peaks],
                "models": results,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
