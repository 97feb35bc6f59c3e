"""stages/driver.py: per-stage data overrides, and the one training loop on a toy step."""

from __future__ import annotations

import json
import os
import signal

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from instructrl import checkpoint as ckpt_lib
from instructrl import sharding
from instructrl.data import default_data_config
from instructrl.errors import ConfigError, Preempted
from instructrl.stages import driver


def _config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.data = default_data_config()
    config.data.comparisons = "@collect/comparisons.jsonl"
    config.data.seq_len = 96
    config.rm = ml_collections.ConfigDict(dict(kind="rm"))
    config.rm_2 = ml_collections.ConfigDict(dict(kind="rm"))
    config.rm_2.data = ml_collections.ConfigDict(
        dict(comparisons="@collect/comparisons.jsonl,@collect_2/comparisons.jsonl", seq_len=64)
    )
    return config


def test_stage_data_overrides_config_data_and_resolves_paths(tmp_path):
    config, w = _config(), str(tmp_path)
    own = driver.data_config(config, w, "rm_2")
    assert own.comparisons == ",".join(
        os.path.join(w, s, "comparisons.jsonl") for s in ("collect", "collect_2")
    )
    assert own.seq_len == 64 and own.tfds_dir == os.path.join(w, "tfds")
    shared = driver.data_config(config, w, "rm")  # no own data: config.data as it is
    assert shared.comparisons == os.path.join(w, "collect", "comparisons.jsonl")
    assert shared.seq_len == 96
    assert config.data.comparisons == "@collect/comparisons.jsonl"  # not modified in place
    assert driver.data_config(config, w).to_dict() == shared.to_dict()


def test_unknown_stage_data_key_names_it(tmp_path):
    config = _config()
    config.rm_2.data.comparison = "x.jsonl"
    with pytest.raises(ConfigError, match=r"^config key 'rm_2\.data\.comparison' is not a key"):
        driver.data_config(config, str(tmp_path), "rm_2")


# ---------------------------------------------------------------- the one training loop
@flax.struct.dataclass
class _State:
    step: jax.Array
    total: jax.Array


class _Data:
    """Batches {"x": [2] filled with the batch number}; its position is checkpointed."""

    def __init__(self):
        self.i = 0

    def __next__(self):
        self.i += 1
        return {"x": np.full((2,), self.i, np.float32)}

    def get_state(self):
        return {"i": self.i}

    def set_state(self, state):
        self.i = state["i"]


def _loop(tmp_path, total_steps, step_fn, **kw):
    mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1)))
    state = _State(step=jnp.zeros((), jnp.int32), total=jnp.zeros((), jnp.float32))
    run = driver.Run(state, _Data(), {"note": 1}, None)
    ckpt = ckpt_lib.Checkpointer(str(tmp_path / "ckpt"), save_interval_steps=100, max_to_keep=1)
    final = driver.train_loop(
        run, step_fn, name="toy", stage_dir=str(tmp_path), mesh=mesh, checkpointer=ckpt,
        total_steps=total_steps, log_every=2, **kw,
    )  # fmt: skip
    with open(tmp_path / "metrics.jsonl") as f:
        return final, [json.loads(line) for line in f], ckpt


def _toy_step(state, batch, step):
    new = _State(step=state.step + 1, total=state.total + batch["x"].sum())
    return new, {"total": new.total}, 10 * step


def test_train_loop_runs_any_step_function_with_log_and_eval_hooks(tmp_path):
    """The loop LM, RM and PPO share: the step function's metrics on logging steps (every 2
    and the last), on_log(state, step, batch, aux) and evaluate(state, step) (every 3 and the
    last) merged into them, and a checkpoint at the end holding the state and data position."""
    seen = []

    def on_log(state, step, batch, aux):
        seen.append(step)
        return {"aux": aux, "batch": float(batch["x"][0]), "state_step": int(state.step)}

    final, rows, ckpt = _loop(
        tmp_path, 5, _toy_step, on_log=on_log, evaluate=lambda s, step: {"val": step}, eval_every=3
    )
    assert int(final.step) == 5 and float(final.total) == 2 * (1 + 2 + 3 + 4 + 5)
    assert [r["step"] for r in rows] == [2, 3, 4, 5] and seen == [2, 3, 4, 5]
    for r in rows:
        s = r["step"]
        assert r["total"] == s * (s + 1)  # 2 x (1 + ... + s)
        assert r["aux"] == 10 * (s - 1) and r["batch"] == s and r["state_step"] == s
        assert ("val" in r) == (s in (3, 5)) and r.get("val", s) == s
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), final
    )
    restored = ckpt.restore_latest(abstract)
    assert restored.step == 5 and restored.data_state == {"i": 5} and restored.meta == {"note": 1}


def test_train_loop_stops_on_nan_and_on_sigterm_naming_the_unit(tmp_path):
    def nan_from_3(state, batch, step):  # a NaN does not heal: the next log step sees it
        new, _, aux = _toy_step(state, batch, step)
        return new, {"total": jnp.where(step >= 2, jnp.nan, new.total)}, aux

    with pytest.raises(FloatingPointError, match=r"step 4: total is nan"):
        _loop(tmp_path / "nan", 6, nan_from_3)

    def term_at_2(state, batch, step):
        if step == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return _toy_step(state, batch, step)

    with pytest.raises(
        Preempted, match=r"^stage toy: stopped by signal at iteration 2; checkpoint"
    ):
        _loop(tmp_path / "term", 6, term_at_2, unit="iteration")


def test_a_sigterm_after_the_loops_last_check_reaches_the_outer_signal(tmp_path):
    """Main holds a TerminationSignal around all stages, the loop its own: a SIGTERM that
    arrives while the last step is logged (after the loop's last check) ends the loop
    normally, with its final checkpoint, and main still sees it; one that arrived before the
    loop started stops the loop at its first step."""
    from instructrl.stages import common

    def term_while_logging_last(state, step, batch, aux):
        if step == 4:
            os.kill(os.getpid(), signal.SIGTERM)
        return {}

    with common.TerminationSignal() as outer:
        final, rows, ckpt = _loop(tmp_path / "last", 4, _toy_step, on_log=term_while_logging_last)
        assert outer.received and int(final.step) == 4 and rows[-1]["step"] == 4
    assert ckpt.latest_step() == 4

    with common.TerminationSignal() as outer:
        os.kill(os.getpid(), signal.SIGTERM)
        with pytest.raises(Preempted, match=r"stopped by signal at step 1;"):
            _loop(tmp_path / "early", 6, _toy_step)
