"""Speed of our transformer against PyTorch `transformers` GPT-2 on the same CPU.

  python -m experiments.benchmarks.model_speed [--quick]

Measures, for a GPT-2-style model of ~7M parameters (vocab 8192, d_model 256, 6 layers,
8 heads, context 256), in one process and with the same thread count on both sides:
  train:  tokens/s of one jitted forward+backward+AdamW step (optax) vs GPT2LMHeadModel with
          torch.optim.AdamW (f32, dropout off);
  sample: generated tokens/s of our jitted KV-cache sampler vs `generate(do_sample=True,
          temperature=1, top_k=0, use_cache=True)` forced to the full length (min_new_tokens).
Both sides are warmed up; each figure is the median of several repetitions, alternating
ours and torch rep by rep. `--threads N` pins the process to N cores (default: all it may
use). On a shared machine, check `load_avg_1min` in the JSON: torch's OpenMP threads degrade
badly when cores are oversubscribed, so compare figures from quiet runs. Prints one JSON object
(tokens/s by wall clock and by process CPU time -- `cpu_` keys, the steadier figure on a
busy machine -- and the ratios ours/torch).
"""

from __future__ import annotations

import argparse
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments.benchmarks.timing import interleaved_medians
from instructrl.models import ModelConfig, Transformer, positions_from_mask, sample_jit

CONFIG = ModelConfig(
    vocab_size=8192, max_len=256, num_layers=6, d_model=256, num_heads=8, d_ff=1024
)


def jax_train(tokens: np.ndarray):
    model = Transformer(CONFIG)
    tokens = jnp.asarray(tokens)
    mask = jnp.ones_like(tokens)
    positions = positions_from_mask(mask)
    params = nn.unbox(jax.jit(model.init)(jax.random.key(0), tokens, positions, mask)["params"])
    tx = optax.adamw(1e-4, b1=0.9, b2=0.95, weight_decay=0.01)
    state = (params, tx.init(params))

    def step(state, tokens):
        params, opt_state = state

        def loss_fn(p):
            logits = model.apply({"params": p}, tokens[:, :-1], positions[:, :-1], mask[:, :-1])
            return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    step = jax.jit(step, donate_argnums=0)
    box = [state]

    def run():
        box[0], loss = step(box[0], tokens)
        loss.block_until_ready()

    run()
    run()
    return run


def torch_model():
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=CONFIG.vocab_size,
        n_positions=CONFIG.max_len,
        n_embd=CONFIG.d_model,
        n_layer=CONFIG.num_layers,
        n_head=CONFIG.num_heads,
        n_inner=CONFIG.d_ff,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    return GPT2LMHeadModel(cfg)


def torch_train(tokens: np.ndarray):
    import torch

    model = torch_model().train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.01)
    ids = torch.tensor(tokens, dtype=torch.long)

    def run():
        loss = model(input_ids=ids[:, :-1], labels=ids[:, :-1]).loss  # shifts labels inside
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    run()
    run()
    return run


def jax_sample(prompts: np.ndarray, new_tokens: int):
    model = Transformer(CONFIG)
    mask = jnp.ones(prompts.shape, jnp.int32)
    params = nn.unbox(jax.jit(model.init)(jax.random.key(0), mask, mask, mask)["params"])
    prompts = jnp.asarray(prompts)
    seed = iter(range(1000))

    def run():
        out = sample_jit(
            model, params, prompts, mask, jax.random.key(next(seed)), max_new_tokens=new_tokens
        )
        out.tokens.block_until_ready()

    run()
    return run


def torch_sample(prompts: np.ndarray, new_tokens: int):
    import torch

    model = torch_model().eval()
    ids = torch.tensor(prompts, dtype=torch.long)

    def run():
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                do_sample=True,
                temperature=1.0,
                top_k=0,
                top_p=1.0,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                use_cache=True,
            )
        assert out.shape[1] == ids.shape[1] + new_tokens

    run()
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions, smaller batches")
    parser.add_argument(
        "--threads", type=int, default=0, help="pin to this many cores (0 = all available)"
    )
    args = parser.parse_args()
    cores = sorted(os.sched_getaffinity(0))
    threads = args.threads or len(cores)
    # Pinning (before the first jax computation creates XLA's thread pool) gives both
    # libraries the same cores; torch additionally gets the same thread count.
    os.sched_setaffinity(0, set(cores[:threads]))
    import torch

    torch.set_num_threads(threads)
    reps = 3 if args.quick else 7
    train_batch, sample_batch, prompt_len, new_tokens = (
        (4, 4, 16, 32) if args.quick else (8, 8, 32, 128)
    )
    rng = np.random.default_rng(0)
    train_tokens = rng.integers(1, CONFIG.vocab_size, (train_batch, CONFIG.max_len + 1)).astype(
        np.int32
    )
    prompts = rng.integers(1, CONFIG.vocab_size, (sample_batch, prompt_len)).astype(np.int32)
    toks = jax.ShapeDtypeStruct((1, 8), jnp.int32)
    abstract = jax.eval_shape(Transformer(CONFIG).init, jax.random.key(0), toks, toks, toks)
    n_params = sum(x.size for x in jax.tree.leaves(nn.unbox(abstract)))

    load_before = os.getloadavg()[0]
    train_s = interleaved_medians(
        {"jax": jax_train(train_tokens), "torch": torch_train(train_tokens)}, reps
    )
    sample_s = interleaved_medians(
        {"jax": jax_sample(prompts, new_tokens), "torch": torch_sample(prompts, new_tokens)}, reps
    )
    figures = {}
    for name, medians, tokens in (
        ("train", train_s, train_batch * CONFIG.max_len),
        ("sample", sample_s, sample_batch * new_tokens),
    ):
        out = {}
        for clock, key in (("", "wall_s"), ("cpu_", "cpu_s")):
            for side in ("jax", "torch"):
                out[f"{side}_{clock}tokens_per_s"] = round(tokens / medians[side][key], 1)
            ratio = out[f"jax_{clock}tokens_per_s"] / out[f"torch_{clock}tokens_per_s"]
            out[f"ratio_{clock}jax_over_torch"] = round(ratio, 3)
        figures[name] = out
    result = {
        "benchmark": "model_speed",
        "quick": args.quick,
        "device": jax.devices()[0].device_kind,
        "threads": threads,
        "load_avg_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "params": int(n_params),
        "model": {
            k: getattr(CONFIG, k)
            for k in ("vocab_size", "max_len", "num_layers", "d_model", "num_heads", "d_ff")
        },
        "train": {
            "batch": train_batch,
            "seq_len": CONFIG.max_len,
            "reps": reps,
            **figures["train"],
        },
        "sample": {
            "batch": sample_batch,
            "prompt_len": prompt_len,
            "new_tokens": new_tokens,
            "reps": reps,
            **figures["sample"],
        },
        "versions": {"jax": jax.__version__, "torch": torch.__version__},
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
