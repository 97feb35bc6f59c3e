"""Helpers every training stage driver shares: model + mesh setup, train state (fresh or
resumed), and the one training loop (log, check finite, evaluate, checkpoint, stop on
SIGTERM) that LM, RM and PPO stages all run with their own step function.

A driver (lm.py, reward.py, ppo.py) builds its data iterator, step and eval functions and
calls these in order; see `lm.run_lm_stage` for the shape of a driver.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from instructrl import checkpoint as ckpt_lib
from instructrl import sharding, train_lib
from instructrl.errors import ConfigError, Preempted
from instructrl.models import ModelConfig, Transformer, init_scalar_from_lm
from instructrl.stages import common, inputs

EXECUTION_KEYS = ("dtype", "remat")


@dataclasses.dataclass
class ModelSetup:
    """A model on a mesh: what a stage needs to init, restore, shard and export params."""

    model: Transformer
    model_dict: dict[str, Any]  # the ModelConfig as JSON (saved next to exports)
    init_dir: str | None  # export dir of the input stage, None for a random init
    mesh: jax.sharding.Mesh
    rules: sharding.Rules
    abstract_params: Any
    param_shardings: Any
    dummy: list[np.ndarray]  # [1, T] tokens/positions/mask for model.init

    def init_params(self, seed: int, from_lm: bool = False) -> Any:
        """Params from the input stage's export (the trunk only, when `from_lm` and this is a
        scalar-head model), else a random init; always born sharded."""
        if self.init_dir is not None and not from_lm:  # no random init to compile and run
            params, _ = ckpt_lib.load_exported(self.init_dir, self.param_shardings)
            return params
        fresh = sharding.init_params_sharded(
            self.model, jax.random.key(seed), self.dummy, self.mesh, self.rules
        )
        if self.init_dir is None:
            return fresh
        lm_params, _ = ckpt_lib.load_exported(self.init_dir, self.lm_param_shardings())
        return init_scalar_from_lm(lm_params, fresh)

    def lm_model(self) -> Transformer:
        """The LM-head model of the same config (e.g. a policy beside its RM)."""
        return Transformer(self.model.config, head="lm")

    def lm_param_shardings(self) -> Any:
        _, shardings = sharding.abstract_params_and_shardings(
            self.lm_model(), self.dummy, self.mesh, self.rules
        )
        return shardings


def setup_model(
    config: ml_collections.ConfigDict,
    name: str,
    workdir: str,
    *,
    head: str = "lm",
    init_key: str = "init_from",
    seq_len: int | None = None,
) -> ModelSetup:
    """The model of stage `name`: the config of the stage named by `config.<name>.<init_key>`
    (its export's model_config.json, with dtype and remat from `config.model`), else
    `config.model` updated by `config.<name>.model` when the stage has one (a stage that
    trains another size from scratch); `<name>.dropout` >= 0 overrides."""
    c = config[name]
    mesh = sharding.make_mesh(config.mesh)
    rules = sharding.rules_from_config(config.get("rules"))
    init_dir = inputs.export_dir(config, name, init_key, workdir) if c.get(init_key) else None
    if init_dir:
        model_dict = ckpt_lib.read_model_config(init_dir)
        # Compute dtype and rematerialisation are how this run executes, not part of the
        # weights: the experiment's config.model decides them (e.g. bf16 + remat on a TPU
        # for a checkpoint converted in f32).
        for key in EXECUTION_KEYS:
            if key in config.model:
                model_dict[key] = config.model[key]
    elif c.get("model") is not None:  # a stage-level shape, e.g. the larger size of a sweep
        model_dict = {**config.model.to_dict(), **c.model.to_dict()}
    else:
        model_dict = config.model.to_dict()
    if c.get("dropout", -1.0) >= 0:
        model_dict["dropout"] = c.dropout
    model_config = ModelConfig.from_dict(model_dict)
    seq_len = seq_len or config.data.seq_len
    if seq_len > model_config.max_len:
        raise ConfigError(
            f"config key 'data.seq_len' ({seq_len}) exceeds the model's max_len "
            f"({model_config.max_len})"
        )
    model = Transformer(model_config, head=head)
    dummy = [np.zeros((1, seq_len), np.int32)] * 2 + [np.ones((1, seq_len), np.int32)]
    abstract, shardings = sharding.abstract_params_and_shardings(model, dummy, mesh, rules)
    return ModelSetup(model, model_dict, init_dir, mesh, rules, abstract, shardings, dummy)


def data_config(
    config: ml_collections.ConfigDict, workdir: str, name: str | None = None
) -> ml_collections.ConfigDict:
    """config.data, updated by `config.<name>.data` when stage `name` has one (e.g. a second
    RM round trained on `comparisons="@collect/comparisons.jsonl,@collect_2/comparisons.jsonl"`),
    with `@stage/...` paths resolved and the tfds folder defaulted to DIR/tfds."""
    data = config.data
    own = config[name].get("data") if name else None
    if own is not None:
        data = ml_collections.ConfigDict(config.data.to_dict())
        for key, value in own.items():
            if key not in data:
                raise ConfigError(f"config key '{name}.data.{key}' is not a key of config.data")
            data[key] = value
    data = inputs.resolve_data_paths(data, workdir)
    data.tfds_dir = data.tfds_dir or os.path.join(workdir, "tfds")
    return data


@dataclasses.dataclass
class Run:
    """The mutable parts of a training run that the loop advances and checkpoints."""

    state: train_lib.TrainState
    data_iter: Any  # has __next__, get_state(), set_state()
    meta: dict[str, Any]  # JSON stage metadata, saved with every checkpoint
    resumed_step: int | None


def start_run(
    setup: ModelSetup,
    stage_dir: str,
    checkpointer: ckpt_lib.Checkpointer,
    optimizer,
    data_iter: Any,
    *,
    seed: int,
    from_lm: bool = False,
    meta: Mapping[str, Any] | None = None,
) -> tuple[Run, train_lib.TrainState]:
    """Resumes from the latest checkpoint (state, data position, meta) or starts fresh.
    Returns the run and the state's shardings."""
    abstract, shardings = train_lib.abstract_train_state(
        optimizer, setup.abstract_params, setup.param_shardings, setup.mesh
    )
    restored = checkpointer.restore_latest(abstract)
    if restored is not None:
        data_iter.set_state(restored.data_state)
        logging.info("%s: resumed from step %d", stage_dir, restored.step)
        return Run(restored.state, data_iter, dict(restored.meta), restored.step), shardings
    params = setup.init_params(seed, from_lm=from_lm)
    init = jax.jit(
        lambda p: train_lib.create_train_state(p, optimizer, jax.random.key(seed + 1)),
        out_shardings=shardings,
    )
    return Run(init(params), data_iter, dict(meta or {}), None), shardings


def compile_steps(
    setup: ModelSetup,
    c: ml_collections.ConfigDict,
    optimizer: Any,
    total_steps: int,
    state_shardings: Any,
    loss_fn: Callable,
    eval_fn: Callable,
) -> tuple[StepFn, Callable]:
    """(step_fn, eval_step) of a stage, compiled on its mesh: step_fn, the loop's step (see
    `train_loop`), runs a train step built from `loss_fn(params, batch, rng) -> (loss,
    metrics)` with the stage's optimizer, LR schedule (`c.optimizer`) and gradient
    accumulation (`c.accum_steps`); eval_step is `eval_fn(params, batch)` with params and
    batch sharded like training."""
    batch_sh = sharding.batch_sharding(setup.mesh)
    schedule = train_lib.make_schedule(c.optimizer, total_steps)
    with sharding.mesh_context(setup.mesh, setup.rules):
        step_fn = train_lib.make_train_step(
            loss_fn, optimizer, accum_steps=c.accum_steps, lr_schedule=schedule
        )
        train_step = train_lib.jit_train_step(step_fn, state_shardings, batch_sh)
        eval_step = jax.jit(eval_fn, in_shardings=(setup.param_shardings, batch_sh))

    def loop_step(state, batch, step):
        del step  # the train step folds state.step into its key itself
        with sharding.mesh_context(setup.mesh, setup.rules):
            state, metrics = train_step(state, batch, state.rng)
        return state, metrics, None

    return loop_step, eval_step


# A loop step: (state, sharded batch, step before it) -> (state, device metrics, aux). `aux`
# is whatever the step wants its `on_log` hook to see (e.g. PPO's rollout and timings).
StepFn = Callable[[Any, Mapping[str, Any], int], tuple[Any, Mapping[str, Any], Any]]


def train_loop(
    run: Run,
    step_fn: StepFn,
    *,
    name: str,
    stage_dir: str,
    mesh: jax.sharding.Mesh,
    checkpointer: ckpt_lib.Checkpointer,
    total_steps: int,
    log_every: int,
    eval_every: int = 0,
    evaluate: Callable[[Any, int], Mapping[str, float]] | None = None,
    on_log: Callable[[Any, int, Mapping[str, Any], Any], Mapping[str, float]] | None = None,
    tokens_per_step: int | None = None,
    unit: str = "step",
) -> Any:
    """The training loop of every stage (LM, RM, PPO): runs `step_fn` on the batches of
    `run.data_iter` until `total_steps`; returns the final state.

    Every `log_every` steps (and at the end) the metrics are fetched, checked for NaN/inf,
    extended by `on_log(state, step, batch, aux)` and written; every `eval_every` steps and
    at the end `evaluate(state, step)` adds its metrics (it may also update `run.meta`, which
    is checkpointed). Metrics are also fetched and checked before every checkpoint, so no
    non-finite state is ever saved. A SIGTERM saves a checkpoint and raises Preempted;
    re-running resumes from it. `unit` names a step in messages ("iteration" for PPO).
    """
    step = int(jax.device_get(run.state.step))
    # Every 5 s on a terminal; every 30 s into a log file, which keeps every line.
    interval = 5.0 if sys.stderr.isatty() else 30.0
    progress = common.Progress(
        total_steps, tokens_per_step=tokens_per_step, label=name, interval_s=interval
    )
    state = run.state
    with (
        # A fresh start (no checkpoint) drops every line an earlier attempt logged before it
        # was killed ahead of its first checkpoint: those steps are about to run again.
        common.MetricsWriter(stage_dir, resume_step=run.resumed_step or 0) as writer,
        common.TerminationSignal() as term,
        checkpointer,  # closing commits a pending async save, also when a step fails
    ):
        while step < total_steps:
            batch = sharding.shard_batch(next(run.data_iter), mesh)
            state, metrics, aux = step_fn(state, batch, step)
            step += 1
            progress.update(step)
            at_eval = evaluate is not None and (step % eval_every == 0 or step == total_steps)
            stop = term.should_stop(step)
            save = checkpointer.should_save(step) or step == total_steps or stop
            log = step % log_every == 0 or at_eval or step == total_steps
            if log or save:  # never log or checkpoint a non-finite state
                host = {k: float(v) for k, v in jax.device_get(metrics).items()}
                common.check_finite(host, step)
            if log:
                if on_log is not None:
                    host.update(on_log(state, step, batch, aux))
                if at_eval:
                    host.update(evaluate(state, step))
                writer.write(step, host)
            if save:
                checkpointer.save(
                    step, state, data_state=run.data_iter.get_state(), meta=run.meta, force=True
                )
            if stop:
                raise Preempted(
                    f"stage {name}: stopped by signal at {unit} {step}; checkpoint saved"
                )
    return state


def take(it: Iterator, n: int) -> Iterator:
    """The first n items of `it` (all of them when n == 0)."""
    for i, item in enumerate(it):
        if n and i >= n:
            return
        yield item


class TwoStreams:
    """Iterates two data iterators in step and merges each pair of batches with `combine`
    (a subclass defines it); one saveable state for both, as grain's iterators have."""

    def __init__(self, main, ptx):
        self.main, self.ptx = main, ptx

    def combine(self, a: dict, b: dict) -> dict:
        raise NotImplementedError

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        return self.combine(next(self.main), next(self.ptx))

    def get_state(self) -> bytes:
        return json.dumps(
            {"main": self.main.get_state().decode(), "ptx": self.ptx.get_state().decode()}
        ).encode()

    def set_state(self, state: bytes | str) -> None:
        d = json.loads(state)
        self.main.set_state(d["main"])
        self.ptx.set_state(d["ptx"])
