"""PPO / PPO-ptx core of InstructGPT (docs/method.md §3): train state, update, compiled programs.

One PPO iteration is two compiled programs, and nothing crosses to the host inside either:

  rollout = rollout_fn(rollout_params(state, ref, rm, gain, bias), prompts, mask, rng, beta)
  state, metrics = update_fn(state, rollout, ptx_batch, rng)

`rollout` (rl/rollout.py) samples and scores a batch of episodes. `update` computes GAE
(gamma 1, lambda 0.95), optional reward whitening, advantage whitening, then runs every PPO
epoch and minibatch as nested `lax.scan`s: clipped surrogate + clipped value loss + ptx_coef x
the LM loss of a slice of the pretraining batch, all in one gradient per minibatch. After each
optimizer step the EMA of the policy params is updated; after the last one the KL controller
is updated from the rollout's KL (n = batch size).

Value function, two options (`value_head_on_policy`):
  False (paper): a separate scalar-head network initialised from the RM, with its own
        optimizer (`value_optimizer`, LR 9e-6). Its gradient comes from the value loss alone.
  True (predecessors): a zero-initialised head on the policy trunk, params["value"] =
        {"kernel" [D,1], "bias" [1]}, one optimizer over policy + head, loss
        pg + vf_coef (0.1) * vf (+ ptx). Values come from the policy's own forward pass.

Pretraining batch (PPO-ptx): the ppo pipeline's ptx_* fields without the prefix, {tokens,
targets, loss_mask, mask, positions} int32 [ptx_ratio * B, T]. Row r goes to minibatch
r % num_minibatches; every epoch reuses the same split (the paper runs 1 epoch).

A driver, in short (mesh/rules from the config; sft/rm params loaded onto their shardings):

  cfg = PPOConfig.from_config(config.ppo, extra_keys=DRIVER_KEYS, stop_token=tok.eos_id)
  models = PPOModels(policy=Transformer(mc), reward=Transformer(rm_mc, head="scalar"),
                     value=None if cfg.value_head_on_policy else Transformer(rm_mc, head="scalar"))
  opt = make_ppo_optimizer(cfg, config.ppo, num_iterations)
  abstract, state_sh = abstract_ppo_state(models, cfg, opt, mesh, rules)
  value = init_value_params(models, cfg, rm, gain, bias)  # the RM's normalisation folded in
  state = create_ppo_state(cfg, opt, sft, value, key, state_sh)
  rollout_fn = make_rollout_fn(models, cfg, mesh=mesh, rules=rules)
  update_fn = make_update_fn(models, cfg, opt, mesh=mesh, rules=rules, state_shardings=state_sh)
  for it in range(int(state.step), num_iterations):
      batch = shard_batch(next(data), mesh)
      ptx = {k: batch["ptx_" + k] for k in PTX_KEYS}
      rollout_key, _ = iteration_keys(state.rng, it)         # the update derives the other
      ro = rollout_fn(rollout_params(state, sft, rm, gain, bias), batch["prompt_tokens"],
                      batch["prompt_mask"], rollout_key, state.kl["beta"])
      state, metrics = update_fn(state, ro, ptx, state.rng)
      # log {**ro.metrics, **metrics} on logging steps; checkpoint state; export state.ema

Not here: data, checkpoints, logging (the stage driver instructrl/stages/ppo.py).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from instructrl import losses, sharding, train_lib
from instructrl.errors import ConfigError
from instructrl.rl import critic_free
from instructrl.rl.rollout import (
    PPOConfig,
    PPOModels,
    Rollout,
    RolloutParams,
    ScoreFn,
    default_ppo_config,
    jit_in_mesh,
    join_prompt_response,
    make_rollout_fn,
    model_param_shardings,
    policy_forward,
    rm_score_fn,
    rollout,
    rollout_params,
    rollout_params_shardings,
    value_forward,
)

__all__ = [
    "PPOConfig",
    "PPOModels",
    "PPOOptimizer",
    "PPOState",
    "Rollout",
    "RolloutParams",
    "ScoreFn",
    "abstract_ppo_state",
    "create_ppo_state",
    "default_ppo_config",
    "ema_decay_for_run",
    "init_ppo_state",
    "init_value_params",
    "iteration_keys",
    "join_prompt_response",
    "make_ppo_optimizer",
    "make_rollout_fn",
    "make_update_fn",
    "model_param_shardings",
    "policy_forward",
    "ppo_loss",
    "rm_score_fn",
    "rollout",
    "rollout_params",
    "rollout_params_shardings",
    "update",
    "value_forward",
]

PyTree = Any
PTX_KEYS = ("tokens", "targets", "loss_mask", "mask", "positions")
_ROLLOUT_STREAM, _UPDATE_STREAM = 0, 1


def iteration_keys(base: jax.Array, step: jax.Array | int) -> tuple[jax.Array, jax.Array]:
    """(rollout key, update key) of iteration `step`, from separate streams of the run's base
    key: sampling (token i uses fold_in(rollout key, i)) and the update's per-epoch
    permutations (split(update key, epochs)) never share a key."""
    rollout_key = jax.random.fold_in(jax.random.fold_in(base, _ROLLOUT_STREAM), step)
    update_key = jax.random.fold_in(jax.random.fold_in(base, _UPDATE_STREAM), step)
    return rollout_key, update_key


@flax.struct.dataclass
class PPOState:
    """The PPO train state; a pytree (checkpoint it whole).

    step: int32 [] iterations done. params: {"policy": LM params, "value": value network params
    or the value head on the policy trunk}. opt_state: {"joint": ...} (shared trunk) or
    {"policy": ..., "value": ...}. ema: float32 EMA of params["policy"] (the evaluated model).
    kl: losses.kl_controller_init state ({"beta", ...}). rng: the run's base key.
    """

    step: jax.Array
    params: dict[str, PyTree]
    opt_state: dict[str, PyTree]
    ema: PyTree
    kl: dict[str, jax.Array]
    rng: jax.Array


class PPOOptimizer(NamedTuple):
    """policy: over params["policy"] (separate value net) or the whole params dict (shared
    trunk). value: the value network's optimizer, None with a shared trunk. *_lr: schedules of
    the optimizer-update count, for metrics (may be None)."""

    policy: optax.GradientTransformation
    value: optax.GradientTransformation | None = None
    policy_lr: optax.Schedule | None = None
    value_lr: optax.Schedule | None = None


# ---------------------------------------------------------------------------- construction


PAPER_EMA_HORIZON = 125 / 4000  # 0.992 = 1 - 1/125 over the paper's 4,000 updates


def ema_decay_for_run(horizon: float, num_updates: int) -> float:
    """The EMA decay whose time constant 1 / (1 - d) is `horizon` x the run's optimizer
    updates: the paper's 0.992 at the paper's length (500 iterations x 8 minibatches,
    horizon 1/32). A fixed 0.992 over a 240-update run would leave 0.992^240 = 14.5% of the
    exported (EMA) policy at its initialisation; here that share is about exp(-1 / horizon)
    (1e-15 to 1e-14) at every length. horizon <= 0: no EMA (decay 0, the last policy is exported)."""
    if horizon <= 0:
        return 0.0
    return max(0.0, 1.0 - 1.0 / max(horizon * num_updates, 1.0))


def make_ppo_optimizer(
    cfg: PPOConfig, config: Mapping[str, Any], num_iterations: int, *, name: str = "ppo"
) -> PPOOptimizer:
    """AdamW optimizers (train_lib) from the ppo section's `optimizer` / `value_optimizer`:
    constant LR after a warm-up of `cfg.warmup_iterations` iterations from warmup_init x lr.

    num_iterations: planned PPO iterations (schedules count optimizer updates, i.e.
    iterations x cfg.updates_per_iteration).
    """
    steps = max(num_iterations, 1) * cfg.updates_per_iteration

    def build(section: str):
        sub = dict(default_ppo_config()[section])  # so a missing section is not train_lib's cosine
        sub.update(dict(config.get(section) or {}))
        if sub.get("warmup_steps", 0):
            raise ConfigError(
                f"config key '{name}.{section}.warmup_steps': set '{name}.warmup_iterations'"
            )
        sub["warmup_steps"] = cfg.warmup_iterations * cfg.updates_per_iteration
        where = f"{name}.{section}"
        return (
            train_lib.make_optimizer(sub, steps, name=where),
            train_lib.make_schedule(sub, steps, name=where),
        )

    policy, policy_lr = build("optimizer")
    if not cfg.separate_value_network:
        return PPOOptimizer(policy, None, policy_lr, None)
    value, value_lr = build("value_optimizer")
    return PPOOptimizer(policy, value, policy_lr, value_lr)


def init_value_params(
    models: PPOModels,
    cfg: PPOConfig,
    reward_params: PyTree | None = None,
    gain: float = 1.0,
    bias: float = 0.0,
) -> PyTree:
    """Initial value params: a zero head {"kernel" [D,1], "bias" [1]} on the policy trunk, or
    (paper) the reward model's params for a separate value network of the RM's architecture,
    with the RM's normalisation `score = gain * raw + bias` folded into its scalar head
    (kernel x gain, bias x gain + bias), as Stiennon et al. fold it into the RM itself.

    Why the fold: rewards are normalised scores, and with gamma = 1 a constant offset c in V
    shifts each GAE advantage by -c * lam^(T-t); advantage whitening removes the mean, not
    this position-dependent part, which would push against late tokens and the stop token.
    None when critic-free (no value function).
    """
    if cfg.critic_free:
        return None
    if cfg.value_head_on_policy:
        d = models.policy.config.d_model
        dtype = jnp.dtype(models.policy.config.param_dtype)
        return {"kernel": jnp.zeros((d, 1), dtype), "bias": jnp.zeros((1,), dtype)}
    if reward_params is None:
        raise ConfigError("init_value_params: a separate value network starts from the RM params")
    head = reward_params["head"]
    kernel, b = head["kernel"], head["bias"]
    folded = {
        "kernel": (kernel.astype(jnp.float32) * gain).astype(kernel.dtype),
        "bias": (b.astype(jnp.float32) * gain + bias).astype(b.dtype),
    }
    return {**reward_params, "head": folded}


def _opt_init(opt: PPOOptimizer, params: dict) -> dict:
    if opt.value is None:
        return {"joint": opt.policy.init(params)}
    return {"policy": opt.policy.init(params["policy"]), "value": opt.value.init(params["value"])}


def _opt_update(opt: PPOOptimizer, grads: dict, opt_state: dict, params: dict):
    grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)
    if opt.value is None:
        updates, joint = opt.policy.update(grads, opt_state["joint"], params)
        return optax.apply_updates(params, updates), {"joint": joint}
    out, states = {}, {}
    for key, tx in (("policy", opt.policy), ("value", opt.value)):
        updates, states[key] = tx.update(grads[key], opt_state[key], params[key])
        out[key] = optax.apply_updates(params[key], updates)
    return out, states


def init_ppo_state(
    cfg: PPOConfig, optimizer: PPOOptimizer, policy_params, value_params, rng: jax.Array
) -> PPOState:
    """Fresh state (jit it with out_shardings, or use create_ppo_state, to build it sharded)."""
    # Copies: the state is donated to the update, so it must not alias the caller's arrays
    # (often the reference / RM params themselves) nor itself (params vs EMA).
    copy = functools.partial(jax.tree.map, lambda x: jnp.array(x, copy=True))
    params = copy({"policy": policy_params, "value": value_params})
    if value_params is None:  # critic-free: no value function
        del params["value"]
    # float32 EMA: with bf16 params the 0.8% steps of a 0.992 EMA would round away.
    ema = jax.tree.map(lambda x: jnp.array(x, jnp.float32, copy=True), policy_params)
    return PPOState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=_opt_init(optimizer, params),
        ema=ema,
        kl=losses.kl_controller_init(cfg.kl_coef, cfg.adaptive_kl, cfg.kl_target, cfg.kl_horizon),
        rng=rng,
    )


def abstract_ppo_state(
    models: PPOModels,
    cfg: PPOConfig,
    optimizer: PPOOptimizer,
    mesh: Mesh,
    rules=sharding.DEFAULT_RULES,
) -> tuple[PPOState, PPOState]:
    """(abstract PPOState whose leaves carry .sharding, PPOState of NamedShardings).

    Policy/EMA and a separate value network follow the logical-axis rules; optimizer moments
    their parameter; the shared-trunk value head, counters, KL state and rng are replicated.
    The abstract state is what Checkpointer.restore_latest and jit need. Allocates nothing.
    """
    models.check(cfg)
    rep = NamedSharding(mesh, PartitionSpec())
    pol_abs, pol_sh = model_param_shardings(models.policy, mesh, rules)
    if cfg.critic_free:
        val_abs = val_sh = None
    elif cfg.value_head_on_policy:
        val_abs = jax.eval_shape(lambda: init_value_params(models, cfg))
        val_sh = jax.tree.map(lambda _: rep, val_abs)
    else:
        val_abs, val_sh = model_param_shardings(models.value, mesh, rules)
    abstract = jax.eval_shape(
        lambda p, v: init_ppo_state(cfg, optimizer, p, v, jax.random.key(0)), pol_abs, val_abs
    )
    params_sh = {"policy": pol_sh} if cfg.critic_free else {"policy": pol_sh, "value": val_sh}

    def opt_shardings(tx, state, param_sh):
        return optax.tree_utils.tree_map_params(
            tx, lambda _, s: s, state, param_sh, transform_non_params=lambda _: rep
        )

    if optimizer.value is None:
        opt_sh = {"joint": opt_shardings(optimizer.policy, abstract.opt_state["joint"], params_sh)}
    else:
        opt_sh = {
            key: opt_shardings(tx, abstract.opt_state[key], params_sh[key])
            for key, tx in (("policy", optimizer.policy), ("value", optimizer.value))
        }
    shardings = PPOState(
        step=rep,
        params=params_sh,
        opt_state=opt_sh,
        ema=pol_sh,
        kl=jax.tree.map(lambda _: rep, abstract.kl),
        rng=rep,
    )
    with_sh = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )
    return with_sh, shardings


def create_ppo_state(
    cfg: PPOConfig,
    optimizer: PPOOptimizer,
    policy_params,
    value_params,
    rng: jax.Array,
    shardings: PPOState | None = None,
) -> PPOState:
    """init_ppo_state compiled with `shardings` (from abstract_ppo_state): built in place."""
    fn = functools.partial(init_ppo_state, cfg, optimizer)
    return jax.jit(fn, out_shardings=shardings)(policy_params, value_params, rng)


# ---------------------------------------------------------------------------- update


def ppo_loss(
    models: PPOModels,
    cfg: PPOConfig,
    params: dict,
    mb: Mapping[str, jax.Array],
    ptx: Mapping[str, jax.Array] | None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Loss of one minibatch: pg + c_v * vf + ptx_coef * lm (differentiate w.r.t. params).

    mb: prompt_tokens, prompt_mask [b,P]; response_tokens, response_mask, old_logprobs,
    old_values, advantages, returns [b,N]. ptx: PTX_KEYS [k,T] or None (needed iff
    ptx_coef > 0). c_v = vf_coef with a shared trunk, else 1 (the value net has its own
    params and optimizer, so the sum's gradient splits exactly into the two losses').
    """
    seq = (mb["prompt_tokens"], mb["prompt_mask"], mb["response_tokens"], mb["response_mask"])
    head = params["value"] if cfg.value_head_on_policy else None
    logp, entropy, values = policy_forward(
        models.policy, params["policy"], *seq, cfg.temperature, value_head=head,
        chunk=cfg.logprob_chunk,
    )  # fmt: skip
    if values is None:
        values = value_forward(models.value, params["value"], *seq)
    mask = mb["response_mask"]
    pg_loss, pg_stats = losses.ppo_policy_loss(
        logp, mb["old_logprobs"], mb["advantages"], mask, cfg.cliprange
    )
    vf_loss, vf_stats = losses.ppo_value_loss(
        values, mb["old_values"], mb["returns"], mask, cfg.cliprange_value
    )
    vf_coef = cfg.vf_coef if cfg.value_head_on_policy else 1.0
    ptx_loss = critic_free.ptx_lm_loss(models, cfg, params, ptx)
    loss = pg_loss + vf_coef * vf_loss + cfg.ptx_coef * ptx_loss
    sg = jax.lax.stop_gradient
    log_ratio = jnp.where(mask != 0, sg(logp) - mb["old_logprobs"], 0.0)
    aux = {
        "policy_loss": pg_loss,
        "value_loss": vf_loss,
        "ptx_loss": ptx_loss,
        "entropy": sg(entropy),
        "log_ratio_absmax": jnp.max(jnp.abs(log_ratio)),
        "values_mean": losses.masked_mean(sg(values), mask),
        **pg_stats,
        **vf_stats,
    }
    return loss, aux


def _gae_data(cfg: PPOConfig, batch: Rollout) -> tuple[dict[str, jax.Array], dict]:
    """PPO: GAE on the (optionally whitened) rewards, whitened advantages; the arrays the
    minibatches are cut from, and the advantage / return metrics."""
    mask = batch.response_mask
    rewards = batch.rewards
    if cfg.whiten_rewards:
        rewards = losses.whiten(rewards, mask, shift_mean=False)
    adv, returns = losses.gae(rewards, batch.values, mask, cfg.gamma, cfg.lam)
    metrics = {
        "advantages_mean": losses.masked_mean(adv, mask),
        "returns_mean": losses.masked_mean(returns, mask),
        "value_explained_var_rollout": losses.explained_variance(batch.values, returns, mask),
    }
    if cfg.whiten_advantages:
        adv = losses.whiten(adv, mask)
    data = {
        "prompt_tokens": batch.prompt_tokens,
        "prompt_mask": batch.prompt_mask,
        "response_tokens": batch.response_tokens,
        "response_mask": mask,
        "old_logprobs": batch.logprobs,
        "old_values": batch.values,
        "advantages": adv,
        "returns": returns,
    }
    return data, metrics


def _minibatches(x: jax.Array, num: int) -> jax.Array:
    """[B, ...] -> [num, B/num, ...]; minibatch i holds rows i, i+num, ... so a batch sharded
    over its leading dim stays evenly sharded in every minibatch."""
    x = x.reshape(x.shape[0] // num, num, *x.shape[1:]).swapaxes(0, 1)
    return nn.with_logical_constraint(x, (None, "batch") + (None,) * (x.ndim - 2))


def update(
    models: PPOModels,
    cfg: PPOConfig,
    optimizer: PPOOptimizer,
    state: PPOState,
    batch: Rollout,
    ptx_batch: Mapping[str, jax.Array] | None,
    rng: jax.Array,
) -> tuple[PPOState, dict[str, jax.Array]]:
    """One PPO iteration's optimisation (pure; make_update_fn jits it, state donated).

    batch: the rollout [B, ...]. ptx_batch: PTX_KEYS int32 [ptx_ratio * B, T] or None when
    ptx_coef == 0. rng: the run's base key; the per-epoch permutations are drawn from
    iteration_keys(rng, state.step)[1] (the rollout draws from [0]).
    Returns the new state (step + 1) and metrics (f32 scalars; means over all minibatches
    unless named *_first: first minibatch of the first epoch, before any update).
    """
    b = batch.response_mask.shape[0]
    m = cfg.num_minibatches
    if b % m:
        raise ConfigError(f"config key 'ppo.num_minibatches' = {m} does not divide batch {b}")
    _, rng = iteration_keys(rng, state.step)
    if cfg.critic_free:  # group-relative advantages, no value function (rl/critic_free.py)
        data, extra = critic_free.update_data(cfg, batch)
        kl_coef = state.kl["beta"] if cfg.kl_penalty == "loss" else 0.0
        loss_fn = functools.partial(critic_free.critic_free_loss, models, cfg, kl_coef)
    else:
        data, extra = _gae_data(cfg, batch)
        loss_fn = functools.partial(ppo_loss, models, cfg)
    ptx_mbs = None
    if cfg.ptx_coef > 0:
        if ptx_batch is None:
            raise ConfigError("ppo update: ptx_coef > 0 needs a pretraining batch (ptx_batch)")
        missing = sorted(set(PTX_KEYS) - set(ptx_batch))
        rows = ptx_batch["tokens"].shape[0] if "tokens" in ptx_batch else 0
        if missing or rows % m or rows == 0:
            raise ConfigError(
                f"ppo update: ptx_batch needs keys {PTX_KEYS} (missing {missing}) and a positive "
                f"multiple of num_minibatches={m} rows, got {rows}"
            )
        ptx_mbs = {k: _minibatches(ptx_batch[k], m) for k in PTX_KEYS}

    loss_grad = jax.value_and_grad(loss_fn, has_aux=True)
    decay = cfg.ema_decay
    count0 = state.step * cfg.updates_per_iteration

    def minibatch_step(carry, xs):
        params, opt_state, ema, count = carry
        mb, ptx = xs
        (loss, aux), grads = loss_grad(params, mb, ptx)
        params, opt_state = _opt_update(optimizer, grads, opt_state, params)
        ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema, params["policy"])
        aux = {
            **aux,
            "loss": loss,
            "policy_grad_norm": optax.tree.norm(grads["policy"]),
        }
        if "value" in grads:
            aux["value_grad_norm"] = optax.tree.norm(grads["value"])
        if optimizer.policy_lr is not None:
            aux["lr"] = optimizer.policy_lr(count)
        if optimizer.value_lr is not None:
            aux["value_lr"] = optimizer.value_lr(count)
        aux = {k: jnp.asarray(v, jnp.float32) for k, v in aux.items()}
        return (params, opt_state, ema, count + 1), aux

    def epoch_step(carry, key):
        perm = jax.random.permutation(key, b)
        mbs = jax.tree.map(lambda x: _minibatches(jnp.take(x, perm, axis=0), m), data)
        return jax.lax.scan(minibatch_step, carry, (mbs, ptx_mbs))

    init = (state.params, state.opt_state, state.ema, count0)
    (params, opt_state, ema, _), stacked = jax.lax.scan(
        epoch_step, init, jax.random.split(rng, cfg.num_epochs)
    )
    metrics = {k: jnp.mean(v) for k, v in stacked.items()}
    metrics["log_ratio_absmax_first"] = stacked["log_ratio_absmax"][0, 0]
    metrics["log_ratio_absmax"] = jnp.max(stacked["log_ratio_absmax"])
    kl_batch = jnp.mean(batch.kl)
    kl_state = losses.kl_controller_update(state.kl, kl_batch, b)
    metrics.update(beta=kl_state["beta"], kl_batch=kl_batch, **extra)
    new_state = state.replace(
        step=state.step + 1, params=params, opt_state=opt_state, ema=ema, kl=kl_state
    )
    return new_state, {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}


# ---------------------------------------------------------------------------- compiled programs


def make_update_fn(
    models: PPOModels,
    cfg: PPOConfig,
    optimizer: PPOOptimizer,
    *,
    mesh: Mesh | None = None,
    rules=sharding.DEFAULT_RULES,
    state_shardings: PPOState | None = None,
) -> Callable[..., tuple[PPOState, dict[str, jax.Array]]]:
    """`update_fn(state, rollout, ptx_batch, rng) -> (state, metrics)`, state donated.

    step and rng are not donated, so `update_fn(state, rollout, ptx, state.rng)` is legal.
    With a mesh: state in `state_shardings` (from abstract_ppo_state), rollout and ptx batch
    over ("data", "fsdp"), metrics replicated. `.jitted` is the jax.jit object.
    """
    models.check(cfg)

    def split(s: PPOState):
        return (s.params, s.opt_state, s.ema, s.kl), (s.step, s.rng)

    def inner(donated, kept, batch, ptx_batch, rng):
        (params, opt_state, ema, kl), (step, state_rng) = donated, kept
        state = PPOState(step, params, opt_state, ema, kl, state_rng)
        new, metrics = update(models, cfg, optimizer, state, batch, ptx_batch, rng)
        return (*split(new), metrics)

    if mesh is None:
        jitted = jax.jit(inner, donate_argnums=0)
    else:
        if state_shardings is None:
            raise ConfigError("make_update_fn: a mesh needs state_shardings (abstract_ppo_state)")
        bs, rep = sharding.batch_sharding(mesh), NamedSharding(mesh, PartitionSpec())
        donated_sh, kept_sh = split(state_shardings)
        jitted = jax.jit(
            inner,
            in_shardings=(donated_sh, kept_sh, Rollout(*([bs] * 11), metrics=rep), bs, rep),
            out_shardings=(donated_sh, kept_sh, rep),
            donate_argnums=0,
        )
    call = jit_in_mesh(jitted, mesh, rules)

    def update_fn(state: PPOState, batch: Rollout, ptx_batch, rng: jax.Array):
        donated, (step, state_rng), metrics = call(*split(state), batch, ptx_batch, rng)
        return PPOState(step, *donated, state_rng), metrics

    update_fn.jitted = jitted
    return update_fn
