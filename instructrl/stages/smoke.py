"""Stage `smoke`: builds the configured model on the configured mesh, runs a forward pass
and KV-cache sampling on random prompts, and writes what it saw to `DIR/<name>/smoke.json`.

A quick check that a config (model shape, mesh, rules, dtypes) works before a long run.
"""

from __future__ import annotations

import json
import logging
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from instructrl import sharding
from instructrl.models import ModelConfig, Transformer, positions_from_mask
from instructrl.models.sampling import sample_jit
from instructrl.train_lib import count_params


def default_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(kind="smoke", batch_size=2, prompt_len=8, max_new_tokens=8)
    )


def run(config: ml_collections.ConfigDict, name: str, workdir: str) -> None:
    c = config[name]
    out_dir = os.path.join(workdir, name)
    model_config = ModelConfig.from_dict(config.model)
    model = Transformer(model_config)
    mesh = sharding.make_mesh(config.mesh)
    rules = sharding.rules_from_config(config.get("rules"))

    rng = np.random.default_rng(config.seed)
    batch = c.batch_size * mesh.shape["data"] * mesh.shape["fsdp"]
    tokens = rng.integers(0, model_config.vocab_size, (batch, c.prompt_len), dtype=np.int32)
    mask = np.ones_like(tokens)
    mask[0, : c.prompt_len // 2] = 0  # one left-padded row
    dummy = (tokens[:1], positions_from_mask(mask[:1]), mask[:1])
    params = sharding.init_params_sharded(model, jax.random.key(config.seed), dummy, mesh, rules)
    start = time.time()
    with sharding.mesh_context(mesh, rules):
        logits = jax.jit(model.apply)({"params": params}, tokens, positions_from_mask(mask), mask)
        out = sample_jit(
            model,
            params,
            jnp.asarray(tokens),
            jnp.asarray(mask),
            jax.random.key(config.seed),
            max_new_tokens=c.max_new_tokens,
        )
    logits, out = jax.device_get((logits, out))
    if not np.isfinite(logits).all():
        raise FloatingPointError(f"stage {name}: non-finite logits from a fresh model")
    report = {
        "params": count_params(params),
        "logits_shape": list(logits.shape),
        "sample_shape": list(out.tokens.shape),
        "devices": jax.device_count(),
        "mesh": dict(mesh.shape),
        "seconds": round(time.time() - start, 2),
    }
    logging.info("smoke: %s", report)
    if jax.process_index() == 0:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "smoke.json"), "w") as f:
            json.dump(report, f, indent=2)
