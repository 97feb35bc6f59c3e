"""Language-model training shared by the `pretrain` and `sft` stages.

    pretrain  next-token loss on every real token of pretraining text; random init (or
              `init_from` a stage, to continue pretraining)
    sft       next-token loss on completion tokens only (prompt masked), `init_from` a
              base model, residual dropout, epochs, optional pretraining mix
              (`ptx_fraction` of each batch: the PPO-init model uses 0.1), validation loss
              each epoch, and the exported model chosen by `select_by`

Both write `DIR/<name>/export/` (params + model_config.json) for later stages. The export
holds the selected params: the last ones, those with the lowest validation loss, or those
whose greedy samples on validation prompts get the highest mean score from the reward
model named by `select_reward_from` (the paper's choice for SFT).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from instructrl import checkpoint as ckpt_lib
from instructrl import losses, sharding, train_lib
from instructrl import tokenizer as tokenizer_lib
from instructrl.data import pretrain_pipeline, sft_pipeline
from instructrl.errors import ConfigError
from instructrl.stages import driver, inputs

SELECT_BY = ("last", "val_loss", "rm_score")


def default_config(kind: str) -> ml_collections.ConfigDict:
    """Paper settings (docs/method.md §1) for `sft`; a generic LM run for `pretrain`."""
    c = ml_collections.ConfigDict()
    c.kind = kind
    c.init_from = ""  # stage whose export initialises the model ("" = random init)
    c.tokenizer_from = "tokenizer"
    c.batch_size = 32  # global, sequences per step
    c.accum_steps = 1
    c.num_epochs = 16 if kind == "sft" else 1
    c.num_steps = 0  # > 0 overrides num_epochs
    c.dropout = 0.2 if kind == "sft" else -1.0  # residual dropout; < 0 keeps the model's
    # SFT only (the PPO-init model): the pretraining share of the LOSS, as a weight on the two
    # sources' token means (1 - f) * sft + f * ptx; not a share of tokens (see ptx_loss_weights).
    c.ptx_fraction = 0.0
    c.ptx_rows = 0  # pretraining rows per batch; 0 = round(ptx_fraction * batch_size), >= 1
    c.select_by = "rm_score" if kind == "sft" else "last"
    c.select_reward_from = ""  # RM stage for select_by="rm_score"
    c.select_num_prompts = 64
    c.eval_every_epochs = 1
    c.eval_batches = 0  # 0 = the whole validation split
    c.log_every = 10
    c.checkpoint_every = 500
    c.max_to_keep = 2
    c.optimizer = train_lib.default_optimizer_config()
    c.optimizer.lr = 9.65e-6
    return c


@dataclasses.dataclass
class Selection:
    """The best validation result so far (kept in checkpoint meta so resumes keep it)."""

    metric: str
    best: float | None = None
    best_step: int | None = None
    history: list[dict] = dataclasses.field(default_factory=list)

    def better(self, value: float) -> bool:
        if self.best is None:
            return True
        return value < self.best if self.metric == "val_loss" else value > self.best


def schedule(
    train_iter: Callable[[int], Iterator], num_epochs: int, num_steps: int
) -> tuple[int, int, Iterator]:
    """(steps per epoch, total steps, the training batches) of an LM stage: `num_steps` steps
    of a stream that repeats forever when num_steps > 0, else num_epochs times one epoch's
    batches (counted on `train_iter(1)`).

    The stream then runs one epoch past the steps it needs: packing runs on across epoch
    boundaries and each epoch drops or keeps a partial batch, so E epochs pack into a few more
    or a few fewer batches than E times one epoch's (e.g. 34 for 5 x 7 in the unit test). The
    extra epoch's batches only fill such a shortfall, which otherwise ends the run a few steps
    early with an exhausted iterator.
    """
    if num_steps > 0:
        return num_steps, num_steps, train_iter(0)
    steps_per_epoch = sum(1 for _ in train_iter(1))
    return steps_per_epoch, steps_per_epoch * num_epochs, train_iter(num_epochs + 1)


def run_lm_stage(config: ml_collections.ConfigDict, name: str, workdir: str) -> None:
    c = config[name]
    kind = c.kind
    if c.select_by not in SELECT_BY:
        raise ConfigError(f"config key '{name}.select_by' must be one of {', '.join(SELECT_BY)}")
    stage_dir = inputs.stage_dir(workdir, name)

    # ---- model and mesh
    setup = driver.setup_model(config, name, workdir)
    model, mesh, rules = setup.model, setup.mesh, setup.rules

    # ---- data
    tokenizer = tokenizer_lib.load(inputs.tokenizer_path(config, name, workdir))
    data_cfg = driver.data_config(config, workdir, name)
    shard_index, shard_count = sharding.data_shard_info(mesh)
    data_kind = "demonstrations" if kind == "sft" else "pretrain"
    built = inputs.build_data(data_kind, data_cfg, tokenizer)
    ptx_rows = 0
    if kind == "sft" and c.ptx_fraction > 0:
        ptx_rows = c.ptx_rows or max(1, round(c.ptx_fraction * c.batch_size))
    main_rows = c.batch_size - ptx_rows
    pipeline = sft_pipeline if kind == "sft" else pretrain_pipeline

    def train_iter(num_epochs: int):
        it = pipeline(
            built,
            tokenizer,
            data_cfg,
            batch_size=main_rows,
            num_epochs=num_epochs,
            seed=config.seed,
            process_index=shard_index,
            process_count=shard_count,
        )
        if not ptx_rows:
            return it
        ptx = pretrain_pipeline(
            inputs.build_data("pretrain", data_cfg, tokenizer),
            tokenizer,
            data_cfg,
            batch_size=ptx_rows,
            num_epochs=0,
            seed=config.seed + 1,
            process_index=shard_index,
            process_count=shard_count,
        )
        return MixedIterator(it, ptx, c.ptx_fraction)

    steps_per_epoch, total_steps, data_iter = schedule(train_iter, c.num_epochs, c.num_steps)
    if steps_per_epoch == 0:
        raise ConfigError(
            f"config key '{name}.batch_size' ({c.batch_size}) is larger than one epoch of "
            f"{data_kind} data"
        )
    logging.info("%s: %d steps (%d per epoch), batch %d", name, total_steps, steps_per_epoch,
                 c.batch_size)  # fmt: skip

    # ---- train state (fresh or resumed)
    optimizer = train_lib.make_optimizer(c.optimizer, total_steps)
    checkpointer = ckpt_lib.Checkpointer(
        stage_dir, save_interval_steps=c.checkpoint_every, max_to_keep=c.max_to_keep
    )
    run, state_shardings = driver.start_run(
        setup,
        stage_dir,
        checkpointer,
        optimizer,
        data_iter,
        seed=config.seed,
        meta={"selection": dataclasses.asdict(Selection(metric=c.select_by))},
    )

    # ---- step
    def loss_fn(params, batch, rng):
        logits = model.apply(
            {"params": params},
            batch["tokens"],
            batch["positions"],
            batch["mask"],
            deterministic=False,
            rngs={"dropout": rng},
        )
        if "loss_weights" in batch:  # a pretraining mix: per-source means, weighted
            total, weight = losses.weighted_lm_loss_sum(
                logits, batch["targets"], batch["loss_weights"]
            )
            return total / jnp.maximum(weight, 1e-12), {"weight": weight}
        total, count = losses.lm_loss_sum(logits, batch["targets"], batch["loss_mask"])
        return total / jnp.maximum(count, 1.0), {"weight": count}

    def eval_fn(params, batch):
        logits = model.apply({"params": params}, batch["tokens"], batch["positions"], batch["mask"])
        total, count = losses.lm_loss_sum(logits, batch["targets"], batch["loss_mask"])
        return {"val_loss": total / jnp.maximum(count, 1.0), "weight": count}

    train_step, eval_step = driver.compile_steps(
        setup, c, optimizer, total_steps, state_shardings, loss_fn, eval_fn
    )

    # ---- evaluation and selection
    best_dir = os.path.join(stage_dir, "best")

    def evaluate(state, step: int) -> dict[str, float]:
        metrics = {}
        if "validation" in built.sources:
            it = pipeline(
                built,
                tokenizer,
                data_cfg,
                batch_size=main_rows,
                split="validation",
                num_epochs=1,
                shuffle=False,
                drop_remainder=False,
                process_index=shard_index,
                process_count=shard_count,
            )
            batches = (sharding.shard_batch(b, mesh) for b in driver.take(it, c.eval_batches))
            with sharding.mesh_context(mesh, rules):
                metrics = train_lib.evaluate(eval_step, state.params, batches)
        if c.select_by == "val_loss":
            value = metrics.get("val_loss")
        elif c.select_by == "rm_score":
            from instructrl.stages import reward

            value = reward.mean_greedy_score(config, name, workdir, setup, state.params)
        else:
            return metrics
        if value is None:
            raise ConfigError(f"config key '{name}.select_by': no validation split to select on")
        selection = Selection(**run.meta["selection"])
        metrics[f"select_{c.select_by}"] = value
        selection.history.append({"step": step, "value": value})
        if selection.better(value):
            selection.best, selection.best_step = value, step
            ckpt_lib.export_params(state.params, setup.model_dict, best_dir)
        run.meta["selection"] = dataclasses.asdict(selection)
        return metrics

    # ---- loop
    state = driver.train_loop(
        run,
        train_step,
        name=name,
        stage_dir=stage_dir,
        mesh=setup.mesh,
        checkpointer=checkpointer,
        total_steps=total_steps,
        log_every=c.log_every,
        eval_every=steps_per_epoch * max(c.eval_every_epochs, 1),
        evaluate=evaluate,
        tokens_per_step=c.batch_size * data_cfg.seq_len,
    )

    # ---- export
    selection = Selection(**run.meta["selection"])
    export_dir = os.path.join(stage_dir, inputs.EXPORT_DIR)
    if c.select_by == "last" or selection.best_step is None:
        ckpt_lib.export_params(state.params, setup.model_dict, export_dir)
        chosen = total_steps
    else:
        params, _ = ckpt_lib.load_exported(best_dir, setup.param_shardings)
        ckpt_lib.export_params(params, setup.model_dict, export_dir)
        chosen = selection.best_step
    if jax.process_index() == 0:
        with open(os.path.join(stage_dir, "selection.json"), "w") as f:
            json.dump({**dataclasses.asdict(selection), "exported_step": chosen}, f, indent=2)
    logging.info("%s: exported step %d (%s) to %s", name, chosen, c.select_by, export_dir)


def ptx_loss_weights(main_mask: np.ndarray, ptx_mask: np.ndarray, fraction: float) -> np.ndarray:
    """float32 [Bm + Bp, T] per-token loss weights of a batch whose main rows (loss_mask
    main_mask [Bm, T]) are stacked over pretraining rows (ptx_mask [Bp, T]): (1 - fraction)
    spread evenly over the main tokens and `fraction` over the pretraining tokens, so the
    weighted sum is (1 - f) * mean_main + f * mean_ptx whatever each source's token count.

    Why: SFT rows count only completion tokens (~10 per demonstration here) and pretraining
    rows count every token, so a plain token mean over the stacked batch gave the "10%" mix
    a third or more of the loss."""
    main = (main_mask > 0).astype(np.float64)
    ptx = (ptx_mask > 0).astype(np.float64)
    main *= (1.0 - fraction) / max(main.sum(), 1.0)
    ptx *= fraction / max(ptx.sum(), 1.0)
    return np.concatenate([main, ptx], axis=0).astype(np.float32)


class MixedIterator(driver.TwoStreams):
    """Stacks each batch of a main stream over a batch of a pretraining stream and adds their
    per-token `loss_weights` (ptx_loss_weights)."""

    def __init__(self, main, ptx, fraction: float):
        super().__init__(main, ptx)
        self.fraction = fraction

    def combine(self, a: dict, b: dict) -> dict[str, np.ndarray]:
        batch = {k: np.concatenate([a[k], b[k]], axis=0) for k in a}
        batch["loss_weights"] = ptx_loss_weights(a["loss_mask"], b["loss_mask"], self.fraction)
        return batch
