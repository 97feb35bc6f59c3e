"""Training core shared by every stage: optimizer, train state, train step, evaluation.

Everything here is a pure function of arrays (or builds one); nothing touches files, the
clock or signals. Host-side helpers for drivers (metrics files, progress, NaN guard,
SIGTERM) live in `instructrl/stages/common.py`; checkpoints in `instructrl/checkpoint.py`.

Train steps follow `(state, batch, rng) -> (state, metrics)`. `rng` is the run's base key
and the step folds in `state.step`, so a resumed run draws exactly the keys an
uninterrupted one would.

Gradient accumulation and token-weighted losses: `loss_fn(params, batch, rng)` returns
`(loss, aux)` with `aux` a dict of scalar metrics. If `aux` has a `"weight"` entry (e.g. the
number of target tokens), `loss` is read as a weighted mean over that many units and the
microbatches are combined as `sum_i w_i * loss_i / sum_i w_i` (same for gradients and the
other aux metrics). With `loss_i = token_sum_i / max(count_i, 1)` and `w_i = count_i` this
is exactly the full-batch token mean, whatever each microbatch's count. Without `"weight"`
microbatches count equally.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from instructrl.errors import ConfigError

PyTree = Any
LossFn = Callable[[PyTree, PyTree, jax.Array], tuple[jax.Array, Mapping[str, jax.Array]]]
StepFn = Callable[["TrainState", PyTree, jax.Array], tuple["TrainState", dict[str, jax.Array]]]

SCHEDULES = ("cosine", "constant")


def default_optimizer_config() -> ml_collections.ConfigDict:
    """AdamW defaults from the paper (SFT/RM: cosine to 10%, no warm-up; β2 = 0.95)."""
    c = ml_collections.ConfigDict()
    c.lr = 1e-5  # peak learning rate
    c.schedule = "cosine"  # "cosine" | "constant"
    c.warmup_steps = 0  # linear warm-up length (paper PPO: 10 iterations)
    c.warmup_init = 0.0  # warm-up starts at warmup_init * lr (paper PPO: 0.1)
    c.end_ratio = 0.1  # cosine reaches end_ratio * lr at total_steps
    c.b1 = 0.9
    c.b2 = 0.95
    # Not in the paper (method note): Adam's epsilon is optax's default, and gradients are
    # clipped at global norm 1 (below), GPT-3's practice; the paper states neither for SFT/RM/PPO.
    c.eps = 1e-8
    # Decoupled (AdamW) decay, applied to matrices only (ndim >= 2: kernels and embedding
    # tables); biases and norm scales are never decayed (GPT-2/3 practice).
    c.weight_decay = 0.0
    c.max_grad_norm = 1.0  # global-norm clipping of the (accumulated) gradient; 0 = off
    return c


def _resolve(cfg: Mapping[str, Any] | None, name: str) -> ml_collections.ConfigDict:
    """Defaults updated with `cfg`; bad keys/values raise ConfigError naming `name.key`."""
    out = default_optimizer_config()
    for key, value in dict(cfg or {}).items():
        if key not in out:
            raise ConfigError(f"{name}.{key}: unknown key (expected one of {sorted(out.keys())})")
        out[key] = value
    if out.schedule not in SCHEDULES:
        raise ConfigError(f"{name}.schedule: {out.schedule!r} is not one of {SCHEDULES}")
    if not out.lr > 0:
        raise ConfigError(f"{name}.lr: must be > 0, got {out.lr}")
    if out.warmup_steps < 0 or not 0.0 <= out.warmup_init <= 1.0:
        raise ConfigError(f"{name}.warmup_steps/warmup_init: need steps >= 0 and init in [0, 1]")
    if not 0.0 <= out.end_ratio <= 1.0:
        raise ConfigError(f"{name}.end_ratio: must be in [0, 1], got {out.end_ratio}")
    return out


def make_schedule(
    cfg: Mapping[str, Any] | None, total_steps: int, *, name: str = "optimizer"
) -> optax.Schedule:
    """Learning rate as a function of the update count t (0 = first update).

    Warm-up (t < W): lr * (init + (1 - init) * t / W). Then "constant": lr; "cosine":
    lr * (end + (1 - end) * (1 + cos(pi * p)) / 2) with p = (t - W) / (total_steps - W),
    so the rate reaches end_ratio * lr at t = total_steps (optax's convention).
    """
    c = _resolve(cfg, name)
    if total_steps < 1:
        raise ConfigError(f"{name}: total_steps must be >= 1, got {total_steps}")
    if c.schedule == "cosine" and c.warmup_steps >= total_steps:
        raise ConfigError(f"{name}.warmup_steps={c.warmup_steps} >= total_steps={total_steps}")
    peak, warm, init, end = float(c.lr), int(c.warmup_steps), float(c.warmup_init), c.end_ratio
    decay_steps = max(total_steps - warm, 1)

    def schedule(count: jax.Array) -> jax.Array:
        t = jnp.asarray(count, jnp.float32)
        warm_lr = peak * (init + (1.0 - init) * t / max(warm, 1))
        if c.schedule == "constant":
            after = jnp.full_like(t, peak)
        else:
            p = jnp.clip((t - warm) / decay_steps, 0.0, 1.0)
            after = peak * (end + (1.0 - end) * 0.5 * (1.0 + jnp.cos(jnp.pi * p)))
        return jnp.where(t < warm, warm_lr, after)

    return schedule


def _decay_mask(params: PyTree) -> PyTree:
    return jax.tree.map(lambda p: jnp.ndim(p) >= 2, params)


def make_optimizer(
    cfg: Mapping[str, Any] | None, total_steps: int, *, name: str = "optimizer"
) -> optax.GradientTransformation:
    """Global-norm clipping then AdamW with `make_schedule`; `name` prefixes config errors."""
    c = _resolve(cfg, name)
    adamw = optax.adamw(
        make_schedule(c, total_steps, name=name),
        b1=c.b1,
        b2=c.b2,
        eps=c.eps,
        weight_decay=c.weight_decay,
        mask=_decay_mask,
    )
    if c.max_grad_norm and c.max_grad_norm > 0:
        return optax.chain(optax.clip_by_global_norm(c.max_grad_norm), adamw)
    return adamw


@flax.struct.dataclass
class TrainState:
    """Everything a stage needs to resume bit-exactly; a pytree (jit/orbax friendly).

    step: int32 [] updates applied. rng: typed key [], the run's base key (never advanced;
    steps use fold_in(rng, step)). extras: dict of arrays owned by the stage (EMA params,
    KL coefficient, ...), sharded and donated with the state.
    """

    step: jax.Array
    params: PyTree
    opt_state: PyTree
    rng: jax.Array
    extras: dict[str, Any] = flax.struct.field(default_factory=dict)


def create_train_state(
    params: PyTree,
    optimizer: optax.GradientTransformation,
    rng: jax.Array,
    extras: Mapping[str, Any] | None = None,
) -> TrainState:
    """Fresh state at step 0. Jit it with out_shardings to build it directly sharded."""
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=optimizer.init(params),
        rng=rng,
        extras=dict(extras or {}),
    )


def abstract_train_state(
    optimizer: optax.GradientTransformation,
    abstract_params: PyTree,
    param_shardings: PyTree,
    mesh: jax.sharding.Mesh,
    *,
    extras: Mapping[str, Any] | None = None,
    extras_shardings: Mapping[str, Any] | None = None,
) -> tuple[TrainState, TrainState]:
    """(abstract state whose leaves carry .sharding, state of shardings); allocates nothing.

    Optimizer moments get their parameter's sharding (optax.tree_map_params); counters,
    step and rng are replicated. Extras are replicated unless `extras_shardings` is given.
    The abstract state is what `Checkpointer.restore_latest` and `jit` need.
    """
    replicated = NamedSharding(mesh, PartitionSpec())
    abstract = jax.eval_shape(
        lambda p, e: create_train_state(p, optimizer, jax.random.key(0), e),
        abstract_params,
        dict(extras or {}),
    )
    opt_shardings = optax.tree_utils.tree_map_params(
        optimizer,
        lambda _, s: s,
        abstract.opt_state,
        param_shardings,
        transform_non_params=lambda _: replicated,
    )
    if extras_shardings is None:
        extras_shardings = jax.tree.map(lambda _: replicated, abstract.extras)
    shardings = TrainState(
        step=replicated,
        params=param_shardings,
        opt_state=opt_shardings,
        rng=replicated,
        extras=dict(extras_shardings),
    )
    with_sharding = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )
    return with_sharding, shardings


def apply_gradients(
    state: TrainState, grads: PyTree, optimizer: optax.GradientTransformation
) -> TrainState:
    """One optimizer update; grads are cast to the param dtypes so the state keeps its types."""
    grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, state.params)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state)


def _split_microbatches(x: jax.Array, accum_steps: int) -> jax.Array:
    """[B, ...] -> [A, B/A, ...]; microbatch i holds rows i, i+A, ... so a batch sharded
    over its leading dim stays evenly sharded within every microbatch (no data movement)."""
    if x.ndim == 0 or x.shape[0] % accum_steps:
        raise ValueError(
            f"batch leaf of shape {x.shape}: leading dim not divisible by accum_steps={accum_steps}"
        )
    x = x.reshape(x.shape[0] // accum_steps, accum_steps, *x.shape[1:])
    return jnp.swapaxes(x, 0, 1)


def _loss_and_grads(loss_fn: LossFn, params: PyTree, batch: PyTree, rng: jax.Array):
    """-> (metrics incl. loss, weight or None if loss_fn gave none, grads)."""
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch, rng)
    if not isinstance(aux, Mapping):
        raise TypeError(f"loss_fn must return (loss, dict of scalars); aux is {type(aux)}")
    metrics = {"loss": loss, **aux}
    bad = [k for k, v in metrics.items() if jnp.ndim(v) != 0]
    if bad:
        raise ValueError(f"loss_fn metrics must be scalars; non-scalar: {bad}")
    metrics = {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}
    weight = metrics.pop("weight", None)
    if weight is not None:
        weight = jax.lax.stop_gradient(weight)
    return metrics, weight, grads


def make_train_step(
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    *,
    accum_steps: int = 1,
    lr_schedule: optax.Schedule | None = None,
) -> StepFn:
    """Builds `step(state, batch, rng) -> (state, metrics)` (pure; jit with jit_train_step).

    batch: pytree of arrays with a leading batch dim B (B % accum_steps == 0). Microbatch
    gradients are accumulated in float32 by a lax.scan, weighted as in the module docstring.
    metrics: loss and loss_fn's aux (weighted means), weight (summed, if loss_fn gives it),
    grad_norm (before clipping), param_norm (after the update), lr (if lr_schedule given).
    """
    if accum_steps < 1:
        raise ValueError(f"accum_steps must be >= 1, got {accum_steps}")

    def step(state: TrainState, batch: PyTree, rng: jax.Array):
        rng = jax.random.fold_in(rng, state.step)
        if accum_steps == 1:
            metrics, weight, grads = _loss_and_grads(loss_fn, state.params, batch, rng)
        else:
            micro = jax.tree.map(lambda x: _split_microbatches(x, accum_steps), batch)
            zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
            weighted = []  # set while tracing the body: did loss_fn report a weight?

            def body(grad_sum, xs):
                index, mb = xs
                m, w, g = _loss_and_grads(loss_fn, state.params, mb, jax.random.fold_in(rng, index))
                weighted.append(w is not None)
                w = jnp.ones((), jnp.float32) if w is None else w
                grad_sum = jax.tree.map(lambda s, gi: s + w * gi.astype(jnp.float32), grad_sum, g)
                return grad_sum, (m, w)

            grad_sum, (stacked, weights) = jax.lax.scan(
                body, zeros, (jnp.arange(accum_steps), micro)
            )
            total = weights.sum()
            # An all-empty batch (total weight 0) gives zero gradients, not 0/0.
            denom = jnp.where(total > 0, total, 1.0)
            grads = jax.tree.map(lambda g: g / denom, grad_sum)
            metrics = {k: (weights * v).sum() / denom for k, v in stacked.items()}
            weight = total if weighted[0] else None
        new_state = apply_gradients(state, grads, optimizer)
        metrics["grad_norm"] = optax.tree.norm(grads)
        metrics["param_norm"] = optax.tree.norm(new_state.params)
        if weight is not None:
            metrics["weight"] = weight
        if lr_schedule is not None:
            metrics["lr"] = jnp.asarray(lr_schedule(state.step), jnp.float32)
        return new_state, metrics

    return step


def jit_train_step(
    step_fn: StepFn,
    state_shardings: TrainState,
    batch_sharding: Any,
    *,
    rng_sharding: Any = None,
) -> StepFn:
    """jax.jit of `step_fn` with explicit shardings; params, opt_state and extras donated.

    step and rng are not donated, so `train_step(state, batch, state.rng)` is legal (XLA
    rejects a buffer passed both donated and not). Compiles once per batch shape/dtype.
    batch_sharding: a Sharding for every batch leaf (or a matching pytree). Metrics come
    back replicated. The jitted inner function is `train_step.jitted` (for .lower()).
    """
    mesh = getattr(batch_sharding, "mesh", None)
    replicated = NamedSharding(mesh, PartitionSpec()) if mesh is not None else None
    if rng_sharding is None:
        rng_sharding = replicated

    def split(s: TrainState):
        return (s.params, s.opt_state, s.extras), (s.step, s.rng)

    def join(donated, kept) -> TrainState:
        (params, opt_state, extras), (step, rng) = donated, kept
        return TrainState(step=step, params=params, opt_state=opt_state, rng=rng, extras=extras)

    def inner(donated, kept, batch, rng):
        new_state, metrics = step_fn(join(donated, kept), batch, rng)
        return (*split(new_state), metrics)

    donated_sh, kept_sh = split(state_shardings)
    jitted = jax.jit(
        inner,
        in_shardings=(donated_sh, kept_sh, batch_sharding, rng_sharding),
        out_shardings=(donated_sh, kept_sh, replicated),
        donate_argnums=0,
    )

    def train_step(state: TrainState, batch: PyTree, rng: jax.Array):
        donated, kept, metrics = jitted(*split(state), batch, rng)
        return join(donated, kept), metrics

    train_step.jitted = jitted
    return train_step


def evaluate(
    eval_fn: Callable[[PyTree, PyTree], Mapping[str, jax.Array]],
    params: PyTree,
    batches: Iterable[PyTree],
) -> dict[str, float]:
    """Weighted means of eval_fn's scalar metrics over `batches` (one host fetch at the end).

    eval_fn(params, batch) -> dict of scalars, optionally with "weight" (e.g. real tokens or
    examples in the batch; padding batches give 0); without it batches count equally.
    """
    sums: dict[str, jax.Array] | None = None
    total = 0.0
    for i, batch in enumerate(batches):
        metrics = dict(eval_fn(params, batch))
        w = metrics.pop("weight", 1.0)
        if sums is None:
            sums = {k: w * v for k, v in metrics.items()}
        elif set(metrics) != set(sums):
            raise ValueError(f"evaluate: batch {i} metrics {sorted(metrics)} != {sorted(sums)}")
        else:
            sums = {k: sums[k] + w * v for k, v in metrics.items()}
        total = total + w
    if sums is None:
        raise ValueError("evaluate: no batches")
    sums, total = jax.device_get((sums, total))
    if not float(total) > 0:
        raise ValueError(f"evaluate: total weight is {float(total)}")
    return {k: float(np.asarray(v) / total) for k, v in sums.items()}


def count_params(params: PyTree) -> int:
    """Number of scalars in a params tree (works on abstract trees too)."""
    return sum(math.prod(x.shape) for x in jax.tree.leaves(params))
