"""Stage `dpo`: Direct Preference Optimisation (Rafailov et al. 2023), or IPO (Azar et al.
2023) with `loss="ipo"`, from the SFT model on the reward model's comparison files.

Each batch element is one prompt with its K responses (padded to K_max), exactly as the `rm`
stage reads them (stages/reward.py): a K-wise ranking gives all its untied pairs, and the
loss is the mean over a prompt's pairs, then over prompts (rl/objectives.py dpo_loss_sum /
ipo_loss_sum), so a prompt with many responses counts once, as in the RM. Sequence
log-probs sum the response tokens' log-probs (EOS included; the prompt excluded) under the
policy and under the frozen reference, the export of `init_from` (the same SFT model).

One jitted train step (train_lib's, gradient accumulation included) holds both forward
passes: the reference params ride in the train state's `extras`, sharded like the policy's,
so the step is one program on any mesh. They are checkpointed with the state (the checkpoint
holds two models; the price of a bit-identical resume without re-reading the export).
`ptx_coef` > 0 adds ptx_coef x the LM loss of `ptx_rows` pretraining rows per batch, as
PPO-ptx does. Logged: the loss, the implicit-reward accuracy (pairs whose implicit reward
beta x log pi/pi_ref ranks them as labelled; 1/2 at the start, where policy = reference)
and mean margin on the training batch, and the same on the validation split.
Writes `DIR/<name>/export/` (the last policy) like every stage.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from instructrl import checkpoint as ckpt_lib
from instructrl import losses, sharding, train_lib
from instructrl import tokenizer as tokenizer_lib
from instructrl.data import pretrain_pipeline, rm_pipeline
from instructrl.errors import ConfigError
from instructrl.rl import objectives
from instructrl.stages import driver, inputs

LOSSES = {"dpo": objectives.dpo_loss_sum, "ipo": objectives.ipo_loss_sum}


def default_config() -> ml_collections.ConfigDict:
    """Rafailov et al.'s settings: beta 0.1, batch 64, 1 epoch; LR for the tiny world."""
    c = ml_collections.ConfigDict()
    c.kind = "dpo"
    c.init_from = "sft"  # policy init AND frozen reference
    c.tokenizer_from = "tokenizer"
    c.loss = "dpo"  # "dpo" | "ipo"
    c.beta = 0.1  # DPO's beta; IPO's tau (target gap 1 / (2 beta))
    c.batch_size = 64  # prompts (each with its K responses)
    c.accum_steps = 1
    c.num_epochs = 1
    c.num_steps = 0  # > 0 overrides num_epochs
    c.dropout = 0.0
    c.ptx_coef = 0.0  # > 0: + ptx_coef x LM loss on pretraining text (as PPO-ptx)
    c.ptx_rows = 0  # pretraining rows per batch with ptx; 0 = batch_size
    c.eval_batches = 0  # validation batches at the end (0 = the whole split)
    c.log_every = 10
    c.checkpoint_every = 500
    c.max_to_keep = 2
    c.optimizer = train_lib.default_optimizer_config()
    c.optimizer.lr = 1e-6
    return c


def sequence_logprobs(model, params, batch, *, deterministic=True, rng=None) -> jax.Array:
    """f32 [B, K]: sum over each response's tokens of log p(token | prefix), from one forward
    pass over [BOS] prompt response [EOS] (tokens/positions/mask [B, K, T], prompt_len [B])."""
    b, k, t = batch["tokens"].shape
    tokens, positions, mask = (batch[x].reshape(b * k, t) for x in ("tokens", "positions", "mask"))
    rngs = None if deterministic else {"dropout": rng}
    logits = model.apply(
        {"params": params}, tokens, positions, mask, deterministic=deterministic, rngs=rngs
    )
    start = jnp.repeat(batch["prompt_len"], k)[:, None]
    # target j + 1 is a response token: at or after the prompt's end, and real
    is_response = (jnp.arange(1, t)[None, :] >= start) & (mask[:, 1:] != 0)
    logp = losses.token_logprobs(logits[:, :-1], tokens[:, 1:])
    return jnp.sum(jnp.where(is_response, logp, 0.0), axis=1).reshape(b, k)


def preference_terms(model, c, params, reference, batch, *, deterministic=True, rng=None):
    """(loss_sum, prompts, correct, margin_sum, pairs) of a batch (see objectives)."""
    logp = sequence_logprobs(model, params, batch, deterministic=deterministic, rng=rng)
    ref = jax.lax.stop_gradient(sequence_logprobs(model, reference, batch))
    total, count = LOSSES[c.loss](logp, ref, batch["pair_mask"], c.beta)
    correct, margin, pairs = objectives.implicit_reward_stats(logp, ref, batch["pair_mask"], c.beta)
    return total, count, correct, margin, pairs


class ZipIterator(driver.TwoStreams):
    """Comparison batches with `ptx_<key>` pretraining rows."""

    def combine(self, a: dict, b: dict) -> dict[str, np.ndarray]:
        return {**a, **{f"ptx_{k}": v for k, v in b.items()}}


def init_state(reference, optimizer, seed: int, state_shardings) -> train_lib.TrainState:
    """Step 0: the policy a copy of `reference` (the state is donated, the reference kept in
    its extras), built directly into `state_shardings`."""

    def create(p):
        policy = jax.tree.map(lambda x: jnp.array(x, copy=True), p)
        key = jax.random.key(seed + 1)
        return train_lib.create_train_state(policy, optimizer, key, {"reference": p})

    return jax.jit(create, out_shardings=state_shardings)(reference)


def make_steps(model, c, optimizer, schedule, *, mesh, rules, ptx: bool, state_shardings,
               param_shardings):  # fmt: skip
    """(train_step(state, batch, rng) -> (state, metrics), eval_step(params, reference,
    batch) -> f32[5] sums of preference_terms), jitted for `mesh`. A batch holds the RM
    pipeline's keys, plus `ptx_<key>` pretraining rows when `ptx`."""

    def loss_fn(reference, params, batch, rng):
        pref = {k: v for k, v in batch.items() if not k.startswith("ptx_")}
        total, count, correct, margin, pairs = preference_terms(
            model, c, params, reference, pref, deterministic=False, rng=rng
        )
        loss = total / jnp.maximum(count, 1.0)
        metrics = {"accuracy": correct / jnp.maximum(pairs, 1.0),
                   "margin": margin / jnp.maximum(pairs, 1.0), "weight": count}  # fmt: skip
        if ptx:
            rows = {k[4:]: v for k, v in batch.items() if k.startswith("ptx_")}
            logits = model.apply({"params": params}, rows["tokens"], rows["positions"],
                                 rows["mask"])  # fmt: skip
            metrics["ptx_loss"] = losses.lm_loss(logits, rows["targets"], rows["loss_mask"])
            loss = loss + c.ptx_coef * metrics["ptx_loss"]
        metrics["preference_loss"] = total / jnp.maximum(count, 1.0)
        return loss, metrics

    def step(state, batch, rng):
        fn = functools.partial(loss_fn, state.extras["reference"])
        inner = train_lib.make_train_step(
            fn, optimizer, accum_steps=c.accum_steps, lr_schedule=schedule
        )
        return inner(state, batch, rng)

    batch_sh = sharding.batch_sharding(mesh)
    with sharding.mesh_context(mesh, rules):
        train_step = train_lib.jit_train_step(step, state_shardings, batch_sh)
        eval_step = jax.jit(
            lambda p, r, b: jnp.stack(preference_terms(model, c, p, r, b)),
            in_shardings=(param_shardings, param_shardings, batch_sh),
        )
    return train_step, eval_step


def run(config: ml_collections.ConfigDict, name: str, workdir: str) -> None:
    c = config[name]
    if c.loss not in LOSSES:
        raise ConfigError(f"config key '{name}.loss' = {c.loss!r}: must be one of {tuple(LOSSES)}")
    if not c.init_from:
        raise ConfigError(f"config key '{name}.init_from' must name the SFT stage (the reference)")
    stage_dir = inputs.stage_dir(workdir, name)
    setup = driver.setup_model(config, name, workdir)
    model, mesh, rules = setup.model, setup.mesh, setup.rules

    # ---- data: the RM's comparison batches (+ pretraining rows for ptx)
    tokenizer = tokenizer_lib.load(inputs.tokenizer_path(config, name, workdir))
    data_cfg = driver.data_config(config, workdir, name)
    shard_index, shard_count = sharding.data_shard_info(mesh)
    built = inputs.build_data("comparisons", data_cfg, tokenizer)
    if data_cfg.max_responses == 0:
        data_cfg.max_responses = built.stats.max_responses
    ptx_rows = (c.ptx_rows or c.batch_size) if c.ptx_coef > 0 else 0
    shard = dict(process_index=shard_index, process_count=shard_count)

    def batches(split: str, num_epochs: int, *, train: bool = True):
        it = rm_pipeline(
            built, tokenizer, data_cfg, batch_size=c.batch_size, split=split,
            num_epochs=num_epochs, seed=config.seed, shuffle=train, drop_remainder=train, **shard,
        )  # fmt: skip
        if not (train and ptx_rows):
            return it
        ptx = pretrain_pipeline(
            inputs.build_data("pretrain", data_cfg, tokenizer), tokenizer, data_cfg,
            batch_size=ptx_rows, num_epochs=0, seed=config.seed + 1, **shard,
        )  # fmt: skip
        return ZipIterator(it, ptx)

    if c.num_steps > 0:
        total_steps, data_iter = c.num_steps, batches("train", 0)
    else:
        per_epoch = sum(1 for _ in batches("train", 1))
        if per_epoch == 0:
            raise ConfigError(
                f"config key '{name}.batch_size' ({c.batch_size}) is larger than the "
                "comparisons training split"
            )
        total_steps, data_iter = per_epoch * c.num_epochs, batches("train", c.num_epochs)
    logging.info("%s: %s, beta %g, %d steps of %d prompts (K_max=%d)", name, c.loss, c.beta,
                 total_steps, c.batch_size, data_cfg.max_responses)  # fmt: skip

    # ---- state: policy and frozen reference from init_from (or resumed, both)
    optimizer = train_lib.make_optimizer(c.optimizer, total_steps)
    checkpointer = ckpt_lib.Checkpointer(
        stage_dir, save_interval_steps=c.checkpoint_every, max_to_keep=c.max_to_keep
    )
    abstract, state_shardings = train_lib.abstract_train_state(
        optimizer, setup.abstract_params, setup.param_shardings, mesh,
        extras={"reference": setup.abstract_params},
        extras_shardings={"reference": setup.param_shardings},
    )  # fmt: skip
    restored = checkpointer.restore_latest(abstract)
    if restored is not None:
        data_iter.set_state(restored.data_state)
        logging.info("%s: resumed from step %d", name, restored.step)
        state = restored.state
    else:
        state = init_state(setup.init_params(config.seed), optimizer, config.seed, state_shardings)

    # ---- the one train step
    schedule = train_lib.make_schedule(c.optimizer, total_steps)
    train_step, eval_step = make_steps(
        model, c, optimizer, schedule, mesh=mesh, rules=rules, ptx=ptx_rows > 0,
        state_shardings=state_shardings, param_shardings=setup.param_shardings,
    )  # fmt: skip

    def loop_step(state, batch, step_index):
        del step_index
        with sharding.mesh_context(mesh, rules):
            state, metrics = train_step(state, batch, state.rng)
        return state, metrics, None

    def evaluate(state, step_index: int) -> dict[str, float]:
        del step_index
        if "validation" not in built.sources:
            return {}
        sums = np.zeros(5)
        with sharding.mesh_context(mesh, rules):
            for b in driver.take(batches("validation", 1, train=False), c.eval_batches):
                b = sharding.shard_batch(b, mesh)
                sums += np.asarray(jax.device_get(
                    eval_step(state.params, state.extras["reference"], b)))  # fmt: skip
        total, count, correct, margin, pairs = sums
        return {"val_loss": total / max(count, 1.0), "val_accuracy": correct / max(pairs, 1.0),
                "val_margin": margin / max(pairs, 1.0)}  # fmt: skip

    run_state = driver.Run(state, data_iter, {}, restored.step if restored else None)
    state = driver.train_loop(
        run_state, loop_step, name=name, stage_dir=stage_dir, mesh=mesh,
        checkpointer=checkpointer, total_steps=total_steps, log_every=c.log_every,
        eval_every=total_steps, evaluate=evaluate,
        tokens_per_step=c.batch_size * data_cfg.max_responses * data_cfg.seq_len,
    )  # fmt: skip
    ckpt_lib.export_params(
        state.params, setup.model_dict, os.path.join(stage_dir, inputs.EXPORT_DIR)
    )
