"""instructrl/checkpoint.py in a real training process: resume after SIGKILL (also in the middle
of an async save) is bit-identical, SIGTERM saves and exits cleanly.

Round trips and resharding without a training loop: tests/unit/test_checkpoint.py.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from instructrl import checkpoint
from tests.conftest import REPO, subprocess_env

# ---------------------------------------------------------------- subprocess training runs

TRAIN_SCRIPT = textwrap.dedent(
    '''
    """Tiny training run: python train.py WORKDIR TOTAL SAVE_EVERY SLEEP BIG."""
    import sys, time
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from instructrl import checkpoint, train_lib
    from instructrl.stages import common

    workdir, total, every = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    sleep, big = float(sys.argv[4]), int(sys.argv[5])

    class Data:  # deterministic, restorable iterator (stands in for grain)
        def __init__(self):
            self.pos = 0
        def __next__(self):
            r = np.random.default_rng(self.pos)
            self.pos += 1
            x = r.normal(size=(8, 4)).astype(np.float32)
            return {"x": x, "y": np.sin(x).sum(-1, keepdims=True)}
        def get_state(self):
            return {"pos": self.pos}
        def set_state(self, s):
            self.pos = s["pos"]

    def loss_fn(params, batch, rng):
        x = batch["x"] + 0.1 * jax.random.normal(rng, batch["x"].shape)  # uses the step key
        pred = jnp.tanh(x @ params["w1"] + params["b1"]) @ params["w2"]
        n = batch["y"].size
        return ((pred - batch["y"]) ** 2).sum() / n, {"weight": jnp.float32(n)}

    k1, k2 = jax.random.split(jax.random.key(0))
    params = {"w1": jax.random.normal(k1, (4, 16)) * 0.5, "b1": jnp.zeros(16),
              "w2": jax.random.normal(k2, (16, 1)) * 0.5}
    extras = {"big": jnp.zeros((big,), jnp.float32)}
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
    rep = NamedSharding(mesh, P())
    opt_cfg = {"lr": 3e-2, "warmup_steps": 3}
    opt = train_lib.make_optimizer(opt_cfg, total)
    abstract, shardings = train_lib.abstract_train_state(
        opt, jax.eval_shape(lambda: params), jax.tree.map(lambda _: rep, params), mesh,
        extras=jax.eval_shape(lambda: extras))
    ckpt = checkpoint.Checkpointer(workdir, save_interval_steps=every, max_to_keep=2)
    data = Data()
    restored = ckpt.restore_latest(abstract)
    if restored is None:
        state = jax.jit(lambda p, e: train_lib.create_train_state(p, opt, jax.random.key(7), e),
                        out_shardings=shardings)(params, extras)
    else:
        state = restored.state
        data.set_state(restored.data_state)
        print(f"resumed {restored.step}", flush=True)
    start = int(state.step)
    step_fn = train_lib.jit_train_step(
        train_lib.make_train_step(loss_fn, opt, accum_steps=2,
                                  lr_schedule=train_lib.make_schedule(opt_cfg, total)),
        shardings, NamedSharding(mesh, P("data")))
    writer = common.MetricsWriter(workdir, resume_step=start)
    with common.TerminationSignal() as term:
        for step in range(start + 1, total + 1):
            state, metrics = step_fn(state, next(data), state.rng)
            m = jax.device_get(metrics)
            common.check_finite(m, step)
            writer.write(step, m)
            print(f"step {step}", flush=True)
            if ckpt.should_save(step) or step == total:
                ckpt.save(step, state, data_state=data.get_state(), force=True)
                print(f"saving {step}", flush=True)
            if term.should_stop(step):
                ckpt.save(step, state, data_state=data.get_state(), force=True)
                ckpt.close()
                print(f"preempted {step}", flush=True)
                sys.exit(0)
            time.sleep(sleep)
    ckpt.mark_done({"final_step": total})
    ckpt.close()
    writer.close()
    np.savez(workdir + "/final.npz", **jax.device_get(state.params))
    print("done", flush=True)
    '''
)


def _start(script, workdir, total, every, sleep=0.0, big=1):
    return subprocess.Popen(
        [sys.executable, script, workdir, str(total), str(every), str(sleep), str(big)],
        env=subprocess_env(1),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,  # one pipe, read as we go: a full stderr pipe cannot block
        text=True,
    )


def _run_to_end(script, workdir, total, every, **kw):
    proc = _start(script, workdir, total, every, **kw)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, f"run failed:\n{out[-6000:]}"
    return out


def _committed_steps(workdir):
    folder = os.path.join(workdir, checkpoint.CHECKPOINTS_DIR)
    return [d for d in os.listdir(folder) if d.isdigit()] if os.path.isdir(folder) else []


def _run_until(script, workdir, total, every, line, sig, *, after_commit=False, **kw):
    """Starts a run and sends `sig` as soon as it prints `line` (with after_commit, at the
    first line from there on once a checkpoint is committed); returns (lines, rc)."""
    proc = _start(script, workdir, total, every, **kw)
    seen = []
    armed = False
    for text in proc.stdout:
        seen.append(text.strip())
        armed = armed or text.strip() == line
        if armed and (not after_commit or _committed_steps(workdir)):
            proc.send_signal(sig)
            break
    out, _ = proc.communicate(timeout=300)
    lines = seen + out.splitlines()
    assert line in seen, f"never printed {line!r}:\n" + "\n".join(lines[-60:])
    return lines, proc.returncode


def _final(workdir):
    with np.load(os.path.join(workdir, "final.npz")) as f:
        return {k: f[k] for k in f.files}


@pytest.fixture(scope="module")
def train_script(tmp_path_factory):
    path = tmp_path_factory.mktemp("script") / "train.py"
    path.write_text(TRAIN_SCRIPT)
    return str(path)


@pytest.fixture(scope="module")
def reference_run(train_script, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("reference"))
    _run_to_end(train_script, workdir, 20, 4)
    return _final(workdir)


@pytest.mark.slow
def test_sigkill_then_resume_is_bit_identical(train_script, reference_run, tmp_path):
    workdir = str(tmp_path / "run")
    kill_at = random.Random().randint(5, 17)
    # Saves are asynchronous: under load the first one may still be in flight at kill_at,
    # so the kill waits for a committed checkpoint (else the re-run would start afresh).
    _, rc = _run_until(
        train_script, workdir, 20, 4, f"step {kill_at}", signal.SIGKILL, after_commit=True
    )
    assert rc == -signal.SIGKILL
    assert not checkpoint.is_done(workdir)
    out = _run_to_end(train_script, workdir, 20, 4)
    assert "resumed " in out, out
    final = _final(workdir)
    for k, v in reference_run.items():
        assert np.array_equal(final[k], v), f"{k} differs after resume (killed at {kill_at})"
    assert checkpoint.is_done(workdir)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        steps = [json.loads(x)["step"] for x in f]
    assert steps == list(range(1, 21))


@pytest.mark.slow
def test_kill_during_async_save_keeps_previous(train_script, reference_run, tmp_path):
    workdir = str(tmp_path / "run")
    # A 16 MB extra makes the background write long enough to be cut short.
    _, rc = _run_until(train_script, workdir, 20, 4, "saving 8", signal.SIGKILL, big=4_000_000)
    assert rc == -signal.SIGKILL
    names = os.listdir(os.path.join(workdir, "checkpoints"))
    # Normally the kill lands mid-write (8 is still a tmp folder); if the write had already
    # committed, 8 is complete. Either way the latest committed step loads.
    assert "4" in names and ("8.orbax-checkpoint-tmp" in names or "8" in names), names
    latest = 8 if "8" in names else 4
    with checkpoint.Checkpointer(workdir, save_interval_steps=4) as ckpt:
        assert ckpt.latest_step() == latest
    out = _run_to_end(train_script, workdir, 20, 4, big=4_000_000)
    assert f"resumed {latest}" in out.splitlines()
    final = _final(workdir)
    for k, v in reference_run.items():
        assert np.array_equal(final[k], v), k
    leftovers = [d for d in os.listdir(os.path.join(workdir, "checkpoints")) if "tmp" in d]
    assert not leftovers


@pytest.mark.slow
def test_sigterm_saves_and_exits_cleanly(train_script, tmp_path):
    workdir = str(tmp_path / "run")
    lines, rc = _run_until(train_script, workdir, 200, 50, "step 3", signal.SIGTERM, sleep=0.05)
    assert rc == 0, "\n".join(lines[-60:])
    stopped = [int(x.split()[1]) for x in lines if x.startswith("preempted")]
    assert stopped and stopped[0] >= 3, lines
    with checkpoint.Checkpointer(workdir, save_interval_steps=50) as ckpt:
        assert ckpt.latest_step() == stopped[0]
    assert not checkpoint.is_done(workdir)
