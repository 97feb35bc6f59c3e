r"""Ahead-of-time plan: per-device memory, FLOPs and step time of a config's stages on a mesh.

    python -m instructrl.plan --config=experiments/instructgpt_6b.py[:ARGS] \
        --mesh=data:1,fsdp:32,tensor:2 [--stage=sft|rm|ppo|NAME] [--chip=v4|v5e|v5p|h100|h200] \
        [--mfu=0.4] [--analytic | --compile] [--json] [--config.KEY=VALUE ...]

Builds each stage's compiled programs as its driver does (SFT/RM: the train_lib step via
jit_train_step; PPO: the rollout and the update of instructrl/rl/ppo.py with policy, reference,
value and reward model) on abstract arrays (jax.ShapeDtypeStruct with shardings; nothing is
allocated) and prints, per device: params, optimizer state, EMA and frozen models, batches,
activations/temporaries and the KV cache; FLOPs per step; step time at a stated MFU on a
chip; and whether the peak fits the chip's HBM (one chip = one JAX device).

Params, optimizer state, frozen models and batches are exact (shapes and shardings). The
temporaries come from one of two paths:
  compile   (default up to 16 devices) re-runs the command with N virtual CPU devices
            (XLA_FLAGS=--xla_force_host_platform_device_count=N), compiles the same sharded
            programs for CPU and reads compiled.memory_analysis(). XLA:CPU schedules without
            a memory limit (it may all-gather many layers' weights at once) and keeps some
            bf16 temporaries in f32: read its figure as an upper bound for a TPU. With N real
            devices attached it compiles for them instead.
  analytic  (--analytic; default above 16 devices, where a CPU compile is too slow) traces
            the programs against a jax.sharding.AbstractMesh and lowers them for TPU (no
            devices needed; every sharding must divide its dim) and estimates the
            temporaries from shapes (`activation_bytes`).
XLA's FLOP counts visit a loop body once (layer scan, decode loop, PPO minibatches), so step
times use the analytic model FLOPs: 2 per weight per token for each matmul (x3 with the
backward; rematerialisation not counted, as MFU does not) plus the attention products.

A stage's model is the model_config.json of its `init_from` (RM/value: `reward_from`) export
when that file exists, else `config.model`, or `config.reward_model` for the RM and value
network (defaulting to `config.model`).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import sys
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import AbstractMesh, AxisType, NamedSharding, PartitionSpec

from instructrl import cli, losses, sharding, train_lib
from instructrl import config as config_lib
from instructrl.costs import (
    CHIPS,
    GIB,
    activation_bytes,
    block_matmul_params,
    combine_passes,
    forward_flops,
    kv_cache_bytes,
    param_count,
    weight_bytes,
)
from instructrl.errors import ConfigError
from instructrl.models import ModelConfig, Transformer
from instructrl.rl import ppo

COMPILE_MAX_DEVICES = 16
_CHILD_ENV = "INSTRUCTRL_PLAN_DEVICES"  # marks the re-executed process


# ---- abstract arrays -----------------------------------------------------------------------


def device_bytes(tree: Any) -> int:
    """Bytes one device holds of a tree of ShapeDtypeStructs carrying shardings."""
    total = 0
    for x in jax.tree.leaves(tree):
        shape = x.shape if x.sharding is None else x.sharding.shard_shape(x.shape)
        total += math.prod(shape) * jnp.dtype(x.dtype).itemsize
    return total


def _with(tree: Any, shardings: Any) -> Any:
    to_sds = lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s)  # noqa: E731
    return jax.tree.map(to_sds, tree, shardings)


def _arrays(shapes: dict[str, tuple], sh: NamedSharding, dtype=jnp.int32) -> dict[str, Any]:
    return {k: jax.ShapeDtypeStruct(v, dtype, sharding=sh) for k, v in shapes.items()}


def _key(mesh) -> Any:
    key = jax.eval_shape(lambda: jax.random.key(0))
    return jax.ShapeDtypeStruct((), key.dtype, sharding=NamedSharding(mesh, PartitionSpec()))


def _params(model: Transformer, mesh, rules) -> Any:
    x = jax.ShapeDtypeStruct((1, min(8, model.config.max_len)), jnp.int32)
    abstract, shardings = sharding.abstract_params_and_shardings(model, (x, x, x), mesh, rules)
    return _with(abstract, shardings)


# ---- the programs of a stage ---------------------------------------------------------------


@dataclasses.dataclass
class Program:
    """One compiled program; bytes per device, FLOPs global per call."""

    name: str
    jitted: Any  # the jax.jit object
    args: tuple  # abstract arguments
    inputs: int  # bytes of batches on device besides the stage's resident state
    outputs: int  # bytes of new (not donated) outputs
    temp: int  # analytic activations + temporaries (KV cache and gradients included)
    flops: float  # analytic model FLOPs
    flops_nd: float  # the rule of thumb: 6·N per trained token, 2·N per forward-only token
    kv_cache: int = 0
    hbm_read: int = 0  # decode: bytes each device reads from HBM over all decode steps


@dataclasses.dataclass
class StagePlan:
    name: str
    kind: str
    params: dict[str, int]  # parameter count per model
    resident: dict[str, int]  # bytes per device held through the whole stage
    programs: list[Program]
    notes: list[str]
    iterations: int = 0


def model_configs(config: ml_collections.ConfigDict) -> dict[str, tuple[ModelConfig, str]]:
    """The models a config defines: {"policy": (ModelConfig, "lm"), "reward": (.., "scalar")}."""
    rm = config.get("reward_model") or config.model
    return {
        "policy": (ModelConfig.from_dict(config.model), "lm"),
        "reward": (ModelConfig.from_dict(rm), "scalar"),
    }


def _stage_model(config, section, fallback: str, key: str = "init_from") -> tuple[ModelConfig, str]:
    """(model config, where it came from) of the model a stage reads from `section[key]`."""
    path = os.path.join(section.get(key, ""), "model_config.json")
    if section.get(key) and os.path.isfile(path):
        with open(path) as f:
            d, source = json.load(f), path
    else:
        fallback = fallback if fallback in config else "model"
        d, source = config[fallback].to_dict(), f"config.{fallback}"
    if section.get("dropout", -1.0) >= 0:
        d["dropout"] = section.dropout
    return ModelConfig.from_dict(d), source


def _train_stage(config, name, mesh, rules, mshape, k: int) -> StagePlan:
    """SFT / pretraining (LM loss) or RM (K-wise loss): one train_lib step, as the drivers."""
    from instructrl.models.reward import rewards_of

    c, seq = config[name], config.data.seq_len
    rm = c.kind == "rm"
    mc, source = _stage_model(config, c, "reward_model" if rm else "model")
    model = Transformer(mc, head="scalar" if rm else "lm")
    params = _params(model, mesh, rules)
    optimizer = train_lib.make_optimizer(c.optimizer, 1000, name=f"{name}.optimizer")
    param_sh = jax.tree.map(lambda x: x.sharding, params)
    state, state_sh = train_lib.abstract_train_state(optimizer, params, param_sh, mesh)
    bs = sharding.batch_sharding(mesh)
    b, accum = c.batch_size, c.get("accum_steps", 1)

    def rm_loss(p, batch, rng):
        r = rewards_of(model, p, batch, deterministic=False, rng=rng)
        total, count = losses.reward_loss_sum(r, batch["pair_mask"])
        return total / jnp.maximum(count, 1.0), {"weight": count}

    def lm_loss(p, batch, rng):
        args = (batch["tokens"], batch["positions"], batch["mask"])
        logits = model.apply({"params": p}, *args, deterministic=False, rngs={"dropout": rng})
        total, count = losses.lm_loss_sum(logits, batch["targets"], batch["loss_mask"])
        return total / jnp.maximum(count, 1.0), {"weight": count}

    if rm:
        batch = _arrays({key: (b, k, seq) for key in ("tokens", "mask", "positions")}, bs)
        batch |= _arrays({"response_mask": (b, k)}, bs)
        batch |= _arrays({"pair_mask": (b, k, k)}, bs, jnp.float32)
        rows, note = b * k, f"batch {b} prompts x K={k} responses x {seq} tokens"
    else:
        keys = ("tokens", "targets", "loss_mask", "mask", "positions")
        batch = _arrays({key: (b, seq) for key in keys}, bs)
        rows, note = b, f"batch {b} x {seq} tokens"
    step = train_lib.make_train_step(rm_loss if rm else lm_loss, optimizer, accum_steps=accum)
    jitted = train_lib.jit_train_step(step, state_sh, bs).jitted
    # jit_train_step splits the state: (params, opt_state, extras) donated, (step, rng) kept.
    kept = (state.step, state.rng)
    args = ((state.params, state.opt_state, state.extras), kept, batch, _key(mesh))
    grads = device_bytes(params) * (2 if accum > 1 else 1)  # + the f32 accumulator
    act = activation_bytes(mc, rows // accum, seq, mshape, train=True, logits=not rm)
    head, tokens = model.head, rows * seq
    prog = Program(
        "train_step",
        jitted,
        args,
        inputs=device_bytes(batch),
        outputs=0,
        temp=combine_passes(act) + weight_bytes(mc, mshape) + grads,
        flops=3 * forward_flops(mc, tokens, seq, head),
        flops_nd=6.0 * param_count(mc, head) * tokens,
    )
    return StagePlan(
        name,
        c.kind,
        params={"reward model" if rm else "model": param_count(mc, head)},
        resident={
            "params": device_bytes(state.params),
            "optimizer state": device_bytes(state.opt_state),
        },
        programs=[prog],
        notes=[f"{note}, accum_steps {accum}; model from {source}"],
    )


def _ppo_stage(config, name, mesh, rules, mshape) -> StagePlan:
    """PPO / PPO-ptx: the rollout and the update programs of instructrl/rl/ppo.py."""
    from instructrl.rl.stage_config import ppo_config

    c = config[name]
    cfg = ppo_config(c, name, stop_token=1, pad_id=0, penalty_unit=1.0)
    pol_mc, pol_src = _stage_model(config, c, "model")
    rm_mc, rm_src = _stage_model(config, c, "reward_model", key="reward_from")
    separate_value = not cfg.value_head_on_policy  # else a head on the policy trunk
    policy, reward = Transformer(pol_mc), Transformer(rm_mc, head="scalar")
    models = ppo.PPOModels(policy, reward, reward if separate_value else None)
    optimizer = ppo.make_ppo_optimizer(cfg, c, max(c.num_iterations, 1), name=name)
    state, state_sh = ppo.abstract_ppo_state(models, cfg, optimizer, mesh, rules)
    ref, rm_params = _params(policy, mesh, rules), _params(reward, mesh, rules)

    bs, rep = sharding.batch_sharding(mesh), NamedSharding(mesh, PartitionSpec())
    b, p, n, t = cfg.batch_size, config.data.max_prompt_len, cfg.max_new_tokens, config.data.seq_len
    scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=rep)
    prompts = _arrays({"prompt_tokens": (b, p), "prompt_mask": (b, p)}, bs)
    ptx = _arrays({k: (cfg.ptx_batch_size, t) for k in ppo.PTX_KEYS}, bs) if cfg.ptx_coef else None
    params = ppo.RolloutParams(
        state.params["policy"], ref, state.params["value"], rm_params, scalar, scalar
    )
    rollout_args = (params, prompts["prompt_tokens"], prompts["prompt_mask"], _key(mesh), scalar)
    rollout_fn = ppo.make_rollout_fn(models, cfg, mesh=mesh, rules=rules)

    def arr(shape, dtype=jnp.float32):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=bs)

    ints = [arr((b, p), jnp.int32)] * 2 + [arr((b, n), jnp.int32)] * 2
    rollout = ppo.Rollout(*ints, *[arr((b, n))] * 4, *[arr((b,))] * 3, metrics={})
    update_fn = ppo.make_update_fn(
        models, cfg, optimizer, mesh=mesh, rules=rules, state_shardings=state_sh
    )
    donated = (state.params, state.opt_state, state.ema, state.kl)  # make_update_fn's split
    update_args = (donated, (state.step, state.rng), rollout, ptx, _key(mesh))

    # Rollout: sampling with the KV cache, then the scoring passes one after another.
    length = p + n - 1  # the sampler's cache; the scoring passes' sequence
    kv = kv_cache_bytes(pol_mc, b, length, mshape)
    prefill = activation_bytes(pol_mc, b, p, mshape, train=False, logits=False, kv_len=length)
    chunk = cfg.logprob_chunk  # > 0: policy/reference logits [rows, chunk, V] at a time
    scoring = activation_bytes(
        pol_mc, b, length, mshape, train=False, logits=True, logit_positions=chunk
    )
    scoring_weights = max(weight_bytes(pol_mc, mshape), weight_bytes(rm_mc, mshape))
    rollout_temp = max(kv + combine_passes(prefill), combine_passes(scoring) + scoring_weights)
    # Update, per minibatch: policy, value and ptx passes, all saved until one backward.
    mb = cfg.minibatch_size
    passes = [
        activation_bytes(pol_mc, mb, length, mshape, train=True, logits=True, logit_positions=chunk)
    ]
    weights = weight_bytes(pol_mc, mshape)
    if separate_value:
        passes.append(activation_bytes(rm_mc, mb, length, mshape, train=True, logits=False))
        weights += weight_bytes(rm_mc, mshape)
    if ptx is not None:
        rows = cfg.ptx_batch_size // cfg.num_minibatches
        passes.append(activation_bytes(pol_mc, rows, t, mshape, train=True, logits=True))
    update_temp = combine_passes(*passes) + weights + device_bytes(state.params)  # + gradients

    n_pol, n_rm, tokens = param_count(pol_mc), param_count(rm_mc, "scalar"), b * (p + n)
    n_val = n_rm if separate_value else pol_mc.d_model + 1
    value = forward_flops(rm_mc, b * length, length, "scalar") if separate_value else 0.0
    gen = forward_flops(pol_mc, b * p, length) + forward_flops(pol_mc, b * (n - 1), length)
    score = 2 * forward_flops(pol_mc, b * length, length) + value
    score += forward_flops(rm_mc, b * (p + n), p + n, "scalar")
    upd = forward_flops(pol_mc, b * length, length) + value
    upd += forward_flops(pol_mc, cfg.ptx_batch_size * t, t) if ptx else 0
    ptx_tokens = cfg.ptx_batch_size * t if ptx else 0
    # Each generated token reads every policy weight (all-gathered) and the device's cache.
    weights_read = block_matmul_params(pol_mc) * pol_mc.num_layers // mshape["tensor"]
    read = (n - 1) * (weights_read * jnp.dtype(pol_mc.param_dtype).itemsize + kv)
    opt = state.opt_state
    resident = {
        "policy params": device_bytes(state.params["policy"]),
        "policy optimizer": device_bytes(opt.get("policy", opt.get("joint"))),
        "policy EMA (f32)": device_bytes(state.ema),
        "reference (frozen)": device_bytes(ref),
        "value params": device_bytes(state.params["value"]),
        "value optimizer": device_bytes(opt.get("value", {})),
        "reward model (frozen)": device_bytes(rm_params),
    }
    programs = [
        Program(
            "rollout",
            rollout_fn.jitted,
            rollout_args,
            inputs=device_bytes((prompts, ptx)),  # the driver shards the whole batch first
            outputs=device_bytes(rollout),
            temp=rollout_temp,
            flops=gen + score,
            flops_nd=2.0 * (2 * n_pol + n_val + n_rm) * tokens,
            kv_cache=kv,
            hbm_read=read,
        ),
        Program(
            "update",
            update_fn.jitted,
            update_args,
            inputs=device_bytes((rollout, ptx)),
            outputs=0,
            temp=update_temp,
            flops=3 * cfg.num_epochs * upd,
            flops_nd=6.0 * cfg.num_epochs * ((n_pol + n_val) * tokens + n_pol * ptx_tokens),
        ),
    ]
    note = (
        f"{b} prompts x ({p} prompt + {n} response) tokens, minibatch {mb}, {cfg.num_epochs} "
        f"epoch(s), ptx {cfg.ptx_batch_size} x {t} tokens; policy from {pol_src}, RM and "
        f"value from {rm_src}" + (f"; log-probs {chunk} positions at a time" if chunk else "")
    )
    counts = {"policy": n_pol, "reference": n_pol, "value": n_val, "reward model": n_rm}
    return StagePlan(name, "ppo", counts, resident, programs, [note], c.num_iterations)


def build_stage(config, name, mesh, rules, mshape, *, responses: int = 9) -> StagePlan:
    """The StagePlan of stage `name`; `responses`: K of RM batches if data.max_responses is 0."""
    kind = config[name].kind
    if kind in ("sft", "pretrain", "rm"):
        k = config.data.get("max_responses", 0) or responses
        return _train_stage(config, name, mesh, rules, mshape, k)
    if kind == "ppo":
        return _ppo_stage(config, name, mesh, rules, mshape)
    raise ConfigError(f"config key '{name}.kind': plan supports sft, pretrain, rm, ppo; not {kind}")


# ---- lowering or compiling, and the plan ---------------------------------------------------


@contextlib.contextmanager
def _mesh_context(mesh, rules):
    if isinstance(mesh, AbstractMesh):  # jax.set_mesh needs devices; trace on the abstract mesh
        with jax.sharding.use_abstract_mesh(mesh), nn.logical_axis_rules(rules):
            yield
    else:
        with sharding.mesh_context(mesh, rules):
            yield


def run_program(prog: Program, mesh, rules, devices: int) -> dict[str, Any]:
    """Lowers `prog` for TPU on an abstract mesh (analytic temporaries), or compiles it on the
    mesh's devices (XLA's temporaries and outputs)."""
    with _mesh_context(mesh, rules):
        traced = prog.jitted.trace(*prog.args)
        if isinstance(mesh, AbstractMesh):
            cost = traced.lower(lowering_platforms=("tpu",)).cost_analysis()
            return {"temp": prog.temp, "outputs": prog.outputs, "flops_xla": cost.get("flops", 0.0)}
        compiled = traced.lower().compile()
    mem, cost = compiled.memory_analysis(), compiled.cost_analysis()
    return {
        "temp": int(mem.temp_size_in_bytes),
        "outputs": int(mem.output_size_in_bytes - mem.alias_size_in_bytes),
        "xla_argument_bytes": int(mem.argument_size_in_bytes),
        "flops_xla": float(cost.get("flops", 0.0)) * devices,  # per device -> global
    }


def plan(
    config: ml_collections.ConfigDict,
    mesh_shape: dict[str, int],
    stages: Sequence[str],
    *,
    chip: str = "v4",
    mfu: float = 0.4,
    mode: str = "analytic",
    responses: int = 9,
) -> dict[str, Any]:
    """The plan as a JSON-able dict: bytes per device, FLOPs global, seconds per step.

    mode "compile" needs jax to have exactly prod(mesh_shape) devices.
    """
    n = math.prod(mesh_shape.values())
    if mode == "compile":
        mesh = sharding.make_mesh(mesh_shape)
    else:
        sizes = tuple(mesh_shape[a] for a in sharding.MESH_AXES)
        mesh = AbstractMesh(sizes, sharding.MESH_AXES, axis_types=(AxisType.Auto,) * 3)
    rules = sharding.rules_from_config(config.get("rules"))
    hw = CHIPS[chip]
    hbm, rate = hw.hbm_gib * GIB, n * hw.peak_flops * mfu
    out = {"mesh": mesh_shape, "devices": n, "chip": {"key": chip, **dataclasses.asdict(hw)},
           "mfu": mfu, "mode": mode, "platform": jax.devices()[0].platform, "stages": []}  # fmt: skip
    for name in stages:
        sp = build_stage(config, name, mesh, rules, mesh_shape, responses=responses)
        resident = sum(sp.resident.values())
        progs = []
        for prog in sp.programs:
            r = run_program(prog, mesh, rules, n)
            r["peak"] = resident + prog.inputs + r["temp"] + r["outputs"]
            r["compute_seconds"] = r["seconds"] = prog.flops / rate
            if prog.hbm_read:
                r["hbm_bound_seconds"] = prog.hbm_read / hw.hbm_bytes_per_s
                r["seconds"] = max(r["seconds"], r["hbm_bound_seconds"])
            fields = ("name", "inputs", "kv_cache", "flops", "flops_nd")
            progs.append({f: getattr(prog, f) for f in fields} | {"temp_analytic": prog.temp} | r)
        peak, step = max(q["peak"] for q in progs), sum(q["seconds"] for q in progs)
        hours = step * sp.iterations / 3600 if sp.iterations else None
        out["stages"].append({
            "stage": sp.name, "kind": sp.kind, "params": sp.params, "resident": sp.resident,
            "programs": progs, "peak": peak, "fits": peak <= hbm, "hbm_fraction": peak / hbm,
            "step_seconds": step, "stage_hours": hours, "notes": sp.notes,
        })  # fmt: skip
    return out


def _row(label: str, values: Sequence[str]) -> str:
    return f"  {label:26s}" + "".join(f"{v:>12s}" for v in values)


def format_report(p: dict[str, Any], spec: str) -> str:
    """The plan as the text the command prints."""
    c, compiled = p["chip"], p["mode"] == "compile"
    mesh = " ".join(f"{a}={s}" for a, s in p["mesh"].items())
    temp_from = (
        f"XLA memory_analysis of the CPU compile of the same sharded program ({p['devices']} "
        f"virtual {p['platform']} devices; an upper bound for a TPU)"
        if compiled
        else "estimated from shapes (programs lowered for TPU on an AbstractMesh)"
    )
    lines = [
        f"plan {spec}: mesh {mesh} ({p['devices']} devices), {c['name']} "
        f"({c['hbm_gib']:g} GiB HBM, {c['peak_flops'] / 1e12:g} TFLOP/s bf16), MFU {p['mfu']:g}",
        "memory per device: params, optimizer state, frozen models, batches exact from the "
        f"shardings; activations/temp {temp_from}",
    ]
    gib = lambda b: f"{b / GIB:.2f}"  # noqa: E731
    for s in p["stages"]:
        progs = s["programs"]
        counts = ", ".join(f"{k} {v:.4g}" for k, v in s["params"].items())
        lines += ["", f"stage {s['stage']} (kind {s['kind']}): params {counts}"]
        lines += [f"  {note}" for note in s["notes"]]
        lines.append(_row("GiB per device", [q["name"] for q in progs]))
        lines += [_row(k, [gib(v)] * len(progs)) for k, v in s["resident"].items()]
        lines.append(_row("batch / rollout", [gib(q["inputs"]) for q in progs]))
        temp = [gib(q["temp"]) for q in progs]
        lines.append(_row("activations/temp" + (" (XLA)" if compiled else ""), temp))
        if compiled:
            lines.append(_row("  analytic estimate", [gib(q["temp_analytic"]) for q in progs]))
        kv = [gib(q["kv_cache"]) if q["kv_cache"] else "-" for q in progs]
        lines.append(_row("  incl. KV cache", kv))
        lines.append(_row("outputs (not donated)", [gib(q["outputs"]) for q in progs]))
        lines.append(_row("peak", [gib(q["peak"]) for q in progs]))
        verdict = "fits" if s["fits"] else "DOES NOT FIT"
        lines.append(f"  peak {gib(s['peak'])} GiB of {c['hbm_gib']:g} GiB "
                     f"({100 * s['hbm_fraction']:.0f}%): {verdict}")  # fmt: skip
        for q in progs:
            lines.append(
                f"  {q['name']} FLOPs: N·tokens rule {q['flops_nd']:.3e}, model (+attention) "
                f"{q['flops']:.3e}, XLA {q['flops_xla']:.3e} (loop bodies counted once); "
                f"{q['compute_seconds']:.2f} s at MFU {p['mfu']:g}"
            )
            if "hbm_bound_seconds" in q:
                lines.append("    decoding reads the weights and KV cache once per token: >= "
                             f"{q['hbm_bound_seconds']:.2f} s at HBM bandwidth")  # fmt: skip
        hours = f"; {s['stage_hours']:.1f} h for the stage's iterations" if s["stage_hours"] else ""
        lines.append(f"  step {s['step_seconds']:.2f} s{hours}")
    return "\n".join(lines)


# ---- command line --------------------------------------------------------------------------


def parse_mesh(text: str) -> dict[str, int]:
    """'data:8,fsdp:16,tensor:4' -> {"data": 8, "fsdp": 16, "tensor": 4}; missing axes are 1."""
    sizes: dict[str, int] = {}
    for item in text.split(","):
        axis, sep, size = item.strip().partition(":")
        ok = sep and axis in sharding.MESH_AXES and axis not in sizes
        if not (ok and size.isdigit() and int(size) >= 1):
            raise ConfigError(
                f"--mesh={text!r}: expected AXIS:SIZE items (AXIS one of data, fsdp, tensor, "
                "each at most once; SIZE >= 1), e.g. data:8,fsdp:16,tensor:4"
            )
        sizes[axis] = int(size)
    return {a: sizes.get(a, 1) for a in sharding.MESH_AXES}


def select_stages(config: ml_collections.ConfigDict, wanted: str | None) -> list[str]:
    """Stage names to plan: `wanted` is a stage name or a kind (sft, rm, ppo); None = all."""
    names = config_lib.stage_names(config)
    kinds = {"sft": ("sft", "pretrain"), "rm": ("rm",), "ppo": ("ppo",)}
    if wanted is None:
        return [n for n in names if config[n].kind in ("sft", "pretrain", "rm", "ppo")]
    if wanted in names:
        return [wanted]
    for n in names:
        if config[n].kind in kinds.get(wanted, ()):
            return [n]
    raise ConfigError(f"--stage={wanted}: no such stage or kind in config.stages ({', '.join(names)})")  # fmt: skip


def _reexec_with_devices(n: int, argv: Sequence[str]) -> None:
    """Restarts this command with n virtual CPU devices unless jax already has n devices."""
    if jax.device_count() == n:
        return
    if os.environ.get(_CHILD_ENV):
        raise ConfigError(f"--compile: wanted {n} devices, jax has {jax.device_count()}")
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]
    env = dict(os.environ, JAX_PLATFORMS="cpu", **{_CHILD_ENV: str(n)})
    env["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={n}"])
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, "-m", "instructrl.plan", *argv], env)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="python -m instructrl.plan",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", required=True, help="experiments/x.py[:ARGS]")
    parser.add_argument("--mesh", help="data:D,fsdp:F,tensor:T (default: config.mesh)")
    parser.add_argument("--stage", help="sft, rm, ppo or a stage name (default: all)")
    parser.add_argument("--chip", default="v4", choices=sorted(CHIPS))
    parser.add_argument("--mfu", type=float, default=0.4)
    parser.add_argument("--responses", type=int, default=9, help="RM K if data.max_responses=0")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--analytic", action="store_true", help="lower only; estimate temporaries")
    mode.add_argument("--compile", action="store_true", help="compile on N virtual CPU devices")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--verbose", action="store_true", help="print a failure's traceback")
    args, rest = parser.parse_known_args(argv)
    return cli.run(lambda: _plan(args, rest, argv), argv)


def _plan(args: argparse.Namespace, rest: list[str], argv: list[str]) -> int:
    try:
        if any(not r.startswith("--config.") for r in rest):
            bad = next(r for r in rest if not r.startswith("--config."))
            raise ConfigError(f"unknown flag '{bad}' (overrides look like --config.KEY=VALUE)")
        config = config_lib.load_config(args.config)
        config_lib.apply_overrides(config, [r[len("--config.") :] for r in rest])
        if args.mesh is not None:
            mesh = parse_mesh(args.mesh)
        else:
            mesh = {a: int(config.mesh.get(a, 1)) for a in sharding.MESH_AXES}
            if min(mesh.values()) < 1:
                raise ConfigError("config.mesh has a -1 axis (the device count): give --mesh")
        if not 0 < args.mfu <= 1:
            raise ConfigError(f"--mfu={args.mfu}: must be in (0, 1]")
        n = math.prod(mesh.values())
        compile_ = args.compile or (not args.analytic and n <= COMPILE_MAX_DEVICES)
        stages = select_stages(config, args.stage)
        if compile_:
            _reexec_with_devices(n, argv)
        mode = "compile" if compile_ else "analytic"
        report = plan(config, mesh, stages, chip=args.chip, mfu=args.mfu, mode=mode,
                      responses=args.responses)  # fmt: skip
    except ValueError as e:  # ConfigError, and sharding's "dim ... not divisible by mesh axis"
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(str(e)) from e
    print(json.dumps(report, indent=1) if args.json else format_report(report, args.config))
    return 0


if __name__ == "__main__":
    cli.command(main)
