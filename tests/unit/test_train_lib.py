"""Tests for instructrl/train_lib.py and instructrl/stages/common.py."""

from __future__ import annotations

import io
import json
import math
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from instructrl import train_lib
from instructrl.stages import common

# ---------------------------------------------------------------- optimizer / schedule


def naive_lr(t, *, peak, total, schedule, warm=0, init=0.0, end=0.1):
    if t < warm:
        return peak * (init + (1 - init) * t / warm)
    if schedule == "constant":
        return peak
    p = min((t - warm) / (total - warm), 1.0)
    return peak * (end + (1 - end) * 0.5 * (1 + math.cos(math.pi * p)))


@pytest.mark.parametrize(
    "cfg",
    [
        {"schedule": "cosine"},
        {"schedule": "cosine", "warmup_steps": 10},
        {"schedule": "cosine", "warmup_steps": 10, "warmup_init": 0.1, "end_ratio": 0.0},
        {"schedule": "constant", "warmup_steps": 10, "warmup_init": 0.1},
        {"schedule": "constant"},
    ],
)
def test_schedule_matches_naive(cfg):
    total, peak = 100, 3e-4
    sched = train_lib.make_schedule({"lr": peak, **cfg}, total)
    for t in [0, 1, 5, 9, 10, 11, 50, 99, 100, 150]:
        want = naive_lr(
            t,
            peak=peak,
            total=total,
            schedule=cfg["schedule"],
            warm=cfg.get("warmup_steps", 0),
            init=cfg.get("warmup_init", 0.0),
            end=cfg.get("end_ratio", 0.1),
        )
        np.testing.assert_allclose(
            float(sched(t)), want, rtol=1e-5, atol=1e-6 * peak, err_msg=f"t={t}"
        )


def test_schedule_landmarks():
    peak = 1.0
    cos = train_lib.make_schedule({"lr": peak}, 100)  # paper SFT/RM: no warm-up, to 10%
    assert float(cos(0)) == pytest.approx(1.0)
    assert float(cos(100)) == pytest.approx(0.1)
    assert float(cos(50)) == pytest.approx(0.55)
    ppo = train_lib.make_schedule(
        {"lr": peak, "schedule": "constant", "warmup_steps": 10, "warmup_init": 0.1}, 100
    )
    assert float(ppo(0)) == pytest.approx(0.1)
    assert float(ppo(10)) == pytest.approx(1.0)
    assert float(ppo(99)) == pytest.approx(1.0)


def test_optimizer_config_errors():
    with pytest.raises(ValueError, match=r"sft\.optimizer\.lrr: unknown key"):
        train_lib.make_optimizer({"lrr": 1.0}, 10, name="sft.optimizer")
    with pytest.raises(ValueError, match=r"optimizer\.schedule"):
        train_lib.make_optimizer({"schedule": "linear"}, 10)
    with pytest.raises(ValueError, match=r"warmup_steps=10 >= total_steps=10"):
        train_lib.make_optimizer({"warmup_steps": 10}, 10)


def _tree_get(tree, key):
    return optax.tree.get(tree, key)


def test_adam_defaults_and_clipping():
    cfg = train_lib.default_optimizer_config()
    assert (cfg.b1, cfg.b2) == (0.9, 0.95)
    params = {"w": jnp.zeros((3, 4)), "b": jnp.zeros(4)}
    opt = train_lib.make_optimizer({"lr": 1e-3, "max_grad_norm": 1.0}, 10)
    rng = np.random.default_rng(0)
    big = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape) * 50, jnp.float32), params)
    small = jax.tree.map(lambda g: g / (optax.tree.norm(big) * 2), big)  # norm 0.5
    for grads, want_norm in [(big, 1.0), (small, 0.5)]:
        _, state = opt.update(grads, opt.init(params), params)
        mu, nu = _tree_get(state, "mu"), _tree_get(state, "nu")
        # One Adam step: mu = (1 - b1) g_clipped, nu = (1 - b2) g_clipped^2.
        assert float(optax.tree.norm(mu)) / 0.1 == pytest.approx(want_norm, rel=1e-5)
        scale = want_norm / float(optax.tree.norm(grads))
        np.testing.assert_allclose(nu["w"], 0.05 * (grads["w"] * scale) ** 2, rtol=1e-5)


def test_weight_decay_skips_vectors():
    params = {"kernel": jnp.ones((2, 3)), "bias": jnp.ones(3), "scale": jnp.ones(3)}
    opt = train_lib.make_optimizer({"lr": 0.1, "weight_decay": 0.5}, 10)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = opt.update(zeros, opt.init(params), params)
    new = optax.apply_updates(params, updates)
    np.testing.assert_allclose(new["kernel"], 1 - 0.1 * 0.5, rtol=1e-6)
    np.testing.assert_array_equal(new["bias"], params["bias"])
    np.testing.assert_array_equal(new["scale"], params["scale"])


# ---------------------------------------------------------------- train step


def token_loss(params, batch, rng):
    """Token-mean cross-entropy of a linear model; x [B,T,D], targets/mask [B,T]."""
    del rng
    logits = batch["x"] @ params["w"] + params["b"]  # [B, T, V]
    logp = jax.nn.log_softmax(logits)
    nll = -jnp.take_along_axis(logp, batch["targets"][..., None], -1)[..., 0]
    count = batch["mask"].sum()
    loss = (nll * batch["mask"]).sum() / jnp.maximum(count, 1)
    return loss, {"weight": count.astype(jnp.float32), "nll_sum": (nll * batch["mask"]).sum()}


def make_problem(batch_size=8, t=5, d=4, v=7, seed=0):
    rng = np.random.default_rng(seed)
    params = {
        "w": jnp.asarray(rng.normal(size=(d, v)), jnp.float32),
        "b": jnp.asarray(rng.normal(size=(v,)), jnp.float32),
    }
    # Rows i, i+4 form microbatch i when accum_steps=4: token counts 10, 2, 0+5, 9 ... differ.
    lengths = np.array([5, 1, 0, 5, 5, 1, 5, 4])[:batch_size]
    mask = (np.arange(t)[None, :] < lengths[:, None]).astype(np.int32)
    batch = {
        "x": jnp.asarray(rng.normal(size=(batch_size, t, d)), jnp.float32),
        "targets": jnp.asarray(rng.integers(0, v, size=(batch_size, t)), jnp.int32),
        "mask": jnp.asarray(mask),
    }
    return params, batch


def numpy_token_loss(params, batch):
    x = np.asarray(batch["x"], np.float64)
    logits = x @ np.asarray(params["w"], np.float64) + np.asarray(params["b"], np.float64)
    logits -= logits.max(-1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    tg = np.asarray(batch["targets"])
    nll = -np.take_along_axis(logp, tg[..., None], -1)[..., 0]
    m = np.asarray(batch["mask"], np.float64)
    return (nll * m).sum() / m.sum()


def test_grad_accumulation_is_exact_for_token_weighted_loss():
    params, batch = make_problem()
    opt = train_lib.make_optimizer({"lr": 1e-2, "max_grad_norm": 1.0}, 10)
    results = {}
    for accum in (1, 2, 4):
        state = train_lib.create_train_state(params, opt, jax.random.key(0))
        step = jax.jit(train_lib.make_train_step(token_loss, opt, accum_steps=accum))
        state, metrics = step(state, batch, jax.random.key(1))
        results[accum] = (state, metrics)
    ref_state, ref_m = results[1]
    np.testing.assert_allclose(ref_m["loss"], numpy_token_loss(params, batch), rtol=1e-5)
    assert float(ref_m["weight"]) == float(batch["mask"].sum())
    for accum in (2, 4):
        state, m = results[accum]
        for k in ("loss", "grad_norm", "param_norm", "weight"):
            np.testing.assert_allclose(m[k], ref_m[k], rtol=1e-5, err_msg=f"{accum} {k}")
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
            state.params,
            ref_state.params,
        )
        assert int(state.step) == 1


def test_unweighted_accumulation_is_mean_of_microbatches():
    params, batch = make_problem()

    def example_loss(p, b, rng):  # mean over examples; no "weight" -> microbatches equal
        loss, _ = token_loss(p, {**b, "mask": jnp.ones_like(b["mask"])}, rng)
        return loss, {}

    opt = optax.sgd(0.1)
    s1, m1 = train_lib.make_train_step(example_loss, opt)(
        train_lib.create_train_state(params, opt, jax.random.key(0)), batch, jax.random.key(1)
    )
    s4, m4 = train_lib.make_train_step(example_loss, opt, accum_steps=4)(
        train_lib.create_train_state(params, opt, jax.random.key(0)), batch, jax.random.key(1)
    )
    assert "weight" not in m1 and "weight" not in m4
    np.testing.assert_allclose(m4["loss"], m1["loss"], rtol=1e-5)
    np.testing.assert_allclose(s4.params["w"], s1.params["w"], rtol=1e-5)


def test_train_step_errors():
    params, batch = make_problem(batch_size=6)
    opt = optax.sgd(0.1)
    state = train_lib.create_train_state(params, opt, jax.random.key(0))
    with pytest.raises(ValueError, match="not divisible by accum_steps=4"):
        train_lib.make_train_step(token_loss, opt, accum_steps=4)(state, batch, jax.random.key(1))

    def vector_aux(p, b, rng):
        loss, _ = token_loss(p, b, rng)
        return loss, {"per_row": jnp.zeros(3)}

    with pytest.raises(ValueError, match=r"non-scalar: \['per_row'\]"):
        train_lib.make_train_step(vector_aux, opt)(state, batch, jax.random.key(1))


def test_rng_is_folded_with_step():
    seen = []

    def loss_fn(p, b, rng):
        seen.append(rng)
        return (p["w"] ** 2).sum() * 0.0, {"u": jax.random.uniform(rng)}

    opt = optax.sgd(0.1)
    state = train_lib.create_train_state({"w": jnp.ones(2)}, opt, jax.random.key(0))
    step = train_lib.make_train_step(loss_fn, opt)
    base = jax.random.key(3)
    state, m0 = step(state, {"x": jnp.zeros(2)}, base)
    state, m1 = step(state, {"x": jnp.zeros(2)}, base)
    assert float(m0["u"]) == float(jax.random.uniform(jax.random.fold_in(base, 0)))
    assert float(m1["u"]) == float(jax.random.uniform(jax.random.fold_in(base, 1)))


def test_jit_train_step_compiles_once_and_donates():
    params, batch = make_problem()
    traces = []

    def counting_loss(p, b, rng):
        traces.append(1)
        return token_loss(p, b, rng)

    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    rep = NamedSharding(mesh, PartitionSpec())
    opt = train_lib.make_optimizer({"lr": 1e-2, "warmup_steps": 2}, 10)
    abstract, shardings = train_lib.abstract_train_state(
        opt, jax.eval_shape(lambda: params), jax.tree.map(lambda _: rep, params), mesh
    )
    assert abstract.params["w"].sharding == rep
    state = jax.jit(
        lambda p: train_lib.create_train_state(p, opt, jax.random.key(0)), out_shardings=shardings
    )(params)
    step = train_lib.jit_train_step(
        train_lib.make_train_step(
            counting_loss,
            opt,
            accum_steps=2,
            lr_schedule=train_lib.make_schedule({"lr": 1e-2, "warmup_steps": 2}, 10),
        ),
        shardings,
        NamedSharding(mesh, PartitionSpec("data")),
    )
    lrs = []
    for _ in range(3):
        old_w = state.params["w"]
        state, metrics = step(state, batch, state.rng)  # state.rng is not donated: legal
        assert old_w.is_deleted(), "params were not donated"
        lrs.append(float(metrics["lr"]))
    assert len(traces) == 1, f"traced {len(traces)} times"
    assert step.jitted._cache_size() == 1
    assert int(state.step) == 3
    np.testing.assert_allclose(lrs, [0.0, 0.005, 0.01], rtol=1e-6)
    assert set(metrics) == {"loss", "nll_sum", "weight", "grad_norm", "param_norm", "lr"}


def test_evaluate_weighted_mean():
    rng = np.random.default_rng(0)
    values = rng.normal(size=5)
    weights = np.array([3.0, 0.0, 1.0, 2.0, 4.0])

    def eval_fn(params, batch):
        return {"loss": batch["v"] * params, "weight": batch["w"]}

    batches = [
        {"v": jnp.float32(v), "w": jnp.float32(w)} for v, w in zip(values, weights, strict=True)
    ]
    out = train_lib.evaluate(eval_fn, jnp.float32(2.0), batches)
    assert out["loss"] == pytest.approx(2 * (values * weights).sum() / weights.sum(), rel=1e-5)
    out = train_lib.evaluate(lambda p, b: {"loss": b["v"]}, None, batches)
    assert out["loss"] == pytest.approx(values.mean(), rel=1e-5)
    with pytest.raises(ValueError, match="no batches"):
        train_lib.evaluate(eval_fn, 1.0, [])


def test_count_params():
    assert train_lib.count_params({"a": jnp.zeros((3, 4)), "b": [jnp.zeros(5)]}) == 17


# ---------------------------------------------------------------- host helpers


def test_check_finite():
    common.check_finite({"loss": np.float32(1.0), "lr": 1e-3}, 5)
    with pytest.raises(common.NonFiniteError, match=r"^step 123: loss is nan"):
        common.check_finite({"grad_norm": np.inf, "loss": np.float32("nan")}, 123)
    with pytest.raises(FloatingPointError, match=r"^step 7: grad_norm is inf$"):
        common.check_finite({"loss": jnp.float32(0.5), "grad_norm": jnp.float32("inf")}, 7)


def test_metrics_writer(tmp_path):
    workdir = str(tmp_path / "sft")
    with common.MetricsWriter(workdir, enabled=True) as w:
        for step in (1, 2, 3):
            w.write(step, {"loss": jnp.float32(step / 2), "lr": 1e-4})
    lines = (tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x) for x in lines] == [
        {"step": s, "loss": s / 2, "lr": 1e-4} for s in (1, 2, 3)
    ]
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(workdir))
    # A resumed run drops lines after its checkpoint, including a line cut short by a kill.
    with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
        f.write('{"step": 4, "lo')
    with common.MetricsWriter(workdir, resume_step=2, enabled=True) as w:
        w.write(3, {"loss": 9.0})
    steps = [json.loads(x)["step"] for x in (tmp_path / "sft" / "metrics.jsonl").open()]
    assert steps == [1, 2, 3]
    with (
        pytest.raises(ValueError, match="expected a scalar"),
        common.MetricsWriter(workdir, enabled=True) as w,
    ):
        w.write(5, {"v": np.zeros(3)})


def test_metrics_writer_disabled(tmp_path):
    with common.MetricsWriter(str(tmp_path / "x"), enabled=False) as w:
        w.write(1, {"loss": 1.0})
    assert not (tmp_path / "x").exists()


def test_progress_line():
    clock = iter([0.0, 1.0, 10.0, 11.0, 20.0])
    out = io.StringIO()
    p = common.Progress(
        100,
        tokens_per_step=1000,
        interval_s=5.0,
        stream=out,
        clock=lambda: next(clock),
        enabled=True,
    )
    assert p.update(1) is None  # starts the clock (compilation excluded)
    assert p.update(2) is None  # within the interval
    line = p.update(11)  # 10 steps in 10 s
    assert line == "step 11/100 (11%) | 1.00 steps/s | 1,000 tokens/s | ETA 1m29s"
    assert out.getvalue() == line + "\n"
    assert p.update(12) is None
    assert p.update(100).startswith("step 100/100 (100%) | 8.90 steps/s")
    assert common.Progress(10, enabled=False).update(3) is None
    clock = iter([0.0, 6.0])
    labelled = common.Progress(10, label="sft", stream=io.StringIO(), clock=lambda: next(clock))
    labelled.enabled = True
    labelled.update(1)
    assert labelled.update(4) == "sft: step 4/10 (40%) | 0.50 steps/s | ETA 0m12s"


def test_termination_signal():
    before = signal.getsignal(signal.SIGTERM)
    with common.TerminationSignal() as term:
        assert not term.should_stop(0)
        os.kill(os.getpid(), signal.SIGTERM)
        assert term.received and term.should_stop(1)
        assert term.signum == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before


# ---------------------------------------------------------------- real model, sharded

SHARDED_TRANSFORMER = """
import jax, jax.numpy as jnp, numpy as np
from instructrl import losses, sharding, train_lib
from instructrl.models.transformer import ModelConfig, Transformer, positions_from_mask

cfg = ModelConfig(vocab_size=64, max_len=16, num_layers=2, d_model=32, num_heads=4, d_ff=64)
model = Transformer(cfg)
mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
tokens = np.random.default_rng(0).integers(1, 64, size=(8, 16)).astype(np.int32)
lengths = np.array([16, 3, 9, 1, 16, 12, 5, 7])
mask = (np.arange(16)[None] < lengths[:, None]).astype(np.int32)
init_args = (tokens[:1], positions_from_mask(mask[:1]), mask[:1])
params = sharding.init_params_sharded(model, jax.random.key(0), init_args, mesh)
abstract_params, param_sh = sharding.abstract_params_and_shardings(model, init_args, mesh)
opt = train_lib.make_optimizer({"lr": 1e-3, "weight_decay": 0.1}, 10)
abstract, state_sh = train_lib.abstract_train_state(opt, abstract_params, param_sh, mesh)

def loss_fn(p, batch, rng):
    logits = model.apply({"params": p}, batch["tokens"], positions_from_mask(batch["mask"]),
                         batch["mask"], deterministic=False, rngs={"dropout": rng})
    loss_mask = batch["mask"][:, 1:] * (batch["mask"][:, :-1] > 0)
    total, count = losses.lm_loss_sum(logits[:, :-1], batch["tokens"][:, 1:], loss_mask)
    return total / jnp.maximum(count, 1), {"weight": count}

batch = sharding.shard_batch({"tokens": tokens, "mask": mask}, mesh)
final = {}
for accum in (1, 2):
    traces = []
    def counted(p, b, r):
        traces.append(1)
        return loss_fn(p, b, r)
    state = jax.jit(lambda p: train_lib.create_train_state(p, opt, jax.random.key(1)),
                    out_shardings=state_sh)(jax.tree.map(jnp.copy, params))
    step = train_lib.jit_train_step(train_lib.make_train_step(counted, opt, accum_steps=accum),
                                    state_sh, sharding.batch_sharding(mesh))
    with sharding.mesh_context(mesh):
        for _ in range(3):
            state, metrics = step(state, batch, state.rng)
    assert len(traces) == 1, traces
    mu = state.opt_state[1][0].mu
    jax.tree.map(lambda m, s: np.testing.assert_equal(m.sharding, s), mu, param_sh)
    assert float(metrics["weight"]) == float((mask[:, 1:] * (mask[:, :-1] > 0)).sum())
    final[accum] = (jax.device_get(state.params), jax.device_get(metrics))
# atol: Adam turns the pure rounding noise of exactly-zero gradients (attention key biases)
# into updates of ~lr * noise / eps; everything else agrees to rtol.
jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
             final[1][0], final[2][0])
for k in ("loss", "grad_norm", "param_norm"):
    np.testing.assert_allclose(final[1][1][k], final[2][1][k], rtol=1e-5)
print("OK")
"""


@pytest.mark.slow
def test_sharded_transformer_accumulation():
    """Tiny Transformer on a (data=2, fsdp=2, tensor=2) mesh: accum 2 == accum 1, one trace."""
    from tests.conftest import run_in_subprocess

    assert "OK" in run_in_subprocess(SHARDED_TRANSFORMER, num_devices=8)
