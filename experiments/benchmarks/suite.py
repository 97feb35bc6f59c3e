"""The benchmark suite: ours and PyTorch + transformers side by side, in one process and run.

  python -m experiments.benchmarks.suite [--quick] [--device-report] [--shape NAME]
      [--dtype float32|bfloat16] [--threads N] [--rows sft,rm,sample,ppo] [--reps N]
      [--budget-s S] [--plan-json PATH] [--json PATH] [--markdown PATH]

Shapes and batches: experiments/benchmarks/shapes.py (the same config `python -m
instructrl.plan` reads). Default shape: cpu7m on a CPU, gpt2_124m on an accelerator;
--quick: shape tiny, 2 reps. Rows, each timed by its median over reps, ours and the peer
called in turn rep by rep (experiments/benchmarks/timing.py), same threads, same dtype:

  sft_train_step   one train_lib step as the SFT driver jits it (LM loss, AdamW, clipping)
                   vs transformers' *ForCausalLM + torch AdamW. tokens/s = B*T / step time.
  rm_train_step    the same with the K-wise RM loss on [B, K, T] (B*K*T tokens) vs the
                   transformers trunk + a linear head on the last token, all-pairs loss.
  sample_b{B}      our KV-cache sampler (sample_jit, weights in the compute dtype) vs
                   `generate` (temperature 1, no top-k/p, forced to full length).
                   tokens/s = B*new_tokens / call time (prefill included).
  ppo_iteration    one PPO iteration (rollout + update) as the stage driver builds it
                   (experiments/benchmarks/ppo_speed.PPOBench): episodes/s, the rollout's
                   share, peak memory. No peer. grpo_iteration and rloo_iteration: the
                   same for GRPO and RLOO (PPO's critic-free kind) at PPO's episodes per
                   iteration, G = 4 samples per prompt. One entry of RL_STAGES per algorithm.

Denominators, measured in this run after the rows (the best of jax and torch, median of reps):
  peak FLOP/s     an [n, n] x [n, n] product in the run's dtype, 2 n^3 / time;
  copy bytes/s    y = x + 1 over a large f32 array, (bytes read + bytes written) / time.
MFU = model FLOPs / step time / peak FLOP/s, model FLOPs = 3 x instructrl.costs.forward_flops
= 6 x (weight-matmul params, unembedding included) x tokens + 12 x layers x T x heads x
head_dim x tokens (QK^T and PV over the full T, backward twice the forward; no remat).
Sampling bandwidth fraction = (bytes of all weight matmuls incl. the unembedding + the KV
cache of the mean context, p + n/2 tokens) x new tokens / call time / copy bytes/s: the
share of the memory-bandwidth bound a decode reaches. Prints one JSON object (stdout or
--json) and a Markdown table (stderr or --markdown). Read load_avg_1min: on a busy machine
compare the `cpu_s` figures and the ratios, not absolute speed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import time
from collections.abc import Callable

import numpy as np

from experiments.benchmarks import peers, shapes
from experiments.benchmarks.timing import interleaved_within, peak_rss_mib

MESH1 = {"data": 1, "fsdp": 1, "tensor": 1}
DEFINITIONS = {
    "tokens_per_s": "train: batch x length (x K for the RM) / step; sampling: batch x "
    "new_tokens / call (prefill included)",
    "mfu": "model_flops / step_s / roofline.matmul_flops_per_s.peak; model_flops = 3 x "
    "instructrl.costs.forward_flops (6 x matmul params incl. unembedding x tokens + "
    "12 x layers x T x heads x head_dim x tokens)",
    "bandwidth_fraction": "bytes_per_decode_step x new_tokens / call_s / "
    "roofline.copy_bytes_per_s.peak; bytes_per_decode_step = weight matmuls incl. "
    "unembedding in the param dtype + KV cache of prompt + new_tokens / 2 tokens",
    "ratio_ours_over_peer": "peer wall time / our wall time (> 1: ours is faster)",
    "memory_peak_so_far": "the process's peaks after the row (jax device stats where the "
    "backend has them, torch CUDA, RSS): later rows include earlier ones",
}
GROUPS = ("sft", "rm", "sample", "ppo")


class Context:
    """What every row reads: the experiment config, dtype, torch device, reps and budget."""

    def __init__(self, exp, dtype: str, reps: int, budget_s: float, device):
        self.exp, self.dtype, self.reps, self.budget_s = exp, dtype, reps, budget_s
        self.device = device

    def interleave(self, runs: dict[str, Callable[[], None]]) -> tuple[dict, dict]:
        """Medians of runs rep by rep within the budget; (medians, {"reps",
        "budget_exhausted"})."""
        medians, done = interleaved_within(runs, self.reps, self.budget_s)
        return medians, {"reps": done, "budget_exhausted": done < self.reps}


def model_config(exp, **changes):
    import dataclasses

    from instructrl.models import ModelConfig

    return dataclasses.replace(ModelConfig.from_dict(exp.model), **changes)


def memory_now(ctx: Context) -> dict:
    """Peaks so far: jax device (where the backend reports it), torch CUDA, process RSS."""
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    return {
        "jax_device_peak_bytes": stats.get("peak_bytes_in_use"),
        "torch": peers.memory(ctx.device),
        "peak_rss_mib": peak_rss_mib(),
    }


# ---- denominators -------------------------------------------------------------------------


def measure_roofline(quick: bool, dtype: str, device, reps: int) -> dict:
    import jax
    import jax.numpy as jnp

    accel = jax.default_backend() != "cpu"
    n = 8192 if accel else (512 if quick else 1024)
    n_bytes = (1 << 30) if accel else ((16 if quick else 128) << 20)
    a = jnp.ones((n, n), dtype) / n
    mm = jax.jit(lambda x, y: x @ y)
    add = jax.jit(lambda x: x + 1.0)
    x = jnp.zeros((n_bytes // 4,), jnp.float32)
    mm(a, a).block_until_ready()
    add(x).block_until_ready()
    flops, _ = interleaved_within(
        {"jax": lambda: mm(a, a).block_until_ready(), "torch": peers.matmul(n, dtype, device)},
        reps,
    )
    copy, _ = interleaved_within(
        {"jax": lambda: add(x).block_until_ready(), "torch": peers.copy(n_bytes, device)}, reps
    )
    f = {k: 2.0 * n**3 / v["wall_s"] for k, v in flops.items()}
    c = {k: 2.0 * n_bytes / v["wall_s"] for k, v in copy.items()}
    return {
        "matmul_n": n,
        "matmul_dtype": dtype,
        "matmul_flops_per_s": {**f, "peak": max(f.values())},
        "copy_bytes": n_bytes,
        "copy_bytes_per_s": {**c, "peak": max(c.values())},
    }


# ---- rows ---------------------------------------------------------------------------------


def _train_parts(exp, kind: str):
    """(model, optimizer, jitted step, initial state, batch) of stage kind "sft" or "rm",
    built as the drivers build them (train_lib.make_train_step + jit_train_step)."""
    import jax
    import jax.numpy as jnp

    from instructrl import losses, sharding, train_lib
    from instructrl.models import Transformer, positions_from_mask
    from instructrl.models.reward import rewards_of

    section, seq = exp[kind], exp.data.seq_len
    rm = kind == "rm"
    model = Transformer(model_config(exp), head="scalar" if rm else "lm")
    mesh, rules = sharding.make_mesh(exp.mesh), sharding.rules_from_config(exp.get("rules"))
    dummy = [np.zeros((1, 8), np.int32)] * 2 + [np.ones((1, 8), np.int32)]
    params = sharding.init_params_sharded(model, jax.random.key(0), dummy, mesh, rules)
    optimizer = train_lib.make_optimizer(section.optimizer, 1000, name=f"{kind}.optimizer")
    param_sh = jax.tree.map(lambda x: x.sharding, params)
    _, state_sh = train_lib.abstract_train_state(optimizer, params, param_sh, mesh)
    state = jax.device_put(
        train_lib.create_train_state(params, optimizer, jax.random.key(1)), state_sh
    )

    def lm_loss(p, batch, rng):
        args = (batch["tokens"], batch["positions"], batch["mask"])
        logits = model.apply({"params": p}, *args, deterministic=False, rngs={"dropout": rng})
        total, count = losses.lm_loss_sum(logits, batch["targets"], batch["loss_mask"])
        return total / jnp.maximum(count, 1.0), {"weight": count}

    def rm_loss(p, batch, rng):
        r = rewards_of(model, p, batch, deterministic=False, rng=rng)
        total, count = losses.reward_loss_sum(r, batch["pair_mask"])
        return total / jnp.maximum(count, 1.0), {"weight": count}

    rng = np.random.default_rng(0)
    b, vocab = section.batch_size, model.config.vocab_size
    if rm:
        k = exp.data.max_responses
        tokens = rng.integers(1, vocab, (b, k, seq)).astype(np.int32)
        mask = np.ones_like(tokens)
        pair = np.broadcast_to(np.triu(np.ones((k, k), np.float32), 1), (b, k, k))
        batch = {"tokens": tokens, "mask": mask, "response_mask": np.ones((b, k), np.int32)}
        batch |= {"positions": np.broadcast_to(np.arange(seq, dtype=np.int32), tokens.shape)}
        batch["pair_mask"] = np.ascontiguousarray(pair)
    else:
        tokens = rng.integers(1, vocab, (b, seq + 1)).astype(np.int32)
        mask = np.ones((b, seq), np.int32)
        batch = {"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": mask,
                 "mask": mask, "positions": np.asarray(positions_from_mask(mask))}  # fmt: skip
    step = train_lib.make_train_step(rm_loss if rm else lm_loss, optimizer, accum_steps=1)
    jitted = train_lib.jit_train_step(step, state_sh, sharding.batch_sharding(mesh))
    batch = sharding.shard_batch({k: np.ascontiguousarray(v) for k, v in batch.items()}, mesh)
    return model, optimizer, jitted, state, batch, np.asarray(tokens)


def train_row(ctx: Context, kind: str) -> dict:
    from instructrl.costs import forward_flops

    exp = ctx.exp
    model, _, jitted, state, batch, tokens = _train_parts(exp, kind)
    box = [state]

    def ours():
        box[0], metrics = jitted(box[0], batch, box[0].rng)
        metrics["loss"].block_until_ready()

    start = time.perf_counter()
    ours()
    compile_s = time.perf_counter() - start
    peer_tokens = tokens if kind == "rm" else tokens[:, :-1]
    head = "scalar" if kind == "rm" else "lm"
    peer = peers.train_step(
        model.config, head, peer_tokens, exp[kind].optimizer, device=ctx.device, dtype=ctx.dtype
    )
    medians, reps = ctx.interleave({"ours": ours, "peer": peer})
    rows, seq = math.prod(peer_tokens.shape[:-1]), exp.data.seq_len
    flops = 3 * forward_flops(model.config, rows * seq, seq, head)
    out = {"batch": list(peer_tokens.shape), "tokens_per_step": rows * seq, "model_flops": flops,
           "first_call_s_incl_compile": round(compile_s, 3), **reps}  # fmt: skip
    for side, t in medians.items():
        out[side] = {
            "step_s": t["wall_s"],
            "cpu_s": t["cpu_s"],
            "tokens_per_s": rows * seq / t["wall_s"],
        }
    out["ratio_ours_over_peer"] = medians["peer"]["wall_s"] / medians["ours"]["wall_s"]
    return out


def sample_bytes_per_token(mc, batch: int, prompt_len: int, new_tokens: int) -> float:
    """Bytes a decode step must read: every weight matmul (the unembedding included) in the
    param dtype, and the KV cache of the mean context (prompt + new_tokens / 2)."""
    import jax.numpy as jnp

    from instructrl.costs import block_matmul_params, kv_cache_bytes

    weights = mc.num_layers * block_matmul_params(mc) + mc.d_model * mc.vocab_size
    kv = kv_cache_bytes(mc, batch, prompt_len + new_tokens // 2, MESH1)
    return weights * jnp.dtype(mc.param_dtype).itemsize + kv


def sample_row(ctx: Context, batch: int) -> dict:
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from instructrl.models import Transformer, sample_jit

    b_cfg = ctx.exp.bench
    p, n = b_cfg.sample_prompt_len, b_cfg.sample_new_tokens
    mc = model_config(ctx.exp, param_dtype=ctx.dtype)
    model = Transformer(mc)
    rng = np.random.default_rng(0)
    prompts = rng.integers(peers.EOS + 1, mc.vocab_size, (batch, p)).astype(np.int32)
    mask = jnp.ones(prompts.shape, jnp.int32)
    params = nn.unbox(jax.jit(model.init)(jax.random.key(0), mask[:1], mask[:1], mask[:1]))
    params, tokens = params["params"], jnp.asarray(prompts)
    seeds = iter(range(1 << 30))

    def ours():
        out = sample_jit(model, params, tokens, mask, jax.random.key(next(seeds)),
                         max_new_tokens=n, top_k=0, top_p=1.0)  # fmt: skip
        out.tokens.block_until_ready()

    start = time.perf_counter()
    ours()
    compile_s = time.perf_counter() - start
    peer = peers.generate(mc, prompts, n, device=ctx.device, dtype=ctx.dtype)
    medians, reps = ctx.interleave({"ours": ours, "peer": peer})
    step_bytes = sample_bytes_per_token(mc, batch, p, n)
    out = {"batch": batch, "prompt_len": p, "new_tokens": n, "bytes_per_decode_step": step_bytes,
           "first_call_s_incl_compile": round(compile_s, 3), **reps}  # fmt: skip
    for side, t in medians.items():
        out[side] = {
            "call_s": t["wall_s"],
            "cpu_s": t["cpu_s"],
            "tokens_per_s": batch * n / t["wall_s"],
        }
    out["ratio_ours_over_peer"] = medians["peer"]["wall_s"] / medians["ours"]["wall_s"]
    return out


def rl_row(ctx: Context, stage: str) -> dict:
    """One iteration (rollout + update) of the experiment's section `stage` as
    instructrl/stages/ppo.py runs it (PPO; GRPO and RLOO are its critic-free kind)."""
    import statistics

    from experiments.benchmarks.ppo_speed import PPOBench

    bench = PPOBench(ctx.exp, stage)
    first = bench.iteration()
    runs, start = [], time.perf_counter()
    while len(runs) < ctx.reps:
        runs.append(bench.iteration())
        if time.perf_counter() - start > ctx.budget_s:
            break
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    b, p, n = bench.cfg.episodes, bench.prompt_len, bench.cfg.max_new_tokens
    return {
        "batch": b, "prompt_len": p, "new_tokens": n, "group_size": bench.cfg.group_size,
        "num_minibatches": bench.cfg.num_minibatches, "num_epochs": bench.cfg.num_epochs,
        "first_iteration_s_incl_compile": round(first["total_s"], 3),
        "reps": len(runs), "budget_exhausted": len(runs) < ctx.reps,
        "ours": {
            "iteration_s": med["total_s"], "episodes_per_s": b / med["total_s"],
            "rollout_s": med["rollout_s"], "update_s": med["update_s"],
            "rollout_fraction": med["rollout_s"] / med["total_s"],
            "generated_tokens_per_s": b * n / med["rollout_s"],
        },
    }  # fmt: skip


# The RL algorithms' sections in shapes.py, one row `<stage>_iteration` each.
RL_STAGES = ("ppo", "grpo", "rloo")


def add_fractions(rows: dict[str, dict], roofline: dict) -> None:
    """MFU of the train rows, bandwidth share of the sampling rows, from the roofline."""
    flops = roofline["matmul_flops_per_s"]["peak"]
    bandwidth = roofline["copy_bytes_per_s"]["peak"]
    for row in rows.values():
        for side in ("ours", "peer"):
            if side not in row:
                continue
            if "model_flops" in row:
                row[side]["mfu"] = row["model_flops"] / row[side]["step_s"] / flops
            if "bytes_per_decode_step" in row:
                moved = row["bytes_per_decode_step"] * row["new_tokens"]
                row[side]["bandwidth_fraction"] = moved / row[side]["call_s"] / bandwidth


def plan_peaks(path: str) -> dict[str, int]:
    """{stage kind: predicted peak bytes per device} from `python -m instructrl.plan --json`."""
    with open(path) as f:
        plan = json.load(f)
    return {s["kind"]: int(s["peak"]) for s in plan["stages"]}


def run_rows(ctx: Context, groups: list[str], predicted: dict[str, int]) -> dict[str, dict]:
    rows: dict[str, dict] = {}
    todo: list[tuple[str, str, Callable[[], dict]]] = []
    if "sft" in groups:
        todo.append(("sft_train_step", "sft", lambda: train_row(ctx, "sft")))
    if "rm" in groups:
        todo.append(("rm_train_step", "rm", lambda: train_row(ctx, "rm")))
    if "sample" in groups:
        for b in ctx.exp.bench.sample_batches:
            todo.append((f"sample_b{b}", "", lambda b=b: sample_row(ctx, b)))
    if "ppo" in groups:
        for stage in RL_STAGES:  # kind ppo or grpo: the plan's prediction to compare with
            todo.append((f"{stage}_iteration", ctx.exp[stage].kind, lambda s=stage: rl_row(ctx, s)))
    for name, kind, fn in todo:
        print(f"suite: {name} ...", file=sys.stderr, flush=True)
        start = time.perf_counter()
        row = fn()
        row["row_s"] = round(time.perf_counter() - start, 2)
        row["memory_peak_so_far"] = mem = memory_now(ctx)
        if kind in predicted:
            measured = mem["jax_device_peak_bytes"]
            row["plan"] = {"stage": kind, "predicted_peak_bytes": predicted[kind],
                           "measured_peak_bytes": measured,
                           "measured_over_predicted": None if measured is None
                           else measured / predicted[kind]}  # fmt: skip
        rows[name] = row
    return rows


# ---- output -------------------------------------------------------------------------------


def _fmt(x, digits: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}g}" if abs(x) < 1e4 else f"{x:.3e}"
    return str(x)


def markdown(result: dict) -> str:
    r = result["roofline"]
    head = (
        f"Benchmark suite ({result['date']}, {result['device']['jax']}, shape "
        f"{result['shape']}, {result['dtype']}, {result['threads']} threads, load "
        f"{result['load_avg_1min']}); peak {r['matmul_flops_per_s']['peak']:.3e} FLOP/s "
        f"(matmul n={r['matmul_n']}), copy {r['copy_bytes_per_s']['peak']:.3e} B/s"
    )
    lines = [head, *(f"**Warning:** {w}" for w in result.get("warnings", [])), ""]
    lines += ["| row | shape | ours | peer | ours/peer | ours MFU or BW share | "
             "peer MFU or BW share | reps | notes |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, row in result["rows"].items():
        ours, peer = row["ours"], row.get("peer")
        if "episodes_per_s" in ours:
            shape = f"{row['batch']}x({row['prompt_len']}+{row['new_tokens']})"
            speed = f"{ours['episodes_per_s']:.3g} episodes/s"
            frac, pfrac = f"rollout {ours['rollout_fraction']:.0%}", "-"
        else:
            key = "mfu" if "mfu" in ours else "bandwidth_fraction"
            shape = "x".join(map(str, row["batch"])) if isinstance(row["batch"], list) else (
                f"{row['batch']}x({row['prompt_len']}+{row['new_tokens']})")  # fmt: skip
            speed = f"{ours['tokens_per_s']:.4g} tok/s"
            frac, pfrac = f"{ours[key]:.1%}", f"{peer[key]:.1%}"
        notes = []
        if row.get("budget_exhausted"):
            notes.append("budget hit")
        if row.get("plan"):
            p = row["plan"]
            notes.append(f"peak so far {_fmt(p['measured_peak_bytes'])} B vs plan "
                         f"{_fmt(p['predicted_peak_bytes'])} B")  # fmt: skip
        elif "memory_peak_so_far" in row:
            mem = row["memory_peak_so_far"]
            device = mem["jax_device_peak_bytes"]
            notes.append(f"peak so far {_fmt(device)} B on device" if device is not None
                         else f"peak RSS so far {mem['peak_rss_mib']} MiB")  # fmt: skip
        lines.append(
            f"| {name} | {shape} | {speed} | "
            + (f"{peer['tokens_per_s']:.4g} tok/s" if peer else "-")
            + f" | {_fmt(row.get('ratio_ours_over_peer'))} | {frac} | {pfrac} | {row['reps']} | "
            + "; ".join(notes)
            + " |"
        )
    return "\n".join(lines) + "\n"


def busy_warnings(load: float, cores: int, threads: int) -> list[str]:
    """A warning when the load average before the run says other work had the cores."""
    if load <= max(0.5, cores - threads + 0.5):
        return []
    return [
        f"load average {load:.2f} on {cores} cores before the run: other work competed with "
        f"the {threads} threads used, so these are not quiet-machine figures"
    ]


def device_report() -> dict:
    import jax

    return {
        "backend": jax.default_backend(),
        "devices": [
            {"id": d.id, "platform": d.platform, "kind": d.device_kind,
             "memory_stats": d.memory_stats()}
            for d in jax.devices()
        ],
    }  # fmt: skip


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny shape, 2 reps")
    parser.add_argument("--device-report", action="store_true", help="add jax device stats")
    parser.add_argument("--shape", default="", help=f"one of {', '.join(shapes.MODELS)}")
    parser.add_argument("--dtype", default="", help="float32 | bfloat16 (default: f32 on CPU)")
    parser.add_argument("--threads", type=int, default=0, help="pin to N cores (0 = all)")
    parser.add_argument("--rows", default=",".join(GROUPS), help="of " + ",".join(GROUPS))
    parser.add_argument("--reps", type=int, default=0, help="default 2 (--quick) or 7")
    parser.add_argument("--budget-s", type=float, default=120.0, help="per row, after compile")
    parser.add_argument("--plan-json", default="", help="instructrl.plan --json output")
    parser.add_argument("--json", default="", help="write the JSON here (default stdout)")
    parser.add_argument("--markdown", default="", help="write the table here (default stderr)")
    args = parser.parse_args(argv)
    bad = sorted(set(args.rows.split(",")) - set(GROUPS))
    if bad:
        parser.error(f"--rows: unknown {bad} (known: {', '.join(GROUPS)})")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cores = sorted(os.sched_getaffinity(0))
    threads = args.threads or len(cores)
    # Pin before the first jax computation creates XLA's thread pool; torch gets the same
    # cores and thread count.
    os.sched_setaffinity(0, set(cores[:threads]))
    import jax
    import torch
    import transformers

    torch.set_num_threads(threads)
    accel = jax.default_backend() != "cpu"
    shape = args.shape or ("tiny" if args.quick else ("gpt2_124m" if accel else "cpu7m"))
    dtype = args.dtype or ("bfloat16" if accel else "float32")
    exp = shapes.get_config(f"shape={shape},dtype={dtype}")
    reps = args.reps or (2 if args.quick else 7)
    device = peers.torch_device(jax.default_backend())
    load_before = os.getloadavg()[0]
    ctx = Context(exp, dtype, reps, args.budget_s, device)
    predicted = plan_peaks(args.plan_json) if args.plan_json else {}
    rows = run_rows(ctx, args.rows.split(","), predicted)
    # After the rows, so their peak memory does not include the probes' arrays.
    roofline = measure_roofline(args.quick, dtype, device, reps)
    add_fractions(rows, roofline)
    result = {
        "benchmark": "suite",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "quick": args.quick,
        "shape": shape,
        "model": exp.model.to_dict(),
        "dtype": dtype,
        "threads": threads,
        "load_avg_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "device": {"jax": str(jax.devices()[0].device_kind), "torch": str(device)},
        "versions": {
            "jax": jax.__version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
        "roofline": roofline,
        "definitions": DEFINITIONS,
        "rows": rows,
        "warnings": busy_warnings(load_before, len(cores), threads),
    }
    if args.device_report:
        result["device_report"] = device_report()
    text = json.dumps(result)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    else:
        print(text)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(markdown(result))
    else:
        print(markdown(result), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
