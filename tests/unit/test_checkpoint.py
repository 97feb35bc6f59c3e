"""Tests for instructrl/checkpoint.py: round trips, done marker, export, resharding, 2 processes.

Resume after kill/SIGTERM of a real training process: tests/stages/test_checkpoint_resume.py.
"""

from __future__ import annotations

import errno
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from instructrl import checkpoint, train_lib
from instructrl.errors import InputError, StorageError
from tests.conftest import run_in_subprocess, tree_digest


def _mesh1():
    return jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))


def _make_state(seed=0, extras=None):
    rng = np.random.default_rng(seed)
    params = {
        "dense": {"kernel": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32)},
        "bias": jnp.asarray(rng.normal(size=(4,)), jnp.float32),
    }
    mesh = _mesh1()
    rep = NamedSharding(mesh, PartitionSpec())
    opt = train_lib.make_optimizer({"lr": 1e-2, "weight_decay": 0.1}, 100)
    extras = extras if extras is not None else {"ema": jax.tree.map(jnp.copy, params)}
    abstract, shardings = train_lib.abstract_train_state(
        opt,
        jax.eval_shape(lambda: params),
        jax.tree.map(lambda _: rep, params),
        mesh,
        extras=jax.eval_shape(lambda: extras),
    )
    state = jax.jit(
        lambda p, e: train_lib.create_train_state(p, opt, jax.random.key(seed), e),
        out_shardings=shardings,
    )(params, extras)
    # One update so the optimizer moments are non-trivial.
    grads = jax.tree.map(jnp.ones_like, params)
    state = train_lib.apply_gradients(state, grads, opt)
    return state, abstract


def _assert_trees_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(la, lb, strict=True):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_interval_and_max_to_keep(tmp_path):
    state, abstract = _make_state()
    stage = str(tmp_path / "sft")
    with checkpoint.Checkpointer(stage, save_interval_steps=2, max_to_keep=2) as ckpt:
        assert ckpt.restore_latest(abstract) is None
        saved = []
        for step in range(1, 8):
            if ckpt.should_save(step):
                data = {"position": step} if step % 4 else b"\x00grain\xff"
                assert ckpt.save(step, state, data_state=data, meta={"kl_coef": 0.1 * step})
                saved.append(step)
        assert saved == [2, 4, 6]
        assert ckpt.save(7, state, data_state={"position": 7}, meta={"end": True}, force=True)
        assert not ckpt.save(7, state, force=True)  # already saved: no-op
        ckpt.wait_until_finished()
        assert ckpt.all_steps() == [6, 7]
    # A new process (new Checkpointer) resumes from the latest step.
    with checkpoint.Checkpointer(stage, save_interval_steps=2, max_to_keep=2) as ckpt:
        restored = ckpt.restore_latest(abstract)
        assert restored.step == 7
        assert restored.data_state == {"position": 7}
        assert restored.meta == {"end": True}
        _assert_trees_equal(restored.state, state)
        assert restored.state.rng.dtype == state.rng.dtype
        assert int(restored.state.opt_state[1][0].count) == 1
        six = ckpt.restore(6, abstract)
        assert six.data_state == {"position": 6}
        assert six.meta == {"kl_coef": pytest.approx(0.6)}
        # A concrete state works as a target too (its shardings are used).
        _assert_trees_equal(ckpt.restore(6, state).state, state)
    assert os.path.isdir(os.path.join(stage, "checkpoints", "7", "state"))


def test_bytes_data_state_and_restore_data_false(tmp_path):
    state, abstract = _make_state(extras={})
    with checkpoint.Checkpointer(str(tmp_path), save_interval_steps=1) as ckpt:
        ckpt.save(4, state, data_state=b"\x00grain\xff")
        ckpt.wait_until_finished()
        assert ckpt.restore_latest(abstract).data_state == b"\x00grain\xff"
        # Saved by 1 process; pretend this run has another process count.
        data_dir = tmp_path / "checkpoints" / "4" / "data"
        os.rename(data_dir / "process_0-of-1.json", data_dir / "process_0-of-2.json")
        with pytest.raises(ValueError, match="another process count"):
            ckpt.restore(4, abstract)
        assert ckpt.restore(4, abstract, restore_data=False).data_state is None


def test_restore_needs_shardings(tmp_path):
    state, abstract = _make_state(extras={})
    bare = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), abstract)
    with checkpoint.Checkpointer(str(tmp_path), save_interval_steps=1) as ckpt:
        ckpt.save(1, state)
        ckpt.wait_until_finished()
        with pytest.raises(ValueError, match=r"abstract_state\.step: no sharding"):
            ckpt.restore(1, bare)


def test_tmp_dir_of_interrupted_save_is_ignored(tmp_path):
    state, abstract = _make_state(extras={})
    with checkpoint.Checkpointer(str(tmp_path), save_interval_steps=1) as ckpt:
        ckpt.save(3, state)
    # What a save killed mid-write leaves behind (orbax 0.12.8 naming; older versions add a
    # timestamp): a step folder with a tmp suffix holding partial items.
    for name in ("5.orbax-checkpoint-tmp", "6.orbax-checkpoint-tmp-1234567"):
        tmp = tmp_path / "checkpoints" / name / "state.orbax-checkpoint-tmp"
        tmp.mkdir(parents=True)
        (tmp / "garbage").write_bytes(b"\x00" * 10)
    with checkpoint.Checkpointer(str(tmp_path), save_interval_steps=1) as ckpt:
        assert ckpt.latest_step() == 3
        _assert_trees_equal(ckpt.restore_latest(abstract).state, state)


def _cut_array_files(folder: str, size: int = 10) -> None:
    """Cuts every data file of the OCDBT stores under `folder` to `size` bytes (small arrays
    live inline in the btree files, big ones in data files: both are under `d/`)."""
    for root, _, names in os.walk(folder):
        if os.path.basename(root) == "d":
            for name in names:
                with open(os.path.join(root, name), "r+b") as f:
                    f.truncate(size)


def _corrupt_newest(stage: str, how: str, step: int) -> str:
    """What a kill or a bad disk can leave in a committed step: its array files cut short,
    or its tree metadata garbled. Returns the step folder."""
    folder = os.path.join(stage, "checkpoints", str(step))
    if how == "truncated":
        _cut_array_files(folder)
    else:
        with open(os.path.join(folder, "state", "_METADATA"), "w") as f:
            f.write("{garbled")
    return folder


@pytest.mark.parametrize("how", ["truncated", "metadata"])
def test_restore_falls_back_to_the_newest_readable_step_and_keeps_the_bad_one(
    tmp_path, how, caplog
):
    states = [_make_state(seed=s, extras={})[0] for s in (1, 2, 3)]
    abstract = _make_state(extras={})[1]
    stage = str(tmp_path / "sft")
    with checkpoint.Checkpointer(stage, save_interval_steps=1, max_to_keep=3) as ckpt:
        for step, state in enumerate(states, start=1):
            ckpt.save(step, state, data_state={"position": step})
    bad = _corrupt_newest(stage, how, 3)
    before = tree_digest(bad)
    with checkpoint.Checkpointer(stage, save_interval_steps=1, max_to_keep=3) as ckpt:
        restored = ckpt.restore_latest(abstract)
        assert restored.step == 2 and restored.data_state == {"position": 2}
        _assert_trees_equal(restored.state, states[1])
        assert ckpt.all_steps() == [1, 2]
        ckpt.save(3, states[2], data_state={"position": 3})  # the step is saved anew
    skipped = [r.getMessage() for r in caplog.records if "cannot be read" in r.getMessage()]
    assert len(skipped) == 1 and skipped[0].startswith(f"{bad}: cannot be read (")
    moved = os.path.join(stage, checkpoint.UNREADABLE_DIR, "3")
    assert tree_digest(moved) == before  # kept as it was, not deleted
    with checkpoint.Checkpointer(stage, save_interval_steps=1, max_to_keep=3) as ckpt:
        restored = ckpt.restore_latest(abstract)
        assert restored.step == 3
        _assert_trees_equal(restored.state, states[2])


def test_no_readable_step_is_one_line_naming_the_folder_and_moves_nothing(tmp_path):
    state, abstract = _make_state(extras={})
    stage = str(tmp_path / "sft")
    with checkpoint.Checkpointer(stage, save_interval_steps=1) as ckpt:
        ckpt.save(1, state)
        ckpt.save(2, state)
    for step in (1, 2):
        _corrupt_newest(stage, "metadata", step)
    before = tree_digest(stage)
    folder = os.path.join(stage, "checkpoints")
    with (
        checkpoint.Checkpointer(stage, save_interval_steps=1) as ckpt,
        pytest.raises(InputError, match=f"^{folder}: no checkpoint can be read \\(steps 2, 1;"),
    ):
        ckpt.restore_latest(abstract)
    assert tree_digest(stage) == before


def test_a_save_the_disk_refuses_is_one_line_and_the_last_good_step_stays(tmp_path, monkeypatch):
    """Disk full while an async save writes: StorageError naming the step folder, the free
    space and the newest intact step, raised once (closing does not raise it again); the
    intact step restores."""
    state, abstract = _make_state(extras={})
    stage = str(tmp_path / "sft")
    write = checkpoint.DataStateHandler.save

    def full_disk(self, directory, args):
        if "/checkpoints/2" in str(directory):
            raise OSError(errno.ENOSPC, "No space left on device", str(directory))
        return write(self, directory, args)

    monkeypatch.setattr(checkpoint.DataStateHandler, "save", full_disk)
    ckpt = checkpoint.Checkpointer(stage, save_interval_steps=1)
    ckpt.save(1, state, data_state={"position": 1})
    path = os.path.join(stage, "checkpoints", "2")
    with pytest.raises(StorageError) as e:  # at once, or when the next call finds it
        ckpt.save(2, state, data_state={"position": 2})
        ckpt.wait_until_finished()
    assert re.fullmatch(
        re.escape(f"{path}: no space left on device while saving the checkpoint of step 2 (")
        + r"[\d.]+ [KMGT]?B free\); checkpoints: step 1, the newest saved, is intact",
        str(e.value),
    ), str(e.value)
    with pytest.raises(StorageError):  # later calls report the same failure
        ckpt.save(3, state, data_state={"position": 3})
    ckpt.close()  # reported already: closing does not raise it again
    monkeypatch.setattr(checkpoint.DataStateHandler, "save", write)
    with checkpoint.Checkpointer(stage, save_interval_steps=1) as again:
        assert again.all_steps() == [1]
        assert again.restore_latest(abstract).data_state == {"position": 1}


def test_unreadable_export_is_one_line(tmp_path):
    state, _ = _make_state(extras={})
    out = str(tmp_path / "export")
    checkpoint.export_params(state.params, {"d_model": 4}, out)
    with open(os.path.join(out, checkpoint.MODEL_CONFIG_FILE), "w") as f:
        f.write('{"d_model": 4,\n')
    with pytest.raises(InputError, match=f"^{out}/model_config.json:2: not valid JSON$"):
        checkpoint.load_exported(out)
    checkpoint.export_params(state.params, {"d_model": 4}, out)
    _cut_array_files(out)
    with pytest.raises(InputError, match=f"^{out}/params: exported params cannot be read \\("):
        checkpoint.load_exported(out)


def test_done_marker(tmp_path):
    state, _ = _make_state(extras={})
    stage = str(tmp_path / "rm")
    assert not checkpoint.is_done(stage)
    with checkpoint.Checkpointer(stage, save_interval_steps=5) as ckpt:
        ckpt.save(10, state, force=True)
        ckpt.mark_done({"final_step": 10})
    assert checkpoint.is_done(stage)
    with open(os.path.join(stage, "DONE")) as f:
        record = json.load(f)
    assert record["final_step"] == 10 and record["latest_step"] == 10


def test_export_and_load(tmp_path):
    state, _ = _make_state(extras={})
    out = str(tmp_path / "export")
    cfg = {"vocab_size": 128, "d_model": 16, "position": "rope"}
    checkpoint.export_params(state.params, cfg, out)
    params, loaded_cfg = checkpoint.load_exported(out)
    assert loaded_cfg == cfg
    _assert_trees_equal(params, state.params)
    rep = NamedSharding(_mesh1(), PartitionSpec())
    params, _ = checkpoint.load_exported(out, shardings=rep)
    assert params["bias"].sharding == rep
    checkpoint.export_params(jax.tree.map(lambda x: x + 1, state.params), cfg, out)  # overwrite
    params, _ = checkpoint.load_exported(out)
    np.testing.assert_array_equal(params["bias"], state.params["bias"] + 1)
    with pytest.raises(FileNotFoundError, match=r"model_config\.json: missing"):
        checkpoint.load_exported(str(tmp_path / "nothing"))


# ---------------------------------------------------------------- resharding on restore

SAVE_8 = """
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from instructrl import checkpoint, sharding, train_lib

assert jax.device_count() == 8
def mesh_of(shape):
    return sharding.make_mesh(dict(zip(("data", "fsdp", "tensor"), shape)))

def specs():  # fsdp over the embedding dim, tensor over heads/mlp
    return {"embed": P("fsdp", "tensor"), "mlp": {"kernel": P("fsdp", "tensor"), "bias": P("tensor")},
            "norm": P()}

params = {"embed": jnp.arange(64 * 16, dtype=jnp.float32).reshape(64, 16) / 100,
          "mlp": {"kernel": jnp.sin(jnp.arange(16 * 32, dtype=jnp.float32)).reshape(16, 32),
                  "bias": jnp.arange(32, dtype=jnp.float32)},
          "norm": jnp.ones(16)}
opt = train_lib.make_optimizer({"lr": 1e-2}, 10)

def abstract_on(mesh):
    shard = jax.tree.map(lambda s: NamedSharding(mesh, s), specs())
    return train_lib.abstract_train_state(opt, jax.eval_shape(lambda: params), shard, mesh)

src = mesh_of((1, 4, 2))
abstract, shardings = abstract_on(src)
state = jax.jit(lambda p: train_lib.create_train_state(p, opt, jax.random.key(3)),
                out_shardings=shardings)(params)
state = jax.jit(lambda s: train_lib.apply_gradients(s, jax.tree.map(jnp.cos, s.params), opt),
                out_shardings=shardings, donate_argnums=0)(state)
assert state.opt_state[1][0].mu["embed"].sharding.spec == P("fsdp", "tensor")
assert len(state.params["embed"].addressable_shards) == 8
with checkpoint.Checkpointer(WORKDIR, save_interval_steps=1) as ckpt:
    ckpt.save(1, state, data_state={"pos": 1}, meta={"m": 1})
np.savez(WORKDIR + "/expected.npz", **{jax.tree_util.keystr(p): np.asarray(x)
         for p, x in jax.tree_util.tree_leaves_with_path(jax.tree.map(
             lambda x: jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x, state))})

# Restore onto a (data=4, tensor=2) mesh in the same 8-device process.
dst = mesh_of((4, 1, 2))
abstract, _ = abstract_on(dst)
with checkpoint.Checkpointer(WORKDIR, save_interval_steps=1) as ckpt:
    restored = ckpt.restore_latest(abstract)
assert restored.state.params["embed"].sharding.mesh.shape == {"data": 4, "fsdp": 1, "tensor": 2}
assert restored.state.opt_state[1][0].nu["mlp"]["kernel"].sharding == NamedSharding(dst, P("fsdp", "tensor"))
CHECK
"""

RESTORE_1 = """
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from instructrl import checkpoint, sharding, train_lib

assert jax.device_count() == 1
mesh = sharding.make_mesh({})
params = {"embed": jnp.zeros((64, 16)), "mlp": {"kernel": jnp.zeros((16, 32)), "bias": jnp.zeros(32)},
          "norm": jnp.zeros(16)}
opt = train_lib.make_optimizer({"lr": 1e-2}, 10)
rep = NamedSharding(mesh, P())
abstract, _ = train_lib.abstract_train_state(
    opt, jax.eval_shape(lambda: params), jax.tree.map(lambda _: rep, params), mesh)
with checkpoint.Checkpointer(WORKDIR, save_interval_steps=1) as ckpt:
    restored = ckpt.restore_latest(abstract)
assert restored.data_state == {"pos": 1} and restored.meta == {"m": 1}
CHECK
"""

CHECK = """
got = {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(
    jax.tree.map(lambda x: jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
                 else x, restored.state))}
with np.load(WORKDIR + "/expected.npz") as f:
    assert sorted(f.files) == sorted(got), (sorted(f.files), sorted(got))
    for k in f.files:
        assert np.array_equal(f[k], got[k]), k
print("OK", len(got))
"""


def test_restore_across_meshes(tmp_path):
    workdir = repr(str(tmp_path))
    out = run_in_subprocess(
        f"WORKDIR = {workdir}\n" + SAVE_8.replace("CHECK", CHECK), num_devices=8
    )
    assert "OK" in out
    out = run_in_subprocess(f"WORKDIR = {workdir}\n" + RESTORE_1.replace("CHECK", CHECK))
    assert "OK" in out


def test_sgd_state_round_trip_without_extras(tmp_path):
    # Plain optax optimizers (no schedule state) and an empty extras dict also round-trip.
    opt = optax.sgd(0.1, momentum=0.9)
    params = {"w": jnp.arange(6.0).reshape(2, 3)}
    state = train_lib.create_train_state(params, opt, jax.random.key(1))
    state = train_lib.apply_gradients(state, {"w": jnp.ones((2, 3))}, opt)
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
    )
    with checkpoint.Checkpointer(str(tmp_path), save_interval_steps=1) as ckpt:
        ckpt.save(1, state)
        ckpt.wait_until_finished()
        restored = ckpt.restore_latest(abstract)
    _assert_trees_equal(restored.state, state)
    assert restored.data_state is None and restored.meta == {}


MULTIPROCESS = """
import numpy as np
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
from instructrl import checkpoint, sharding, train_lib
from instructrl.stages import common

assert jax.process_count() == 2 and jax.device_count() == 4
mesh = sharding.make_mesh({"fsdp": 2, "tensor": 2})
params = {"w": jnp.arange(8 * 6, dtype=jnp.float32).reshape(8, 6), "b": jnp.ones(6)}
shard = {"w": NamedSharding(mesh, P("fsdp", "tensor")), "b": NamedSharding(mesh, P("tensor"))}
opt = train_lib.make_optimizer({"lr": 1e-2}, 10)
abstract, state_sh = train_lib.abstract_train_state(opt, jax.eval_shape(lambda: params), shard, mesh)
state = jax.jit(lambda: train_lib.create_train_state(params, opt, jax.random.key(5)),
                out_shardings=state_sh)()
assert not state.params["w"].is_fully_addressable
with checkpoint.Checkpointer(WORKDIR, save_interval_steps=5) as ckpt:
    assert ckpt.should_save(5) and not ckpt.should_save(6)
    ckpt.save(5, state, data_state={"pos": 100 + PROCESS_ID}, meta={"beta": 0.02})
    ckpt.mark_done()
with checkpoint.Checkpointer(WORKDIR, save_interval_steps=5) as ckpt:
    restored = ckpt.restore_latest(abstract)
assert restored.step == 5 and restored.data_state == {"pos": 100 + PROCESS_ID}, restored
assert restored.meta == {"beta": 0.02}
np.testing.assert_array_equal(sharding.to_host(restored.state.params["w"]), np.asarray(params["w"]))
assert checkpoint.is_done(WORKDIR)

term = common.TerminationSignal()
assert not term.should_stop(0)
term.received = PROCESS_ID == 1  # the notice reached one host only
assert term.should_stop(1)  # both processes stop at the same step
print("OK")
"""


def test_multiprocess_save_restore(tmp_path):
    """2 processes x 2 devices: cross-process sharded state, per-process data states."""
    from tests.conftest import run_multiprocess

    outs = run_multiprocess(
        f"WORKDIR = {str(tmp_path)!r}\n" + MULTIPROCESS, num_processes=2, devices_per_process=2
    )
    assert all("OK" in out for out in outs)
