"""Tests for instructrl/plan.py and the paper-scale configs in experiments/.

Every model of every config is built with jax.eval_shape (full size included: nothing is
allocated) and its parameter count checked against plan.param_count. The plan itself runs
for the 1.3B config on an abstract (2, 2, 2) mesh in-process, and compiled on 8 virtual CPU
devices in a subprocess (slow).
"""

from __future__ import annotations

import glob
import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import AbstractMesh, AxisType, NamedSharding, PartitionSpec

from instructrl import config as config_lib
from instructrl import plan, sharding, train_lib
from instructrl.errors import ConfigError
from instructrl.models import ModelConfig, Transformer
from instructrl.models.transformer import init_cache
from tests.conftest import REPO, subprocess_env

EXPERIMENTS = sorted(
    p for p in glob.glob(os.path.join(REPO, "experiments", "*.py")) if not p.endswith("__init__.py")
)
MESH_222 = {"data": 2, "fsdp": 2, "tensor": 2}


def _load(path: str, arg: str = ""):
    return config_lib.load_config(f"{path}:{arg}" if arg else path)


def _true_count(mc: ModelConfig, head: str) -> int:
    x = jax.ShapeDtypeStruct((1, 8), jnp.int32)
    model = Transformer(mc, head=head)
    params = jax.eval_shape(lambda k, t: model.init(k, t, t, t)["params"], jax.random.key(0), x)
    return train_lib.count_params(params)


@pytest.mark.parametrize("path", EXPERIMENTS, ids=os.path.basename)
@pytest.mark.parametrize("arg", ["smoke", ""])
def test_every_model_of_every_config_eval_shape_builds(path, arg):
    """jax.eval_shape builds every model (policy LM, reward/value scalar head), smoke and full
    size, and the analytic parameter count equals the built model's."""
    config = _load(path, arg)
    for role, (mc, head) in plan.model_configs(config).items():
        assert plan.param_count(mc, head) == _true_count(mc, head), role


@pytest.mark.parametrize(
    "config, expected",
    [
        ("instructgpt_1p3b.py", 1.316e9),  # GPT-3 XL, vocab padded to 50304
        ("instructgpt_6b.py", 6.66e9),  # GPT-3 6.7B
        ("instructgpt_175b.py", 174.6e9),
        ("gpt2_124m.py", 124_439_808),  # GPT2LMHeadModel's count
        ("llama_1b.py", 1_100_048_384),  # TinyLlama-1.1B's count
    ],
)
def test_paper_sizes(config, expected):
    mc = ModelConfig.from_dict(_load(os.path.join(REPO, "experiments", config)).model)
    assert plan.param_count(mc) == pytest.approx(expected, rel=2e-3)


def test_paper_hyperparameters():
    c13 = _load(os.path.join(REPO, "experiments", "instructgpt_1p3b.py"))
    c175 = _load(os.path.join(REPO, "experiments", "instructgpt_175b.py"))
    assert (c13.sft.optimizer.lr, c13.sft.batch_size, c13.sft.num_epochs) == (9.65e-6, 32, 16)
    assert (c175.sft.optimizer.lr, c175.sft.batch_size) == (5.03e-6, 8)
    assert c13.sft.dropout == 0.2 and c13.sft.optimizer.b2 == 0.95
    assert c13.sft.optimizer.end_ratio == 0.1 and c13.sft.select_by == "rm_score"
    assert c13.ppo_init.ptx_fraction == 0.1 and c13.ppo_init.num_epochs == 2  # paper: 10%
    assert c13.ppo_init.ptx_rows * 8 == c13.ppo_init.batch_size
    assert (c13.rm.optimizer.lr, c13.rm.batch_size, c13.rm.num_epochs) == (9e-6, 64, 1)
    # Named deviation: the RM (and so the value net) starts from rm_base, a pretrained model,
    # not the 6B SFT model; it runs before SFT, which is selected by its score.
    assert c13.stages.index("rm") < c13.stages.index("sft") and c13.rm.init_from != "sft"
    assert c13.sft.select_reward_from == "rm" and c13.ppo_ptx.reward_from == "rm"
    with open(os.path.join(REPO, "experiments", "paper.py")) as f:
        assert "Deviation (paper: the RM starts from the 6B SFT model" in f.read()
    ppo = c13.ppo_ptx
    assert (ppo.batch_size // ppo.num_minibatches, ppo.num_epochs, ppo.kl_coef) == (64, 1, 0.02)
    assert (ppo.ptx_coef, ppo.ptx_ratio, ppo.ema_decay) == (27.8, 8.0, 0.992)
    assert ppo.batch_size * ppo.num_iterations == 256_000
    assert c13.ppo_ptx.value_optimizer.lr == 9e-6 and c175.ppo_ptx.value_optimizer.lr == 5e-6
    # The paper's 6B RM (and value network) for every policy size.
    for cfg in (c13, c175):
        assert cfg.reward_model.d_model == 4096 and cfg.reward_model.num_layers == 32
    assert c13.model.vocab_size % 128 == 0


def test_kv_cache_bytes_matches_init_cache():
    mc = ModelConfig(vocab_size=64, max_len=32, num_layers=3, d_model=32, num_heads=4,
                     num_kv_heads=2, d_ff=64, dtype="bfloat16")  # fmt: skip
    cache = jax.eval_shape(lambda: init_cache(mc, 8, 20))
    whole = sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(cache["layers"]))
    one = {"data": 1, "fsdp": 1, "tensor": 1}
    assert plan.kv_cache_bytes(mc, 8, 20, one) == whole
    assert plan.kv_cache_bytes(mc, 8, 20, MESH_222) == whole // 8  # batch / 4, kv heads / 2
    # 2 kv heads do not split 4 ways: they stay whole on each device.
    assert plan.kv_cache_bytes(mc, 8, 20, {"data": 1, "fsdp": 2, "tensor": 4}) == whole // 2


def test_forward_flops_matches_xla_count():
    """The analytic model FLOPs of a forward are within 20% of XLA's count (which adds the
    elementwise work) and below it. One layer: XLA counts a loop body (the layer scan) once."""
    mc = ModelConfig(vocab_size=512, max_len=64, num_layers=1, d_model=256, num_heads=4, d_ff=1024)
    model = Transformer(mc)
    x = jax.ShapeDtypeStruct((4, 64), jnp.int32)
    params = jax.eval_shape(lambda k, t: model.init(k, t, t, t)["params"], jax.random.key(0), x)
    lowered = jax.jit(lambda p, t: model.apply({"params": p}, t, t, t)).trace(params, x).lower()
    xla = lowered.cost_analysis()["flops"]
    analytic = plan.forward_flops(mc, 4 * 64, 64)
    assert analytic <= xla <= 1.2 * analytic


def test_device_bytes_follows_shardings():
    mesh = AbstractMesh((2, 2, 2), sharding.MESH_AXES, axis_types=(AxisType.Auto,) * 3)
    sh = NamedSharding(mesh, PartitionSpec(("data", "fsdp"), "tensor"))
    x = jax.ShapeDtypeStruct((8, 6), jnp.float32, sharding=sh)
    y = jax.ShapeDtypeStruct((3,), jnp.bfloat16, sharding=NamedSharding(mesh, PartitionSpec()))
    assert plan.device_bytes({"x": x, "y": y}) == 2 * 3 * 4 + 3 * 2


@pytest.mark.parametrize(
    "text", ["data:2,fsdp", "data:2,fsdp:x", "data:0", "batch:2", "data:2,data:2", "", "fsdp:-1"]
)
def test_parse_mesh_rejects_bad_strings(text):
    with pytest.raises(ConfigError, match="--mesh="):
        plan.parse_mesh(text)


def test_parse_mesh_fills_missing_axes():
    assert plan.parse_mesh("fsdp:16,tensor:4") == {"data": 1, "fsdp": 16, "tensor": 4}


def _cli(*args: str, num_devices: int = 1) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "instructrl.plan", *args],
        cwd=REPO,
        env=subprocess_env(num_devices),
        capture_output=True,
        text=True,
        timeout=900,
    )


def test_cli_bad_mesh_and_indivisible_mesh_give_one_line_errors():
    proc = _cli("--config=experiments/instructgpt_1p3b.py:smoke", "--mesh=data:2,fsdp")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert proc.stderr.startswith("error: --mesh='data:2,fsdp': expected AXIS:SIZE")
    # GPT-2's 50257-row vocabulary cannot be split over tensor=2.
    proc = _cli("--config=experiments/gpt2_124m.py", "--mesh=tensor:2", "--analytic")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "vocab=50257" in proc.stderr and "tensor=2" in proc.stderr


def test_plan_1p3b_sft_on_abstract_222_mesh():
    """The full 1.3B SFT step on an abstract (2, 2, 2) mesh, lowered for TPU: params and Adam
    moments per device are the exact shards, and the FLOPs are 6·N·tokens (+ attention)."""
    config = _load(os.path.join(REPO, "experiments", "instructgpt_1p3b.py"))
    report = plan.plan(config, MESH_222, ["sft"], chip="v4", mfu=0.4, mode="analytic")
    (stage,) = report["stages"]
    n = plan.param_count(ModelConfig.from_dict(config.model))
    # Every weight is split over fsdp (2) and, except norms/biases/positions, tensor (2).
    assert n * 4 / 4 <= stage["resident"]["params"] <= n * 4 / 2
    assert stage["resident"]["optimizer state"] == pytest.approx(2 * stage["resident"]["params"])
    (step,) = stage["programs"]
    assert step["flops_nd"] == 6 * n * 32 * 2048
    assert step["flops_nd"] < step["flops"] < 1.3 * step["flops_nd"]
    assert step["flops_xla"] > 0
    assert stage["fits"] and stage["peak"] < 32 * plan.GIB
    assert step["seconds"] == pytest.approx(step["flops"] / (8 * 275e12 * 0.4))
    text = plan.format_report(report, "x")
    assert "activations/temp" in text and "fits" in text


def _check_arguments(stage, program, names):
    """XLA's per-device argument bytes equal our exact accounting of the same arrays."""
    ours = sum(stage["resident"][k] for k in names) + program["inputs"]
    assert abs(program["xla_argument_bytes"] - ours) < 2**20, (program["name"], ours)


@pytest.mark.slow
def test_plan_smoke_ppo_compiles_on_8_devices():
    """Rollout and update of the smoke PPO-ptx stage compile on 8 virtual CPU devices, and XLA's
    argument bytes equal our per-device accounting."""
    proc = _cli("--config=experiments/instructgpt_1p3b.py:smoke", "--mesh=data:2,fsdp:2,tensor:2",
                "--stage=ppo", "--json", num_devices=8)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert report["mode"] == "compile" and report["platform"] == "cpu"
    (stage,) = report["stages"]
    rollout, update = stage["programs"]
    frozen = ("policy params", "reference (frozen)", "value params", "reward model (frozen)")
    ptx = 8 * 128 * 4 * 5 // 4  # ptx_* int32 [8, 128] x 5 over 4 batch shards: not an argument
    rollout = dict(rollout, inputs=rollout["inputs"] - ptx)
    _check_arguments(stage, rollout, frozen)
    _check_arguments(stage, update, [k for k in stage["resident"] if "frozen" not in k])
    assert rollout["kv_cache"] > 0 and all(p["temp"] > 0 for p in stage["programs"])


@pytest.mark.slow
def test_plan_1p3b_compiles_on_8_virtual_devices():
    """`python -m instructrl.plan` re-executes itself with 8 virtual CPU devices and compiles
    the 1.3B SFT step (full model shape; batch 8 x 256 tokens to keep the test short)."""
    proc = _cli("--config=experiments/instructgpt_1p3b.py", "--mesh=data:2,fsdp:2,tensor:2",
                "--stage=sft", "--config.sft.batch_size=8", "--config.data.seq_len=256",
                "--json")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert report["mode"] == "compile" and report["devices"] == 8
    (stage,) = report["stages"]
    (step,) = stage["programs"]
    _check_arguments(stage, step, ["params", "optimizer state"])
    assert stage["params"]["model"] == pytest.approx(1.316e9, rel=1e-3)
    assert step["temp"] > 0 and step["flops_xla"] > 0


def test_plan_ppo_with_value_head_on_policy_has_no_value_network():
    config = _load(os.path.join(REPO, "experiments", "tiny_instructgpt.py"), "smoke")
    config_lib.apply_overrides(config, ["ppo.value_head_on_policy=true"])
    mesh = {"data": 1, "fsdp": 2, "tensor": 2}
    (stage,) = plan.plan(config, mesh, ["ppo"], mode="analytic")["stages"]
    d = config.model.d_model
    assert stage["params"]["value"] == d + 1
    assert stage["resident"]["value params"] == (d + 1) * 4  # replicated f32 head
    assert stage["resident"]["value optimizer"] == 0  # one optimizer over policy + head


def test_plan_ppo_logprob_chunk_shrinks_the_logits_term():
    """With ppo.logprob_chunk the policy/reference logits are [rows, chunk, V] at a time, not
    [rows, P + N - 1, V]: the update's analytic temporaries drop by exactly that difference
    (3 f32 copies: logits, softmax, gradient), the rollout's scoring does not grow."""
    config = _load(os.path.join(REPO, "experiments", "tiny_instructgpt.py"), "smoke")
    mesh_shape = {"data": 1, "fsdp": 2, "tensor": 2}
    mesh = AbstractMesh((1, 2, 2), sharding.MESH_AXES, axis_types=(AxisType.Auto,) * 3)
    rules = sharding.rules_from_config(config.get("rules"))
    temps = {}
    for chunk in (0, 8):
        config_lib.apply_overrides(config, [f"ppo.logprob_chunk={chunk}"])
        sp = plan.build_stage(config, "ppo", mesh, rules, mesh_shape)
        temps[chunk] = {prog.name: prog.temp for prog in sp.programs}
        assert ("8 positions at a time" in sp.notes[0]) == bool(chunk)
    ppo = config.ppo
    rows = math.ceil(ppo.batch_size // ppo.num_minibatches / 2)  # over data x fsdp
    length = config.data.max_prompt_len + ppo.max_new_tokens - 1
    vocab = math.ceil(config.model.vocab_size / 2)  # over tensor
    assert temps[0]["update"] - temps[8]["update"] == rows * (length - 8) * vocab * 4 * 3
    assert temps[8]["rollout"] <= temps[0]["rollout"]
    logits = plan.activation_bytes(ModelConfig.from_dict(config.model), 6, 40, mesh_shape,
                                   train=False, logits=True, logit_positions=8)["logits"]  # fmt: skip
    assert logits == 3 * 8 * vocab * 4 * 2
