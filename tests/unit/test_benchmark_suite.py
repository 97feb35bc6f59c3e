"""experiments/benchmarks/suite.py and gpu_check.sh: the shape of their output, never speed."""

from __future__ import annotations

import json
import math
import os
import subprocess
import time

import pytest

from experiments.benchmarks import shapes, suite, timing
from instructrl import hf
from instructrl.costs import kv_cache_bytes
from instructrl.models import ModelConfig

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# What a stock CUDA JAX image lacks of this repo's install_requires; gpu_check must not need it.
NOT_IN_STOCK_IMAGE = ("tensorflow_datasets", "tensorflow", "grain", "array_record",
                      "sentencepiece", "tensorboardX", "matplotlib")  # fmt: skip
TRAIN_KEYS = {"step_s", "cpu_s", "tokens_per_s", "mfu"}
SAMPLE_KEYS = {"call_s", "cpu_s", "tokens_per_s", "bandwidth_fraction"}
PPO_KEYS = {"iteration_s", "episodes_per_s", "rollout_s", "update_s", "rollout_fraction",
            "generated_tokens_per_s"}  # fmt: skip


def test_interleaved_within_stops_at_the_budget():
    calls = []
    medians, done = timing.interleaved_within(
        {"a": lambda: (calls.append("a"), time.sleep(0.02))}, reps=50, budget_s=0.03
    )
    assert 1 <= done < 50 and len(calls) == done and medians["a"]["wall_s"] >= 0.015


def test_shapes_configs_are_valid_and_qwen3_is_hf_qwen3_0p6b():
    for shape in shapes.MODELS:
        exp = shapes.get_config(f"shape={shape},dtype=bfloat16")
        mc = ModelConfig.from_dict(exp.model)
        assert mc.dtype == "bfloat16" and mc.param_dtype == "float32"
        assert exp.sft.batch_size > 0 and exp.bench.sample_batches
    # Qwen3-0.6B's config.json (the fields config_from_hf reads), context cut to 4096.
    qwen = {"model_type": "qwen3", "vocab_size": 151936, "max_position_embeddings": 4096,
            "num_hidden_layers": 28, "hidden_size": 1024, "num_attention_heads": 16,
            "num_key_value_heads": 8, "head_dim": 128, "intermediate_size": 3072,
            "tie_word_embeddings": True, "rms_norm_eps": 1e-6, "rope_theta": 1000000,
            "hidden_act": "silu", "attention_bias": False, "use_sliding_window": False}  # fmt: skip
    ours = ModelConfig.from_dict(shapes.get_config("shape=qwen3_0p6b").model)
    assert hf.config_from_hf(qwen) == ours
    with pytest.raises(Exception, match="shape='nope'"):
        shapes.get_config("shape=nope")


def test_sample_bytes_and_markdown_and_plan_peaks(tmp_path):
    mc = ModelConfig(vocab_size=100, max_len=32, num_layers=2, d_model=16, num_heads=2, d_ff=64)
    weights = 2 * (16 * 16 * 4 + 2 * 16 * 64) + 16 * 100  # q, k, v, o, up, down; unembed
    mesh = {"data": 1, "fsdp": 1, "tensor": 1}
    assert suite.sample_bytes_per_token(mc, 4, 8, 8) == 4 * weights + kv_cache_bytes(
        mc, 4, 12, mesh
    )
    plan = {"stages": [{"kind": "sft", "peak": 10}, {"kind": "ppo", "peak": 20}]}
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    assert suite.plan_peaks(str(tmp_path / "plan.json")) == {"sft": 10, "ppo": 20}
    side = {"tokens_per_s": 10.0, "mfu": 0.5}
    result = {
        "date": "d", "device": {"jax": "cpu"}, "shape": "tiny", "dtype": "float32",
        "threads": 1, "load_avg_1min": [0.0, 0.0],
        "roofline": {"matmul_flops_per_s": {"peak": 1e9}, "matmul_n": 8,
                     "copy_bytes_per_s": {"peak": 1e9}},
        "rows": {
            "sft_train_step": {"batch": [2, 8], "ours": side, "peer": side,
                               "ratio_ours_over_peer": 1.0, "reps": 1, "budget_exhausted": True,
                               "plan": {"measured_peak_bytes": None, "predicted_peak_bytes": 10}},
            "ppo_iteration": {"batch": 4, "prompt_len": 2, "new_tokens": 2, "reps": 1,
                              "ours": {"episodes_per_s": 3.0, "rollout_fraction": 0.25},
                              "memory_peak_so_far": {"jax_device_peak_bytes": None,
                                                     "peak_rss_mib": 12.5}},
        },
    }  # fmt: skip
    table = suite.markdown(result).splitlines()
    assert table[2].startswith("| row |") and len(table) == 6
    assert "| sft_train_step | 2x8 | 10 tok/s | 10 tok/s | 1 | 50.0% | 50.0% | 1 |" in table[4]
    assert "budget hit" in table[4] and "so far - B vs plan 10 B" in table[4]
    assert "| ppo_iteration | 4x(2+2) | 3 episodes/s | - | - | rollout 25% |" in table[5]
    assert "peak RSS so far 12.5 MiB" in table[5]
    with pytest.raises(SystemExit):
        suite.parse_args(["--rows", "sft,bogus"])
    assert suite.busy_warnings(0.3, 2, 2) == [] and suite.busy_warnings(1.2, 2, 1) == []
    (warning,) = suite.busy_warnings(4.0, 2, 2)
    assert "load average 4.00 on 2 cores" in warning
    result["warnings"] = [warning]
    assert suite.markdown(result).splitlines()[1] == f"**Warning:** {warning}"


@pytest.mark.parametrize("shape", ["tiny", "tiny_qwen3"])
def test_the_peer_is_the_same_model(shape):
    """transformers' model of a shape has our parameter count (LM; the RM: trunk + head)."""
    import torch

    from experiments.benchmarks import peers
    from instructrl.costs import param_count

    mc = ModelConfig.from_dict(shapes.get_config(f"shape={shape}").model)
    for head in ("lm", "scalar"):
        model = peers.hf_model(mc, head, torch.device("cpu"))
        assert sum(p.numel() for p in model.parameters()) == param_count(mc, head), head


def _positive_numbers(tree, where=""):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _positive_numbers(v, f"{where}.{k}")
    elif isinstance(tree, bool):
        return
    elif isinstance(tree, int | float):
        yield where, tree


@pytest.mark.slow
def test_gpu_check_quick_runs_the_suite_with_stock_packages_only(tmp_path):
    """gpu_check.sh --quick on the CPU (tiny shape) with the packages a stock CUDA JAX image
    lacks made unimportable; the suite's JSON has every row, its keys, finite positive
    figures, and the plan's predicted peaks beside them."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import sys\n" + "".join(f"sys.modules[{m!r}] = None\n" for m in NOT_IN_STOCK_IMAGE)
    )
    out = tmp_path / "out"
    env = dict(os.environ, JAX_PLATFORMS="cpu", OUT=str(out), SHAPES="tiny", PYTHONPATH=str(site))
    env["PYTHON"] = os.environ.get("PYTHON_FOR_TESTS", __import__("sys").executable)
    proc = subprocess.run(["bash", "experiments/benchmarks/gpu_check.sh", "--quick"], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-6000:]
    files = {p.name for p in out.iterdir()}
    assert {"plan_tiny.json", "suite_tiny.json", "suite_tiny.md", "sections.json"} <= files
    assert "summary.md" in files
    sections = json.loads((out / "sections.json").read_text())
    assert [s["status"] for s in sections] == ["ok", "ok"]
    result = json.loads((out / "suite_tiny.json").read_text())
    assert result["quick"] and result["shape"] == "tiny" and result["dtype"] == "float32"
    assert {"date", "load_avg_1min", "versions", "device", "device_report"} <= set(result)
    rl = ["ppo_iteration", "grpo_iteration", "rloo_iteration"]
    assert list(result["rows"]) == ["sft_train_step", "rm_train_step", "sample_b4",
                                    "sample_b8", *rl]  # fmt: skip
    # GRPO and RLOO: PPO's episodes per iteration as batch / G prompts x G samples.
    assert [result["rows"][n]["group_size"] for n in rl] == [1, 4, 4]
    assert len({result["rows"][n]["batch"] for n in rl}) == 1
    for name, row in result["rows"].items():
        keys = PPO_KEYS if name in rl else (
            SAMPLE_KEYS if name.startswith("sample") else TRAIN_KEYS)  # fmt: skip
        assert set(row["ours"]) == keys, name
        if name not in rl:
            assert set(row["peer"]) == keys and row["ratio_ours_over_peer"] > 0
        if name in ("sft_train_step", "rm_train_step", "ppo_iteration"):
            assert row["plan"]["predicted_peak_bytes"] > 0
    figures = dict(_positive_numbers({"rows": result["rows"], "roofline": result["roofline"]}))
    figures = {k: v for k, v in figures.items() if "jax_device_peak" not in k}
    assert figures and all(math.isfinite(v) and v > 0 for v in figures.values()), figures
    table = (out / "suite_tiny.md").read_text()
    assert table.count("\n| ") == 8  # header + 7 rows
