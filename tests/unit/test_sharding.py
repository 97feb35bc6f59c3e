"""Tests for instructrl/sharding.py: mesh shapes, rules, placement, and sharded == 1-device math.

Multi-device checks run in subprocesses with 8 virtual CPU devices; the multi-process check
joins 2 processes with jax.distributed (gloo).
"""

from __future__ import annotations

import re
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import AbstractMesh, AxisType, PartitionSpec

from instructrl import sharding
from tests.conftest import run_in_subprocess, run_multiprocess

P = PartitionSpec


class Tiny(nn.Module):
    """A one-block LM using every logical name of DEFAULT_RULES; `bias` has no names."""

    vocab: int = 32
    d: int = 16
    heads: int = 4
    head_dim: int = 4
    ff: int = 32

    @nn.compact
    def __call__(self, tokens):  # tokens int32 [B, T] -> logits [B, T, V]
        lp = nn.with_logical_partitioning
        init = nn.initializers.normal(0.2)
        emb = self.param("embed", lp(init, ("vocab", "embed")), (self.vocab, self.d))
        # Gather from a table whose embed dim is whole: an fsdp-split embed dim in the lookup
        # output clashes with the fsdp-split batch and XLA falls back to full rematerialisation.
        table = nn.with_logical_constraint(emb, ("vocab", None))
        x = nn.with_logical_constraint(table[tokens], ("batch", "length", "act_embed"))
        q = self.param("q", lp(init, ("embed", "heads", "head_dim")), (self.d, self.heads, 4))
        o = self.param("o", lp(init, ("heads", "head_dim", "embed")), (self.heads, 4, self.d))
        h = jnp.einsum("btd,dhk->bthk", x, q)
        h = nn.with_logical_constraint(h, ("batch", "length", "act_heads", None))
        x = x + jnp.einsum("bthk,hkd->btd", jnp.tanh(h), o)
        wi = self.param("wi", lp(init, ("embed", "mlp")), (self.d, self.ff))
        wo = self.param("wo", lp(init, ("mlp", "embed")), (self.ff, self.d))
        hidden = nn.with_logical_constraint(nn.gelu(x @ wi), ("batch", "length", "act_mlp"))
        x = x + hidden @ wo
        x = x * self.param("scale", lp(nn.initializers.ones, ("norm",)), (self.d,))
        bias = self.param("bias", nn.initializers.normal(0.1), (self.vocab,))
        logits = x @ emb.T + bias
        return nn.with_logical_constraint(logits, ("batch", "length", "act_vocab"))


TINY_SPECS = {
    "embed": P("tensor", "fsdp"),
    "q": P("fsdp", "tensor", None),
    "o": P("tensor", None, "fsdp"),
    "wi": P("fsdp", "tensor"),
    "wo": P("tensor", "fsdp"),
    "scale": P(None),
    "bias": P(),
}


def tiny_loss(model, params, tokens):
    """Mean next-token cross entropy; scalar."""
    logits = model.apply({"params": params}, tokens)
    logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    return -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1).mean()


# ---- mesh ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "msg"),
    [
        ({"data": 3, "fsdp": 1, "tensor": 2}, "mesh.data=3 * mesh.fsdp=1 * mesh.tensor=2 = 6 != 8"),
        ({"data": 3, "fsdp": -1}, "mesh.fsdp=-1: 8 devices not divisible by the other axes' "),
        ({"data": -1, "fsdp": -1}, "mesh.fsdp=-1: only one axis may be -1"),
        ({"data": 0}, "mesh.data=0: must be a positive size or -1"),
        ({"model": 2}, "mesh.model: unknown mesh axis"),
        ({"tensor": 16}, "= 16 != 8 devices"),
    ],
)
def test_make_mesh_errors(shape, msg):
    fake_devices = [object()] * 8  # errors are raised before any device is touched
    with pytest.raises(ValueError, match=re.escape(msg)):
        sharding.make_mesh(shape, devices=fake_devices)


def test_make_mesh_single_device():
    cfg = ml_collections.ConfigDict({"data": 1, "fsdp": -1, "tensor": 1})
    mesh = sharding.make_mesh(cfg)
    assert mesh.axis_names == ("data", "fsdp", "tensor")
    assert dict(mesh.shape) == {"data": 1, "fsdp": 1, "tensor": 1}
    assert mesh.axis_types == (AxisType.Auto,) * 3
    assert dict(sharding.make_mesh({}).shape) == {"data": 1, "fsdp": 1, "tensor": 1}


# ---- rules --------------------------------------------------------------------------------


def test_rules_from_config():
    assert sharding.rules_from_config(None) is sharding.DEFAULT_RULES
    rules = dict(sharding.rules_from_config({"kv_heads": None, "embed": ["fsdp", "data"]}))
    assert rules["kv_heads"] is None and rules["embed"] == ("fsdp", "data")
    assert rules["heads"] == "tensor"
    cfg = ml_collections.ConfigDict({"mlp": "none", "vocab": "fsdp"})
    rules = dict(sharding.rules_from_config(cfg))
    assert rules["mlp"] is None and rules["vocab"] == "fsdp"
    pairs = sharding.rules_from_config([("batch", ["data"]), ("experts", "tensor")])
    assert pairs == (("batch", "data"), ("experts", "tensor"))
    with pytest.raises(ValueError, match=r"rules\.embedd: unknown logical axis"):
        sharding.rules_from_config({"embedd": "fsdp"})
    with pytest.raises(ValueError, match=r"rules\.embed: 'model' is not a mesh axis"):
        sharding.rules_from_config({"embed": "model"})
    with pytest.raises(ValueError, match=r"rules\[0\]: expected a \(logical name"):
        sharding.rules_from_config([("batch",)])


def test_default_rules_cover_model_names():
    names = {n for n, _ in sharding.DEFAULT_RULES}
    assert names == {
        *("vocab", "embed", "heads", "kv_heads", "head_dim", "mlp", "norm"),
        *("batch", "length", "act_embed", "act_heads", "act_mlp", "act_vocab"),
    }
    assert nn.logical_to_mesh_axes(("batch", "length", "act_embed"), sharding.DEFAULT_RULES) == P(
        ("data", "fsdp"), None, None
    )


def test_param_partition_specs():
    mesh = sharding.make_mesh({})
    tokens = jnp.zeros((2, 8), jnp.int32)
    abstract, shardings = sharding.abstract_params_and_shardings(Tiny(), (tokens,), mesh)
    assert {k: s.spec for k, s in shardings.items()} == TINY_SPECS
    assert abstract["q"] == jax.ShapeDtypeStruct((16, 4, 4), jnp.float32)
    # A rule override flows through.
    rules = sharding.rules_from_config({"embed": None, "mlp": "fsdp"})
    _, shardings = sharding.abstract_params_and_shardings(
        Tiny(), (jax.ShapeDtypeStruct((2, 8), jnp.int32),), mesh, rules
    )
    assert shardings["wi"].spec == P(None, "fsdp") and shardings["embed"].spec == P("tensor", None)


class _K(nn.Module):
    @nn.compact
    def __call__(self, x):  # x [B, T, 8] -> [B, T, 2, 4]
        lp = nn.with_logical_partitioning
        names = ("embed", "kv_heads", "head_dim")
        kernel = self.param("kernel", lp(nn.initializers.normal(), names), (8, 2, 4))
        return jnp.einsum("btd,dhk->bthk", x, kernel)


class _Attn(nn.Module):
    @nn.compact
    def __call__(self, x):
        return _K(name="k")(x)


class _Root(nn.Module):
    @nn.compact
    def __call__(self, x):
        return _Attn(name="attn")(x)


def test_check_divisible_names_param_and_axis():
    x = jax.ShapeDtypeStruct((2, 3, 8), jnp.float32)
    boxed = jax.eval_shape(lambda x: {"block_0": _Root().init(jax.random.key(0), x)["params"]}, x)
    specs, abstract = nn.get_partition_spec(boxed), nn.unbox(boxed)
    mesh = AbstractMesh((2, 2, 4), sharding.MESH_AXES)
    msg = "params/block_0/attn/k/kernel: dim 1 (kv_heads=2) not divisible by mesh axis tensor=4"
    with pytest.raises(ValueError, match=re.escape(msg)):
        sharding.check_divisible(abstract, specs, mesh, prefix="params/")
    sharding.check_divisible(abstract, specs, AbstractMesh((2, 4, 2), sharding.MESH_AXES))
    # Replicating kv_heads through a rule override makes it fit.
    rules = sharding.rules_from_config({"kv_heads": None})
    sharding.check_divisible(abstract, specs, mesh, rules)
    acts = {"h": jax.ShapeDtypeStruct((6, 5), jnp.float32)}
    msg = "h: dim 0 (batch=6) not divisible by mesh axis data*fsdp=4"
    with pytest.raises(ValueError, match=re.escape(msg)):
        sharding.check_divisible(acts, {"h": P("batch", "length")}, mesh)


# ---- batches ------------------------------------------------------------------------------


def _fake_mesh(process_of_device: np.ndarray):
    """A stand-in with .devices/.shape for data_shard_info; process_of_device [data,fsdp,tensor]."""
    devices = np.vectorize(lambda p: types.SimpleNamespace(process_index=int(p)), otypes=[object])(
        process_of_device
    )
    return types.SimpleNamespace(
        devices=devices, shape=dict(zip(sharding.MESH_AXES, devices.shape, strict=True))
    )


def test_data_shard_info():
    # 2 hosts x 4 devices, tensor within a host: each host loads its own half.
    m = _fake_mesh(np.array([0, 0, 0, 0, 1, 1, 1, 1]).reshape(1, 4, 2))
    assert sharding.data_shard_info(m, 0) == (0, 2) and sharding.data_shard_info(m, 1) == (1, 2)
    # 4 hosts, data=2 x fsdp=2: shard (data i, fsdp j) is host 2i+j.
    m = _fake_mesh(np.arange(4).reshape(2, 2, 1))
    assert [sharding.data_shard_info(m, p) for p in range(4)] == [(p, 4) for p in range(4)]
    # Tensor spans the 2 hosts: both hold replicas of every batch shard -> same data.
    m = _fake_mesh(np.array([0, 1] * 4).reshape(1, 4, 2))
    assert sharding.data_shard_info(m, 0) == sharding.data_shard_info(m, 1) == (0, 1)
    m = _fake_mesh(np.array([0, 1, 1, 0]).reshape(1, 4, 1))
    with pytest.raises(ValueError, match=r"process 0 holds non-contiguous batch shards \[0, 3\]"):
        sharding.data_shard_info(m, 0)


def test_shard_batch_single_device():
    mesh = sharding.make_mesh({})
    batch = {"tokens": np.arange(12).reshape(3, 4), "nested": {"w": np.ones(3, np.float32)}}
    out = sharding.shard_batch(batch, mesh)
    assert out["tokens"].sharding.spec == P(("data", "fsdp"))
    np.testing.assert_array_equal(sharding.to_host(out)["tokens"], batch["tokens"])
    with pytest.raises(ValueError, match=r"batch\['x'\]: local batch shape \(\)"):
        sharding.shard_batch({"x": np.float32(1.0)}, mesh)


# ---- 8 virtual devices --------------------------------------------------------------------

EIGHT_DEVICE_TINY = """
import jax, jax.numpy as jnp, numpy as np, flax.linen as nn
from jax.sharding import NamedSharding, PartitionSpec as P
from instructrl import sharding as S
from tests.unit.test_sharding import Tiny, TINY_SPECS, tiny_loss
assert jax.device_count() == 8

assert dict(S.make_mesh({"data": 2, "fsdp": -1, "tensor": 2}).shape) == dict(data=2, fsdp=2, tensor=2)
mesh8 = S.make_mesh({"tensor": -1})
assert dict(mesh8.shape) == dict(data=1, fsdp=1, tensor=8)
try:
    S.abstract_params_and_shardings(Tiny(), (np.zeros((1, 8), np.int32),), mesh8)
    raise AssertionError("expected a divisibility error")
except ValueError as e:
    assert str(e).startswith("params/o: dim 0 (heads=4) not divisible by mesh axis tensor=8"), e
mesh = S.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
model = Tiny()
key = jax.random.key(1)
dummy = np.zeros((1, 8), np.int32)
params = S.init_params_sharded(model, key, (dummy,), mesh)
_, shardings = S.abstract_params_and_shardings(model, (dummy,), mesh)

# Params are born sharded with the expected layouts and hold the same values as a plain init.
ref_params = nn.unbox(jax.jit(model.init)(key, dummy)["params"])
shard_shape = {"embed": (16, 8), "q": (8, 2, 4), "o": (2, 4, 8), "wi": (8, 16), "wo": (16, 8),
               "scale": (16,), "bias": (32,)}
for name, x in params.items():
    assert x.sharding.spec == TINY_SPECS[name], (name, x.sharding.spec)
    assert x.addressable_shards[0].data.shape == shard_shape[name], name
    np.testing.assert_allclose(np.asarray(x), np.asarray(ref_params[name]), rtol=1e-6)
host = S.to_host(params)
params2 = S.shard_params(host, shardings)
assert all(params2[k].sharding == shardings[k] for k in host)
rep = S.replicate(host, mesh)
assert rep["q"].sharding.spec == P() and rep["q"].addressable_shards[3].data.shape == (16, 4, 4)

# shard_batch: rows split over data*fsdp = 4 shards, replicated over tensor.
tokens = np.random.default_rng(0).integers(0, 32, (8, 12)).astype(np.int32)
batch = S.shard_batch({"tokens": tokens}, mesh)
g = batch["tokens"]
assert g.shape == (8, 12) and g.sharding.spec == P(("data", "fsdp"))
for shard in g.addressable_shards:
    np.testing.assert_array_equal(np.asarray(shard.data), tokens[shard.index])
    assert shard.data.shape == (2, 12)
np.testing.assert_array_equal(S.to_host(g), tokens)

# The constraints inside the model take effect under mesh_context.
def hidden(p, t):
    return nn.with_logical_constraint(model.apply({"params": p}, t), ("batch", "length", "act_vocab"))
with S.mesh_context(mesh):
    out = jax.jit(hidden)(params, g)
assert out.sharding.spec == P(("data", "fsdp"), None, "tensor"), out.sharding.spec

# Sharded forward + value_and_grad with explicit shardings == one device.
bs = S.batch_sharding(mesh)
fwd = jax.jit(lambda p, t: model.apply({"params": p}, t), in_shardings=(shardings, bs),
              out_shardings=NamedSharding(mesh, P(("data", "fsdp"), None, "tensor")))
vg = jax.jit(jax.value_and_grad(lambda p, t: tiny_loss(model, p, t)), in_shardings=(shardings, bs),
             out_shardings=(NamedSharding(mesh, P()), shardings))
with S.mesh_context(mesh):
    logits = fwd(params, g)
    loss, grads = vg(params, g)
assert all(grads[k].sharding == shardings[k] for k in grads)
dev0 = jax.devices()[0]
ref_p = jax.device_put(ref_params, dev0)
ref_logits = jax.jit(lambda p, t: model.apply({"params": p}, t))(ref_p, jax.device_put(tokens, dev0))
ref_loss, ref_grads = jax.jit(jax.value_and_grad(lambda p, t: tiny_loss(model, p, t)))(ref_p, tokens)
np.testing.assert_allclose(S.to_host(logits), np.asarray(ref_logits), rtol=1e-5, atol=1e-6)
np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-5)
for k in grads:
    np.testing.assert_allclose(S.to_host(grads[k]), np.asarray(ref_grads[k]), rtol=1e-5, atol=1e-6)
print("OK")
"""


def test_eight_devices_tiny_module():
    assert run_in_subprocess(EIGHT_DEVICE_TINY, num_devices=8).strip().endswith("OK")


EIGHT_DEVICE_TRANSFORMER = """
import jax, jax.numpy as jnp, numpy as np, flax.linen as nn
from jax.sharding import NamedSharding, PartitionSpec as P
from instructrl import sharding as S
from instructrl.models.transformer import ModelConfig, Transformer, positions_from_mask

CONFIGS = {
    "gpt2": ModelConfig(vocab_size=64, max_len=16, num_layers=1, d_model=32, num_heads=4, d_ff=64),
    "llama": ModelConfig(vocab_size=64, max_len=16, num_layers=1, d_model=32, num_heads=4, d_ff=64,
                         num_kv_heads=2, position="rope", norm="rmsnorm", mlp="swiglu",
                         use_bias=False, tie_embeddings=False),
}
mesh = S.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
bs = S.batch_sharding(mesh)
rng = np.random.default_rng(0)
tokens = rng.integers(0, 64, (4, 12)).astype(np.int32)
mask = np.ones((4, 12), np.int32)
mask[1, :5] = 0  # left padding
mask[3, :11] = 0
positions = np.asarray(positions_from_mask(mask))

# Masked next-token NLL; also returns the logits [B, T, V] so one program checks both.
def loss_fn(model, p, b):
    logits = model.apply({"params": p}, b["tokens"], b["positions"], b["mask"])
    logp = jax.nn.log_softmax(logits[:, :-1], -1)
    nll = -jnp.take_along_axis(logp, b["tokens"][:, 1:, None], -1)[..., 0]
    w = (b["mask"][:, 1:] > 0) & (b["mask"][:, :-1] > 0)
    return (nll * w).sum() / w.sum(), logits

for name, cfg in CONFIGS.items():
    model = Transformer(cfg)
    dummy = (np.zeros((1, 12), np.int32),) * 2 + (np.ones((1, 12), np.int32),)
    params = S.init_params_sharded(model, jax.random.key(0), dummy, mesh)
    shardings = jax.tree.map(lambda x: x.sharding, params)
    assert any(s.spec != P() for s in jax.tree.leaves(shardings))
    local = {"tokens": tokens, "positions": positions, "mask": mask}
    batch = S.shard_batch(local, mesh)
    vg = jax.value_and_grad(lambda p, b: loss_fn(model, p, b), has_aux=True)
    step = jax.jit(vg, in_shardings=(shardings, bs),
                   out_shardings=((NamedSharding(mesh, P()), bs), shardings))
    with S.mesh_context(mesh):
        (loss, logits), grads = step(params, batch)
    dev0 = jax.devices()[0]
    ref_p = jax.device_put(S.to_host(params), dev0)
    (ref_loss, ref_logits), ref_grads = jax.jit(vg)(ref_p, jax.device_put(local, dev0))
    np.testing.assert_allclose(S.to_host(logits), np.asarray(ref_logits), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-5)
    flat, _ = jax.tree_util.tree_flatten_with_path(S.to_host(grads))
    ref_flat = jax.tree.leaves(ref_grads)
    for (path, g), r in zip(flat, ref_flat, strict=True):
        err = f"{name}{jax.tree_util.keystr(path)}"
        np.testing.assert_allclose(g, np.asarray(r), rtol=1e-5, atol=1e-6, err_msg=err)
    print(name, "OK", float(loss))
"""


def test_eight_devices_transformer():
    out = run_in_subprocess(EIGHT_DEVICE_TRANSFORMER, num_devices=8)
    assert "gpt2 OK" in out and "llama OK" in out


# ---- 2 processes --------------------------------------------------------------------------

TWO_PROCESS = """
import numpy as np, jax, jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
from instructrl import sharding as S
from tests.unit.test_sharding import Tiny, tiny_loss
assert jax.process_count() == 2 and jax.device_count() == 4

full = np.arange(8 * 3, dtype=np.float32).reshape(8, 3)
weights = np.linspace(0.5, 2.0, 8 * 3, dtype=np.float32).reshape(8, 3)

# Usual layout: each process holds its own half of the global batch.
mesh = S.make_mesh({"data": 2, "fsdp": -1})
assert S.data_shard_info(mesh) == (PROCESS_ID, 2)
half = full[4 * PROCESS_ID : 4 * (PROCESS_ID + 1)]
g = S.shard_batch({"x": half, "w": weights[4 * PROCESS_ID : 4 * (PROCESS_ID + 1)]}, mesh)
assert g["x"].shape == (8, 3) and not g["x"].is_fully_addressable
rep = NamedSharding(mesh, P())
stats = jax.jit(lambda b: {"sum": b["x"].sum(), "mean": b["x"].mean(), "wsum": (b["x"] * b["w"]).sum(),
                           "row_sums": b["x"].sum(-1)}, out_shardings=rep)(g)
np.testing.assert_allclose(float(stats["sum"]), full.sum(), rtol=1e-6)
np.testing.assert_allclose(float(stats["mean"]), full.mean(), rtol=1e-6)
np.testing.assert_allclose(float(stats["wsum"]), (full * weights).sum(), rtol=1e-6)
np.testing.assert_allclose(np.asarray(stats["row_sums"]), full.sum(-1), rtol=1e-6)
np.testing.assert_array_equal(S.to_host(g["x"]), full)

# Tensor axis spanning the processes: both processes hold every batch shard and load the same rows.
d = sorted(jax.devices(), key=lambda d: (d.id))
by_proc = [[x for x in d if x.process_index == p] for p in range(2)]
mixed = [by_proc[0][0], by_proc[1][0], by_proc[0][1], by_proc[1][1]]
mesh2 = S.make_mesh({"fsdp": 2, "tensor": 2}, devices=mixed)
assert S.data_shard_info(mesh2) == (0, 1)
g2 = S.shard_batch({"x": full}, mesh2)
assert g2["x"].shape == (8, 3)
np.testing.assert_allclose(float(jax.jit(jnp.sum, out_shardings=NamedSharding(mesh2, P()))(g2["x"])), full.sum())

# Params born sharded across processes; a sharded grad step matches a local one-device reference.
mesh3 = S.make_mesh({"data": 1, "fsdp": 2, "tensor": 2})
model = Tiny()
dummy = np.zeros((1, 8), np.int32)
params = S.init_params_sharded(model, jax.random.key(3), (dummy,), mesh3)
_, shardings = S.abstract_params_and_shardings(model, (dummy,), mesh3)
tokens = np.random.default_rng(0).integers(0, 32, (4, 8)).astype(np.int32)
i0, n = S.data_shard_info(mesh3)
tb = S.shard_batch(tokens[i0 * 4 // n : (i0 + 1) * 4 // n], mesh3)
vg = jax.jit(jax.value_and_grad(lambda p, t: tiny_loss(model, p, t)),
             in_shardings=(shardings, S.batch_sharding(mesh3)), out_shardings=(NamedSharding(mesh3, P()), shardings))
with S.mesh_context(mesh3):
    loss, grads = vg(params, tb)
host_params, host_grads = S.to_host(params), S.to_host(grads)
local = jax.local_devices()[0]
ref_loss, ref_grads = jax.jit(jax.value_and_grad(lambda p, t: tiny_loss(model, p, t)))(
    jax.device_put(host_params, local), jax.device_put(tokens, local))
np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-5)
for k in ref_grads:
    np.testing.assert_allclose(host_grads[k], np.asarray(ref_grads[k]), rtol=1e-5, atol=1e-6)
print("OK", PROCESS_ID)
"""


def test_two_processes():
    outs = run_multiprocess(TWO_PROCESS, num_processes=2, devices_per_process=2)
    assert [o.strip().splitlines()[-1] for o in outs] == ["OK 0", "OK 1"]
