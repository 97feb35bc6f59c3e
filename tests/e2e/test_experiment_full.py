"""The `full` argument of experiments/tiny_instructgpt.py: every method at two model sizes.

`full` adds pretrain_large, sft_large, ppo_large and ppo_ptx_large (the same
recipe at a ~9x larger model) and judges all ten models against sft_large. Its small-size
stages keep the names and settings of the default config, so `full` run in the workdir of a
default run trains only the large models.

What each test shows:
  every stage has a config section; the large chain mirrors   test_full_config_stages_and_chain
    the small one: pretrain_large (own model) <- sft_large
    <- ppo_large, ppo_ptx_large (reward from the small run's
    last RM); each large stage is its small
    one's recipe; the small
    stages equal the default config's (with `oracle`, outside
    smoke); eval compares both sizes against sft_large
    (smoke and non-smoke)
  the ppo_gold oracle is opt-in: `oracle` adds it and its   test_oracle_is_opt_in
    eval model and changes nothing else; `full` keeps it,
    smoke and `algorithms` leave it out unless asked for
  the large model has >= 8x the small one's parameters       test_full_large_model_is_8x_small
    (built with jax.eval_shape; smoke: large > small)
  `flawed_demos` changes exactly the world's demonstration     test_flawed_demos_changes_only_
    error rate (0.5) and slip kind (filler) and PPO's KL       demonstrations_and_kl_control
    controller (adaptive) in ppo and ppo_ptx, and their large
    and first-round copies under `full` / `rounds=2`; the
    oracle keeps the paper's fixed beta
  the default world is the visible-flaws one (3 kinds at       test_default_world_is_visible_
    VISIBLE_FLAW_RATE); `near_perfect` changes exactly the       flaws_and_near_perfect_differs_
    world's error rate and slip kind back to 0.1 "random",      only_in_the_world
    the same as `visible_flaws=0`; it excludes `flawed_demos`
  `smoke,full` runs end to end through the CLI: DONE in      test_smoke_full_end_to_end_and_reuse
    every stage, results.json with reference sft_large,
    10 models in 2 size groups (large > small params),
    win rates in [0, 1] with a standard error, the large SFT
    against itself 1/2 up to noise, results.md with a size
    column each, the Figure-1 PNG; re-run in a copy without
    eval/ and the *_large folders: the small stages are
    skipped (folders byte-identical), the large ones and eval
    run again and reproduce the first run's results exactly
"""

from __future__ import annotations

import json
import os
import shutil

import jax
import jax.numpy as jnp
import pytest

from instructrl import config as config_lib
from instructrl import train_lib
from instructrl.models import ModelConfig, Transformer
from instructrl.stages import evaluate
from tests.conftest import tree_digest
from tests.e2e.conftest import EXPERIMENT, run_experiment

SMALL = ("pretrain", "sft", "ppo", "ppo_ptx")
LARGE = tuple(f"{s}_large" for s in SMALL)
LABELS = ("GPT", "GPT (prompted)", "SFT", "PPO", "PPO-ptx")
# stage -> the stage its init_from must name (pretrain_large trains from scratch). PPO starts
# from SFT, as its small twin (the experiment's documented deviation from PPO-init).
LARGE_INIT = {"sft_large": "pretrain_large", "ppo_large": "sft_large",
              "ppo_ptx_large": "sft_large"}  # fmt: skip


def _config(arg: str):
    return config_lib.load_config(f"{EXPERIMENT}:{arg}" if arg else EXPERIMENT)


def _model_config(config, stage: str) -> ModelConfig:
    """The model a stage trains from scratch: config.model updated by config.<stage>.model
    (as instructrl/stages/driver.py setup_model does)."""
    d = config.model.to_dict()
    if config[stage].get("model") is not None:
        d.update(config[stage].model.to_dict())
    return ModelConfig.from_dict(d)


def _param_count(mc: ModelConfig) -> int:
    x = jax.ShapeDtypeStruct((1, 8), jnp.int32)
    model = Transformer(mc)
    params = jax.eval_shape(lambda k, t: model.init(k, t, t, t)["params"], jax.random.key(0), x)
    return train_lib.count_params(params)


# ---------------------------------------------------------------- config only
@pytest.mark.parametrize("smoke", [False, True], ids=["default", "smoke"])
def test_full_config_stages_and_chain(smoke):
    prefix = "smoke," if smoke else ""
    # `full` keeps the ppo_gold oracle outside smoke: its small stages are an `oracle` run's
    full, default = _config(prefix + "full"), _config(prefix.rstrip(",") if smoke else "oracle")
    stages = config_lib.stage_names(full)
    for name in stages:
        assert name in full and "kind" in full[name], f"stage {name} has no config section"
    # the default stages, then the large ones before eval
    assert stages == [*config_lib.stage_names(default)[:-1], *LARGE, "eval"]

    # the large chain
    assert full.pretrain_large.get("model") is not None
    assert full.pretrain_large.get("init_from", "") in ("", None)
    for stage, parent in LARGE_INIT.items():
        assert full[stage].init_from == parent, stage
        small = stage.removesuffix("_large")
        assert full[small].init_from + "_large" == parent, f"{stage} does not mirror {small}"
        assert full[stage].get("model") is None, f"{stage} must inherit its parent's model"
    for stage in ("ppo_large", "ppo_ptx_large"):
        assert full[stage].reward_from == full.ppo.reward_from == "rm", stage
    assert full.ppo_ptx_large.ptx_coef == full.ppo_ptx.ptx_coef > 0 == full.ppo_large.ptx_coef

    # each large stage is its small one's recipe, apart from what makes it large
    for small, large in zip(SMALL, LARGE, strict=True):
        a, b = full[small].to_dict(), full[large].to_dict()
        for d in (a, b):
            d.pop("init_from", None)
            d.pop("model", None)
        assert a == b, f"{large} differs from {small} in more than init_from/model"

    # the small stages (and everything they read) are exactly the default run's
    for name in config_lib.stage_names(default):
        if name != "eval":
            assert full[name].to_dict() == default[name].to_dict(), f"config.{name} differs"
    for key in ("seed", "model", "data", "mesh"):
        value = full[key]
        other = default[key]
        if hasattr(value, "to_dict"):
            value, other = value.to_dict(), other.to_dict()
        assert value == other, f"config.{key} differs"

    # eval: ten models in two size groups against the large SFT model
    assert full.eval.reference == "sft_large"
    # (and, outside smoke, the gold-reward oracle at the small size)
    specs = evaluate.parse_models(full.eval.models, "eval.models")
    oracle = [] if smoke else [("small", "PPO (gold reward)")]
    assert [(s.size, s.label) for s in specs] == [
        *(("small", label) for label in LABELS),
        *oracle,
        *(("large", label) for label in LABELS),
    ]
    for s in specs:
        want = {"GPT": "pretrain", "GPT (prompted)": "pretrain", "SFT": "sft", "PPO": "ppo",
                "PPO-ptx": "ppo_ptx", "PPO (gold reward)": "ppo_gold"}[s.label]  # fmt: skip
        assert s.stage == want + ("_large" if s.size == "large" else ""), s
        assert s.fewshot == (s.label == "GPT (prompted)")


@pytest.mark.parametrize("extra", ["", "smoke", "near_perfect", "rounds=2"])
def test_oracle_is_opt_in(extra):
    base = _config(extra)
    oracle = _config(f"{extra},oracle" if extra else "oracle")
    names = config_lib.stage_names(base)
    assert "ppo_gold" not in names and names[-1] == "eval"
    assert config_lib.stage_names(oracle) == [*names[:-1], "ppo_gold", "eval"]
    assert [m for m in oracle.eval.models if "ppo_gold" in m] == ["PPO (gold reward)=ppo_gold"]
    assert oracle.eval.models[:-1] == base.eval.models
    assert _diff(oracle.to_dict(), base.to_dict()) == {"stages", "eval.models"}
    for arg, has_oracle in [("full", True), ("smoke,full", False), ("algorithms", False),
                            ("full,algorithms", False), ("algorithms,oracle", True)]:  # fmt: skip
        assert ("ppo_gold" in config_lib.stage_names(_config(arg))) == has_oracle, arg


def _diff(a, b, prefix=""):
    """Dotted keys whose values differ between two nested dicts (a key in one only counts)."""
    out = set()
    for key in set(a) | set(b):
        x, y = a.get(key), b.get(key)
        if isinstance(x, dict) and isinstance(y, dict):
            out |= _diff(x, y, f"{prefix}{key}.")
        elif x != y:
            out.add(prefix + key)
    return out


@pytest.mark.parametrize("extra", ["", "smoke", "full", "rounds=2"])
def test_flawed_demos_changes_only_demonstrations_and_kl_control(extra):
    base = _config(f"{extra},near_perfect" if extra else "near_perfect")  # fixed beta
    flawed = _config(f"{extra},flawed_demos" if extra else "flawed_demos")
    ppo_stages = ["ppo", "ppo_ptx"]
    ppo_stages += {"full": ["ppo_large", "ppo_ptx_large"], "rounds=2": ["ppo_1"]}.get(extra, [])
    kl_keys = ("adaptive_kl", "kl_target", "kl_horizon")
    want = {"world.demo_error_rate", "world.demo_slips"}
    want |= {f"{stage}.{key}" for stage in ppo_stages for key in kl_keys}
    assert _diff(flawed.to_dict(), base.to_dict()) == want
    assert (flawed.world.demo_error_rate, flawed.world.demo_slips) == (0.5, "filler")
    for stage in ppo_stages:
        assert flawed[stage].adaptive_kl and flawed[stage].kl_target == 1.5, stage
        assert flawed[stage].kl_coef == base[stage].kl_coef  # the controller's starting beta
        assert not base[stage].adaptive_kl, stage
    if "ppo_gold" in flawed:  # the oracle stays at the paper's fixed beta
        assert not flawed.ppo_gold.adaptive_kl


@pytest.mark.parametrize("extra", ["", "smoke", "full", "rounds=2"])
def test_default_world_is_visible_flaws_and_near_perfect_differs_only_in_the_world(extra):
    import importlib.util

    spec = importlib.util.spec_from_file_location("tiny_instructgpt_for_test", EXPERIMENT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    base = _config(extra)
    near = _config(f"{extra},near_perfect" if extra else "near_perfect")
    zero = _config(f"{extra},visible_flaws=0" if extra else "visible_flaws=0")
    assert (base.world.demo_error_rate, base.world.demo_slips) == (
        module.VISIBLE_FLAW_RATE,
        "visible",
    )
    assert 0.0 < module.VISIBLE_FLAW_RATE <= 1.0
    assert (near.world.demo_error_rate, near.world.demo_slips) == (0.1, "random")
    # the visible-flaws world also puts its PPO stages (the oracle aside) on the adaptive KL
    # controller, chosen on dev (docs/log.md); everything else is the near-perfect world
    controlled = [s for s in ("ppo", "ppo_ptx", "ppo_1", "ppo_large", "ppo_ptx_large") if s in base]
    keys = ("adaptive_kl", "kl_target", "kl_horizon")
    expected = {"world.demo_error_rate", "world.demo_slips"}
    expected |= {f"{stage}.{key}" for stage in controlled for key in keys}
    assert _diff(near.to_dict(), base.to_dict()) == expected
    for stage in controlled:
        assert (base[stage].adaptive_kl, base[stage].kl_target, base[stage].kl_horizon) == (
            True,
            1.5,
            100.0,
        ), stage
        assert not near[stage].adaptive_kl, stage
    assert not base.ppo_gold.adaptive_kl if "ppo_gold" in base else True
    assert near.to_dict() == zero.to_dict()
    with pytest.raises(config_lib.ConfigError, match="exclude each other"):
        _config(f"{extra},near_perfect,flawed_demos" if extra else "near_perfect,flawed_demos")


@pytest.mark.parametrize("smoke", [False, True], ids=["default", "smoke"])
def test_full_large_model_is_8x_small(smoke):
    full = _config("smoke,full" if smoke else "full")
    small, large = _model_config(full, "pretrain"), _model_config(full, "pretrain_large")
    n_small, n_large = _param_count(small), _param_count(large)
    if smoke:  # large = the "small" shape, small = "tiny"
        assert (large.num_layers, large.d_model) == (2, 64)
        assert (small.num_layers, small.d_model) == (1, 32)
        assert n_large > n_small
    else:
        assert n_large >= 8 * n_small, (n_small, n_large)
    # the sizes differ in shape only: same vocabulary, context and architecture
    for key in ("vocab_size", "max_len", "position", "norm", "mlp", "tie_embeddings", "dtype"):
        assert getattr(small, key) == getattr(large, key), key


# ---------------------------------------------------------------- end to end
def _check_eval(workdir: str) -> dict:
    """The eval stage's outputs of a `smoke,full` run; returns results.json."""
    out = os.path.join(workdir, "eval")
    with open(os.path.join(out, "results.json")) as f:
        results = json.load(f)
    assert results["reference"]["stage"] == "sft_large"
    models = results["models"]
    assert [(m["size"], m["label"]) for m in models] == [
        (size, label) for size in ("small", "large") for label in LABELS
    ]
    params = results["sizes"]["params"]
    assert list(params) == ["small", "large"] and params["large"] > params["small"] > 0
    for m in models:
        assert m["params"] == params[m["size"]], m["stage"]
        assert 0 <= m["win_rate"] <= 1 and m["stderr"] is not None, m["stage"]
        assert m["n"] == results["settings"]["num_prompts"] > 1
    # the reference against itself: independent samples of one model, so 1/2 up to noise
    # (exactly 1/2 with stderr 0 when every gold comparison ties)
    (ref,) = [m for m in models if m["stage"] == "sft_large" and m["label"] == "SFT"]
    assert abs(ref["win_rate"] - 0.5) <= 4 * ref["stderr"] + 0.02, ref

    with open(os.path.join(out, "results.md")) as f:
        md = f.read()
    header = next(line for line in md.splitlines() if line.startswith("| model |"))
    cells = [c.strip() for c in header.strip("|").split("|")]
    assert len(cells) == 3 and cells[1].startswith("small (") and cells[2].startswith("large (")
    for label in LABELS:  # a row per model type, a win rate in each size column
        row = next(line for line in md.splitlines() if line.startswith(f"| {label} |"))
        assert row.count("±") == 2, row
    png = os.path.join(out, "win_rate.png")
    assert "win_rate.png" in results["plots"]
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.path.getsize(png) > 1000
    return results


def _rerun(name: str) -> bool:
    """Whether the reuse run must run stage `name` (the folders it does not get)."""
    return name == "eval" or name.endswith("_large")


@pytest.mark.slow
@pytest.mark.xdist_group("smoke_full")
def test_smoke_full_end_to_end_and_reuse(smoke_full, tmp_path):
    first, cache = smoke_full.workdir, smoke_full.cache  # the first run: tests/e2e/conftest.py
    stages = config_lib.stage_names(_config("smoke,full"))
    for name in stages:
        assert os.path.exists(os.path.join(first, name, "DONE")), f"{name}: no DONE"
    results = _check_eval(first)

    # reuse: a copy without eval/ and the large stages trains only the large models
    second = str(tmp_path / "second")
    shutil.copytree(
        first, second, ignore=lambda d, names: [n for n in names if d == first and _rerun(n)]
    )
    log = run_experiment("smoke,full", second, cache)
    for name in stages:
        skipped = f"stage {name}: finished earlier, skipped" in log
        started = f"stage {name} (" in log
        assert (skipped, started) == (not _rerun(name), _rerun(name)), (
            f"stage {name}: {skipped=} {started=}"
        )
        assert os.path.exists(os.path.join(second, name, "DONE")), f"{name}: no DONE"
    for name in stages:  # the small stages' folders are untouched
        if not _rerun(name):
            assert tree_digest(os.path.join(second, name)) == tree_digest(
                os.path.join(first, name)
            ), f"stage {name} changed"
    again = _check_eval(second)
    # The pipeline is deterministic (same seeds, same programs), so retraining the large
    # models reproduces the first run's results exactly, small and large.
    assert again["models"] == results["models"]
