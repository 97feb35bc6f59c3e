"""Speed and memory of one PPO iteration at the tiny experiment's model sizes, JSON out.

  python -m experiments.benchmarks.ppo_speed [--quick] [--threads N] [--sizes small,large]

For model_config("small") and model_config("large") of experiments/tiny_instructgpt.py
(random init; reward and value networks of the same config with a scalar head, as the
experiment's RM-initialised value net) and that experiment's `ppo` settings (plain PPO:
batch 64, 4 minibatches, 1 epoch, prompts of data.max_prompt_len tokens, 32 new tokens),
built and called exactly as the stage driver (instructrl/stages/ppo.py) does, it measures:

  iteration   episodes/s of rollout + update and the time split (median of several);
  memory      peak RSS of the process (ru_maxrss) after the PPO iterations and at the end,
              and jax device memory stats where the backend reports them (not on CPU);
  generation  tokens/s of the whole rollout (sampling with the KV cache plus the policy,
              reference, value and reward passes) and of the sampler alone, against
              transformers' GPT2LMHeadModel.generate on the same config, batch, prompt
              length and new tokens (do_sample, temperature 1, top_k 0, use_cache, forced to
              full length); ours and torch alternate rep by rep, same threads;
  transfers   whether anything crosses to the host inside an iteration:
              - one driver-exact iteration under jax.transfer_guard_device_to_host("disallow")
                (on CPU jax does not guard device->host reads, they are zero-copy: jax#16602);
              - the implicit transfers of that iteration, logged with transfer_guard("log");
              - dispatch time of rollout + update without a block vs their run time: a host
                round-trip between or inside them would make the dispatch wait;
              - the lowered programs contain no host callback, send/recv or in/outfeed.

Each size runs in a fresh subprocess, so its peak RSS is its own. On a shared machine read
`load_avg_1min` and the `cpu_` (process CPU time) figures, which background load disturbs less.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

from experiments.benchmarks.timing import interleaved_medians, peak_rss_mib

PAD, BOS, EOS = 0, 2, 3  # the ids instructrl.tokenizer trains with
HOST_OPS = re.compile(r"callback|\b(send|recv|infeed|outfeed)\b", re.IGNORECASE)


@contextlib.contextmanager
def captured_stderr(path: str):
    """Redirects file descriptor 2 (where jax's C++ transfer-guard log writes) to `path`."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(path, "w") as f:
        os.dup2(f.fileno(), 2)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


class PPOBench:
    """The PPO pieces of one model size, set up as instructrl/stages/ppo.py sets them up."""

    @classmethod
    def for_size(cls, size: str, quick: bool) -> PPOBench:
        """model_config(size) of experiments/tiny_instructgpt.py and its `ppo` section."""
        from experiments import tiny_instructgpt

        exp = tiny_instructgpt.get_config(f"size={size}")
        if quick:
            exp.ppo.batch_size = 16
        return cls(exp)

    def __init__(self, exp, stage: str = "ppo"):
        """exp: an experiment config; its `model` (also the reward and value networks'
        config), section `stage` (kind ppo or grpo: critic-free, no value network),
        data.max_prompt_len, mesh and rules are used."""
        import jax

        from instructrl import sharding
        from instructrl.models import ModelConfig, Transformer
        from instructrl.rl import ppo
        from instructrl.rl.stage_config import ppo_config

        section = exp[stage]
        self.cfg = ppo_config(section, stage, EOS, PAD, penalty_unit=1.0)
        self.model_config = ModelConfig.from_dict(exp.model.to_dict())
        self.prompt_len = exp.data.max_prompt_len
        self.mesh = sharding.make_mesh(exp.mesh)
        self.rules = sharding.rules_from_config(exp.get("rules"))
        self.policy = Transformer(self.model_config)
        scalar = Transformer(self.model_config, head="scalar")
        value = scalar if self.cfg.separate_value_network else None
        self.models = ppo.PPOModels(policy=self.policy, reward=scalar, value=value)
        dummy = [np.zeros((1, 8), np.int32)] * 2 + [np.ones((1, 8), np.int32)]
        init = sharding.init_params_sharded
        self.reference = init(self.policy, jax.random.key(0), dummy, self.mesh, self.rules)
        self.reward = init(scalar, jax.random.key(1), dummy, self.mesh, self.rules)
        optimizer = ppo.make_ppo_optimizer(self.cfg, section, section.num_iterations)
        _, state_sh = ppo.abstract_ppo_state(
            self.models, self.cfg, optimizer, self.mesh, self.rules
        )
        value = ppo.init_value_params(self.models, self.cfg, self.reward)
        self.state = ppo.create_ppo_state(
            self.cfg, optimizer, self.reference, value, jax.random.key(2), state_sh
        )
        self.rollout_fn = ppo.make_rollout_fn(
            self.models,
            self.cfg,
            mesh=self.mesh,
            rules=self.rules,
            params_shardings=ppo.rollout_params_shardings(
                self.models, self.cfg, self.mesh, self.rules
            ),
        )
        self.update_fn = ppo.make_update_fn(
            self.models, self.cfg, optimizer, mesh=self.mesh, rules=self.rules,
            state_shardings=state_sh,
        )  # fmt: skip
        rng = np.random.default_rng(0)
        b, p = self.cfg.batch_size, self.prompt_len
        tokens = rng.integers(EOS + 1, self.model_config.vocab_size, (b, p)).astype(np.int32)
        tokens[:, 0] = BOS
        self.batch = sharding.shard_batch(
            {"prompt_tokens": tokens, "prompt_mask": np.ones((b, p), np.int32)}, self.mesh
        )
        self.step = 0
        self.params_count = {
            "policy": sum(x.size for x in jax.tree.leaves(self.reference)),
            "reward_and_value_each": sum(x.size for x in jax.tree.leaves(self.reward)),
        }

    def rollout(self):
        """The stage's rollout call (rollout params, rng fold-in and beta as it passes them)."""

        from instructrl.rl import ppo

        params = ppo.rollout_params(self.state, self.reference, self.reward, 1.0, 0.0)
        return self.rollout_fn(
            params,
            self.batch["prompt_tokens"],
            self.batch["prompt_mask"],
            ppo.iteration_keys(self.state.rng, self.step)[0],
            self.state.kl["beta"],
        )

    def iteration(self, *, sync_between: bool = True) -> dict[str, float]:
        """One PPO iteration as the stage runs it; seconds of rollout, update and dispatch.

        sync_between=False dispatches the update right after the rollout with no block, as
        a loop that does not time the split could: `dispatch_s` is then how long the host
        took to hand both programs over."""
        import jax

        start = time.perf_counter()
        ro = self.rollout()
        if sync_between:
            jax.block_until_ready(ro.response_tokens)
        mid = time.perf_counter()
        self.state, metrics = self.update_fn(self.state, ro, None, self.state.rng)
        dispatched = time.perf_counter()
        jax.block_until_ready((self.state.step, metrics))
        end = time.perf_counter()
        self.step += 1
        self.last_rollout_metrics = ro.metrics
        return {
            "rollout_s": mid - start,
            "update_s": end - mid,
            "total_s": end - start,
            "dispatch_s": dispatched - start,
        }

    def transfer_log(self, tmp: str) -> dict[str, dict[str, int]]:
        """Implicit transfers jax logs (transfer_guard "log") in each part of one iteration
        as the stage runs it, counted by direction ({"host-to-device": 2, ...})."""
        import jax

        from instructrl.rl import ppo

        parts = {
            "rollout_params": lambda: ppo.rollout_params(
                self.state, self.reference, self.reward, 1.0, 0.0
            ),
            "rng_fold_in": lambda: ppo.iteration_keys(self.state.rng, self.step)[0],
        }
        out, values = {}, {}
        for name, fn in parts.items():
            out[name], values[name] = self._logged(tmp, name, fn)
        b = self.batch
        args = (b["prompt_tokens"], b["prompt_mask"], values["rng_fold_in"], self.state.kl["beta"])
        out["rollout_fn"], ro = self._logged(
            tmp, "rollout", lambda: self.rollout_fn(values["rollout_params"], *args)
        )
        out["update_fn"], (self.state, metrics) = self._logged(
            tmp, "update", lambda: self.update_fn(self.state, ro, None, self.state.rng)
        )
        jax.block_until_ready((self.state.step, metrics))
        self.step += 1
        return out

    @staticmethod
    def _logged(tmp: str, name: str, fn):
        import jax

        path = os.path.join(tmp, f"{name}.log")
        with captured_stderr(path), jax.transfer_guard("log"):
            value = fn()
        counts: dict[str, int] = {}
        with open(path) as f:
            for line in f:
                if " transfer:" in line:
                    direction = line.split("] ", 1)[-1].split(" transfer:")[0].strip()
                    counts[direction] = counts.get(direction, 0) + 1
        return counts, value

    def host_ops_in_programs(self) -> dict[str, list[str]]:
        """Host-crossing ops (callbacks, send/recv, in/outfeed) in the lowered programs."""

        from instructrl import sharding
        from instructrl.rl import ppo

        params = ppo.rollout_params(self.state, self.reference, self.reward, 1.0, 0.0)
        key = ppo.iteration_keys(self.state.rng, self.step)[0]
        with sharding.mesh_context(self.mesh, self.rules):
            rollout_args = (
                params,
                self.batch["prompt_tokens"],
                self.batch["prompt_mask"],
                key,
                self.state.kl["beta"],
            )
            rollout_hlo = self.rollout_fn.jitted.lower(*rollout_args).as_text()
            ro = self.rollout_fn(*rollout_args)
            s = self.state
            update_hlo = self.update_fn.jitted.lower(
                (s.params, s.opt_state, s.ema, s.kl), (s.step, s.rng), ro, None, s.rng
            ).as_text()
        return {
            name: sorted({m.group(0) for m in HOST_OPS.finditer(text)})
            for name, text in (("rollout", rollout_hlo), ("update", update_hlo))
        }


def torch_generate(bench: PPOBench, prompts: np.ndarray):
    """GPT2LMHeadModel of the same config; a blocking full-length sampling call."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    mc = bench.model_config
    torch.manual_seed(0)
    model = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=mc.vocab_size,
            n_positions=mc.max_len,
            n_embd=mc.d_model,
            n_layer=mc.num_layers,
            n_head=mc.num_heads,
            n_inner=mc.d_ff,
            activation_function="gelu_new",  # tanh GELU, as ours
            layer_norm_epsilon=mc.norm_eps,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=BOS,
            eos_token_id=EOS,
            pad_token_id=PAD,
        )
    ).eval()
    ids = torch.tensor(prompts, dtype=torch.long)
    n = bench.cfg.max_new_tokens

    def run():
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                do_sample=True,
                temperature=1.0,
                top_k=0,
                top_p=1.0,
                max_new_tokens=n,
                min_new_tokens=n,  # no early stop
                use_cache=True,
            )
        assert out.shape[1] == ids.shape[1] + n

    run()
    return run


def measure(size: str, quick: bool) -> dict:
    """Every figure of one model size (run in its own process)."""
    import jax

    from instructrl.models import sample_jit

    reps = 3 if quick else 5
    bench = PPOBench.for_size(size, quick)
    b, n = bench.cfg.batch_size, bench.cfg.max_new_tokens

    # ---- iterations: the first compiles both programs
    first = bench.iteration()
    runs = [bench.iteration() for _ in range(reps)]
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    async_runs = [bench.iteration(sync_between=False) for _ in range(reps)]
    dispatch = statistics.median(r["dispatch_s"] for r in async_runs)
    async_total = statistics.median(r["total_s"] for r in async_runs)
    response_length = float(bench.last_rollout_metrics["response_length"])
    rss_ppo = peak_rss_mib()
    device_stats = jax.devices()[0].memory_stats()

    # ---- transfers inside one iteration, exactly as the stage makes them
    with jax.transfer_guard_device_to_host("disallow"):
        bench.iteration()
    with tempfile.TemporaryDirectory() as tmp:
        logged = bench.transfer_log(tmp)
    host_ops = bench.host_ops_in_programs()

    # ---- generation against transformers, alternating rep by rep
    prompts = np.asarray(jax.device_get(bench.batch["prompt_tokens"]))
    policy_params = bench.state.params["policy"]
    mask = bench.batch["prompt_mask"]
    keys = iter(range(10_000))

    def ours_rollout():
        jax.block_until_ready(bench.rollout().response_tokens)

    def ours_sampler():
        out = sample_jit(
            bench.policy, policy_params, bench.batch["prompt_tokens"], mask,
            jax.random.key(next(keys)), max_new_tokens=n, temperature=1.0, top_k=0, top_p=1.0,
        )  # fmt: skip
        jax.block_until_ready(out.tokens)

    ours_rollout()
    ours_sampler()
    gen = interleaved_medians(
        {"rollout": ours_rollout, "sampler": ours_sampler, "torch": torch_generate(bench, prompts)},
        reps,
    )
    tokens = b * n
    generation = {}
    for name, t in gen.items():
        generation[f"{name}_tokens_per_s"] = round(tokens / t["wall_s"], 1)
        generation[f"cpu_{name}_tokens_per_s"] = round(tokens / max(t["cpu_s"], 1e-9), 1)
    for name in ("rollout", "sampler"):
        for prefix in ("", "cpu_"):
            generation[f"{prefix}ratio_{name}_over_torch"] = round(
                generation[f"{prefix}{name}_tokens_per_s"]
                / generation[f"{prefix}torch_tokens_per_s"],
                3,
            )

    return {
        "params": bench.params_count,
        "model": {
            k: getattr(bench.model_config, k)
            for k in ("vocab_size", "max_len", "num_layers", "d_model", "num_heads", "d_ff")
        },
        "ppo": {
            "batch": b,
            "num_minibatches": bench.cfg.num_minibatches,
            "num_epochs": bench.cfg.num_epochs,
            "prompt_len": bench.prompt_len,
            "new_tokens": n,
            "reps": reps,
        },
        "iteration": {
            "first_iteration_s_incl_compile": round(first["total_s"], 2),
            "episodes_per_s": round(b / med["total_s"], 1),
            "rollout_s": round(med["rollout_s"], 4),
            "update_s": round(med["update_s"], 4),
            "rollout_fraction": round(med["rollout_s"] / med["total_s"], 3),
            "rollout_generated_tokens_per_s": round(tokens / med["rollout_s"], 1),
            "update_tokens_per_s": round(b * (bench.prompt_len + n) / med["update_s"], 1),
            "mean_response_length": round(response_length, 2),
        },
        "memory": {
            "peak_rss_mib_after_ppo": rss_ppo,
            "peak_rss_mib_at_end_incl_torch": peak_rss_mib(),
            "device_memory_stats": device_stats,  # None on CPU
        },
        "generation": {"batch": b, "prompt_len": bench.prompt_len, "new_tokens": n, **generation},
        "transfers": {
            "device_to_host_disallowed_iteration": "ok",
            "device_to_host_guard_enforced_on_this_backend": jax.default_backend() != "cpu",
            # The stage's own scalars: RM gain and bias, the iteration number for fold_in.
            "implicit_transfers_per_part": logged,
            "dispatch_s_unsynced_iteration": round(dispatch, 4),
            "run_s_unsynced_iteration": round(async_total, 4),
            "host_ops_in_lowered_programs": host_ops,
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="batch 16, fewer repetitions")
    parser.add_argument("--threads", type=int, default=0, help="pin to N cores (0 = all)")
    parser.add_argument("--sizes", default="small,large", help="model_config sizes")
    parser.add_argument("--size", default="", help=argparse.SUPPRESS)  # worker mode
    args = parser.parse_args()
    cores = sorted(os.sched_getaffinity(0))
    threads = args.threads or len(cores)
    if args.size:
        # Pin before the first jax computation creates XLA's thread pool; torch gets the
        # same cores and thread count.
        os.sched_setaffinity(0, set(cores[:threads]))
        import torch

        torch.set_num_threads(threads)
        print(json.dumps(measure(args.size, args.quick)))
        return

    import jax
    import torch
    import transformers

    load_before = os.getloadavg()[0]
    sizes = {}
    for size in args.sizes.split(","):
        cmd = [sys.executable, "-m", "experiments.benchmarks.ppo_speed", f"--size={size}",
               f"--threads={threads}"] + (["--quick"] if args.quick else [])  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"ppo_speed: size {size} failed:\n{proc.stderr[-4000:]}")
        sizes[size] = json.loads(proc.stdout.strip().splitlines()[-1])
    result = {
        "benchmark": "ppo_speed",
        "quick": args.quick,
        "device": jax.devices()[0].device_kind,
        "threads": threads,
        "load_avg_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "sizes": sizes,
        "versions": {
            "jax": jax.__version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
