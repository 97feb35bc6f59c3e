"""Device mesh, logical-axis rules and helpers that place params and batches on the mesh.

The mesh always has axes ("data", "fsdp", "tensor"). Layers name their axes logically
(instructrl/models); DEFAULT_RULES (or `config.rules`) map those names to mesh axes:

  params       vocab, heads, kv_heads, mlp -> tensor   Megatron tensor parallelism: q/k/v and
                                                       MLP-in are column-parallel, attention-out
                                                       and MLP-out row-parallel, embedding and
                                                       logits vocab-parallel.
               embed -> fsdp                           ZeRO-3: every weight's d_model dim is
                                                       split over fsdp; XLA all-gathers it just
                                                       before use and reduce-scatters its grad.
               head_dim, norm -> replicated
  activations  batch -> (data, fsdp)                   fsdp is data parallelism for activations.
               act_heads, act_mlp, act_vocab -> tensor the per-head / hidden / logit activations
                                                       live where their weights live.
               act_embed, length -> replicated         the residual stream is whole on each tensor
                                                       shard (all-reduce after row-parallel
                                                       matmuls; no sequence parallelism).

Rules are an ordered tuple of (logical name, mesh axes); flax assigns each mesh axis at most
once per array, first matching rule first.

jax 0.10: the mesh is put in context with `jax.set_mesh(mesh)` (`mesh_context` below). The old
`with mesh:` is deprecated and does NOT set the abstract mesh, so flax's
`nn.with_logical_constraint` would silently do nothing under it. `jax.make_mesh` defaults to
Explicit axis types; we build meshes with Auto axes (GSPMD propagation), which is what Linen's
logical constraints are written for.

Not here: checkpoint resharding (instructrl/checkpoint.py), data loading (instructrl/data/).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

MeshAxes = str | tuple[str, ...] | None
Rules = tuple[tuple[str, MeshAxes], ...]

DEFAULT_RULES: Rules = (
    # activations
    ("batch", BATCH_AXES),
    ("length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    # params
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("norm", None),
)


# ---- mesh and rules -----------------------------------------------------------------------


def make_mesh(shape: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Mesh with axes ("data", "fsdp", "tensor") over all (global) devices or `devices`.

    shape: e.g. config.mesh = {data: 1, fsdp: -1, tensor: 2}; a missing axis is 1, one axis
    may be -1 ("the rest"). The sizes must multiply to the device count exactly.
    """
    if hasattr(shape, "to_dict"):  # ml_collections.ConfigDict
        shape = shape.to_dict()
    unknown = sorted(set(shape) - set(MESH_AXES))
    if unknown:
        raise ValueError(f"mesh.{unknown[0]}: unknown mesh axis (expected {MESH_AXES})")
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    sizes = {a: int(shape.get(a, 1)) for a in MESH_AXES}
    for a, s in sizes.items():
        if s == 0 or s < -1:
            raise ValueError(f"mesh.{a}={s}: must be a positive size or -1")
    rest = [a for a, s in sizes.items() if s == -1]
    if len(rest) > 1:
        raise ValueError(f"mesh.{rest[1]}=-1: only one axis may be -1 (mesh.{rest[0]} is too)")
    if rest:
        known = math.prod(s for s in sizes.values() if s != -1)
        if n % known:
            raise ValueError(
                f"mesh.{rest[0]}=-1: {n} devices not divisible by the other axes' product {known}"
            )
        sizes[rest[0]] = n // known
    if math.prod(sizes.values()) != n:
        desc = " * ".join(f"mesh.{a}={s}" for a, s in sizes.items())
        raise ValueError(f"{desc} = {math.prod(sizes.values())} != {n} devices")
    return jax.make_mesh(
        tuple(sizes.values()), MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices
    )


def _canonical_axes(value: Any, where: str) -> MeshAxes:
    if value is None or (isinstance(value, str) and value.lower() == "none"):
        return None
    axes = (value,) if isinstance(value, str) else tuple(value)
    for a in axes:
        if a not in MESH_AXES:
            raise ValueError(f"{where}: {a!r} is not a mesh axis (expected one of {MESH_AXES})")
    if len(axes) == 1:
        return axes[0]
    return axes or None


def rules_from_config(rules: Any = None) -> Rules:
    """Logical-axis rules from config.rules.

    None -> DEFAULT_RULES. A mapping {logical name: mesh axes} overrides those names in
    DEFAULT_RULES (names must already exist there, so a typo cannot go unnoticed; mesh axes may
    be None/"none", an axis name or a list of names). A sequence of (name, axes) pairs replaces
    the rules entirely (use this to add new logical names).
    """
    if rules is None:
        return DEFAULT_RULES
    if hasattr(rules, "to_dict"):
        rules = rules.to_dict()
    if isinstance(rules, Mapping):
        known = dict(DEFAULT_RULES)
        for name in rules:
            if name not in known:
                raise ValueError(f"rules.{name}: unknown logical axis (known: {', '.join(known)})")
        return tuple(
            (name, _canonical_axes(rules[name], f"rules.{name}") if name in rules else axes)
            for name, axes in DEFAULT_RULES
        )
    out = []
    for i, pair in enumerate(rules):
        if len(pair) != 2 or not isinstance(pair[0], str):
            raise ValueError(f"rules[{i}]: expected a (logical name, mesh axes) pair, got {pair!r}")
        out.append((pair[0], _canonical_axes(pair[1], f"rules[{i}]")))
    return tuple(out)


@contextlib.contextmanager
def mesh_context(mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Iterator[None]:
    """`jax.set_mesh(mesh)` + `nn.logical_axis_rules(rules)`: trace jitted steps inside this.

    Both are read at trace time, so a jitted function must be first called (traced) inside.
    """
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        yield


def logical_to_mesh_sharding(logical_specs: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Any:
    """Tree of logical PartitionSpecs -> tree of NamedShardings on `mesh`."""
    return nn.logical_to_mesh_sharding(logical_specs, mesh, rules)


def _axes_size(mesh: Mesh, axes: MeshAxes) -> tuple[str, int]:
    names = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    return "*".join(names), math.prod(mesh.shape[a] for a in names)


def check_divisible(
    abstract: Any, logical_specs: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES, prefix: str = ""
) -> None:
    """Raises ValueError naming the first array dim that its mesh axes do not divide.

    abstract: tree of arrays/ShapeDtypeStructs; logical_specs: matching tree of PartitionSpecs
    of logical names (nn.get_partition_spec).
    """
    specs = jax.tree.leaves(logical_specs, is_leaf=lambda x: isinstance(x, PartitionSpec))
    leaves = jax.tree_util.tree_flatten_with_path(abstract)[0]
    if len(specs) != len(leaves):
        raise ValueError(f"check_divisible: {len(leaves)} arrays but {len(specs)} specs")
    for (path, x), spec in zip(leaves, specs, strict=True):
        mesh_spec = nn.logical_to_mesh_axes(spec, rules)
        for dim, (logical, axes) in enumerate(zip(spec, mesh_spec, strict=False)):
            axes_name, size = _axes_size(mesh, axes)
            if x.shape[dim] % size:
                name = prefix + jax.tree_util.keystr(path, simple=True, separator="/")
                raise ValueError(
                    f"{name}: dim {dim} ({logical}={x.shape[dim]}) not divisible by mesh axis "
                    f"{axes_name}={size} (change mesh or config.rules.{logical})"
                )


# ---- params -------------------------------------------------------------------------------


def abstract_params_and_shardings(
    model: nn.Module,
    init_args: Sequence[Any],
    mesh: Mesh,
    rules: Rules = DEFAULT_RULES,
    *,
    init_kwargs: Mapping[str, Any] | None = None,
) -> tuple[Any, Any]:
    """(params as ShapeDtypeStructs, matching NamedShardings) via jax.eval_shape; no allocation.

    init_args: positional args of `model.init` after the rng (arrays or ShapeDtypeStructs).
    Params without logical names are replicated. Raises if a mesh axis does not divide its dim.
    """
    kwargs = dict(init_kwargs or {})
    boxed = jax.eval_shape(
        lambda rng, *args: model.init(rng, *args, **kwargs)["params"],
        jax.random.key(0),
        *init_args,
    )
    specs = nn.get_partition_spec(boxed)
    abstract = nn.unbox(boxed)
    check_divisible(abstract, specs, mesh, rules, prefix="params/")
    return abstract, logical_to_mesh_sharding(specs, mesh, rules)


def init_params_sharded(
    model: nn.Module,
    rng: jax.Array,
    init_args: Sequence[Any],
    mesh: Mesh,
    rules: Rules = DEFAULT_RULES,
    *,
    init_kwargs: Mapping[str, Any] | None = None,
) -> Any:
    """Initialises params directly into their shardings (never whole on one device).

    init_args must be small host-side arrays (e.g. a [1, T] dummy batch): they and the rng are
    baked into the init program, so every process may pass the same values.
    """
    _, shardings = abstract_params_and_shardings(
        model, init_args, mesh, rules, init_kwargs=init_kwargs
    )
    kwargs = dict(init_kwargs or {})
    args = [np.asarray(a) for a in init_args]
    typed_key = jnp.issubdtype(rng.dtype, jax.dtypes.prng_key)
    key_data = np.asarray(jax.random.key_data(rng) if typed_key else rng)
    impl = jax.random.key_impl(rng) if typed_key else None

    def init():
        key = jax.random.wrap_key_data(key_data, impl=impl) if typed_key else key_data
        return nn.unbox(model.init(key, *args, **kwargs)["params"])

    with mesh_context(mesh, rules):
        return jax.jit(init, out_shardings=shardings)()


def shard_params(params: Any, shardings: Any) -> Any:
    """Places a tree of host/device arrays (identical on every process) onto `shardings`."""
    return jax.device_put(params, shardings)


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Copies a tree (identical on every process) to every device of `mesh`."""
    return jax.device_put(tree, NamedSharding(mesh, PartitionSpec()))


# ---- batches ------------------------------------------------------------------------------


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dim split over ("data", "fsdp"), other dims whole."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def data_shard_info(mesh: Mesh, process_index: int | None = None) -> tuple[int, int]:
    """(index, count): which slice of the global batch this process must load, of how many.

    Equals (process_index, process_count) on the usual meshes; differs when two processes hold
    replicas of the same batch shards (e.g. a tensor axis spanning hosts), which then must
    load the same data. process_index defaults to jax.process_index().
    """
    devices = mesh.devices.reshape(-1, mesh.shape["tensor"])  # row = batch shard
    held: dict[int, set[int]] = {}
    for shard, row in enumerate(devices):
        for d in row:
            held.setdefault(d.process_index, set()).add(shard)
    ranges = {}
    for p, shards in held.items():
        lo, hi = min(shards), max(shards) + 1
        if hi - lo != len(shards):
            raise ValueError(
                f"mesh: process {p} holds non-contiguous batch shards {sorted(shards)}"
            )
        ranges[p] = (lo, hi)
    width = {hi - lo for lo, hi in ranges.values()}
    starts = {lo for lo, _ in ranges.values()}
    if len(width) != 1 or any(lo % next(iter(width)) for lo in starts):
        raise ValueError(f"mesh: processes hold uneven batch shards {sorted(ranges.values())}")
    lo, hi = ranges[jax.process_index() if process_index is None else process_index]
    return lo // (hi - lo), devices.shape[0] // (hi - lo)


def shard_batch(local_batch: Any, mesh: Mesh) -> Any:
    """Tree of process-local numpy arrays [b, ...] -> global jax.Arrays [b * count, ...].

    Each process passes its own slice (see data_shard_info for which); count is the number of
    distinct slices, usually jax.process_count().
    """
    sharding = batch_sharding(mesh)
    _, count = data_shard_info(mesh)
    local_shards = mesh.shape["data"] * mesh.shape["fsdp"] // count

    def put(path, x):
        x = np.asarray(x)
        if x.ndim == 0 or x.shape[0] % local_shards:
            raise ValueError(
                f"batch{jax.tree_util.keystr(path)}: local batch shape {x.shape} not divisible "
                f"into the {local_shards} batch shards (mesh data*fsdp) of this process"
            )
        global_shape = (x.shape[0] * count, *x.shape[1:])
        return jax.make_array_from_process_local_data(sharding, x, global_shape)

    return jax.tree_util.tree_map_with_path(put, local_batch)


def to_host(tree: Any) -> Any:
    """Tree of (possibly multi-process) jax.Arrays -> numpy with the global value.

    Collective when any array spans processes: every process must call it.
    """

    def get(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(jax.device_get(x))

    return jax.tree.map(get, tree)
