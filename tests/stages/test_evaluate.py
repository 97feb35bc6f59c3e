"""Tests for the `eval` stage (instructrl/stages/evaluate.py).

Fast: config parsing and stage errors. Slow (one module fixture runs world, tokenizer,
pretrain and SFT with a 1-layer model in-process, then fakes finished rm/collect/ppo stages):
the stage end to end, SFT against itself, greedy determinism. The numbers it reports are
checked in tests/unit/test_eval_metrics.py, its tables and plots in test_eval_plots.py.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from instructrl import chat_format
from instructrl.errors import ConfigError, InputError
from instructrl.eval import plots as eval_plots
from instructrl.models import ModelConfig, Transformer, positions_from_mask
from instructrl.stages import evaluate
from instructrl.world import FAMILY_NAMES
from tests.unit.test_eval_metrics import _log_softmax64
from tests.unit.test_eval_plots import _assert_png, _ppo_rows


# ------------------------------------------------------------------ config and errors
def test_response_rows_are_what_the_sampler_scored():
    class Tok:
        bos_id, eos_id = 1, 2

        def encode(self, text):
            return [ord(ch) for ch in text]

    rows, first = evaluate.response_rows(
        chat_format.ChatFormat(Tok()), ["ab", "c"], [[[5], [6, 7]], [[]]], [[True, False], [True]]
    )
    assert rows == [[1, 97, 98, 5, 2], [1, 97, 98, 6, 7], [1, 99, 2]] and first == [3, 3, 2]


def test_parse_models():
    specs = evaluate.parse_models(
        "small: GPT=pretrain, GPT (prompted)=pretrain:fewshot, SFT=sft; large: SFT=sft_large",
        "eval.models",
    )
    assert [(s.size, s.label, s.stage, s.fewshot) for s in specs] == [
        ("small", "GPT", "pretrain", False),
        ("small", "GPT (prompted)", "pretrain", True),
        ("small", "SFT", "sft", False),
        ("large", "SFT", "sft_large", False),
    ]
    assert evaluate.parse_models("SFT=sft", "k")[0].size == ""
    # The list form (the experiment's): an entry without a size tag joins the size before it.
    listed = evaluate.parse_models(
        [
            "small: GPT=pretrain",
            "GPT (prompted)=pretrain:fewshot",
            "SFT=sft",
            "large: SFT=sft_large",
        ],
        "eval.models",
    )
    assert listed == specs
    # A command-line override arrives as the comma-split list of the string form.
    split = "small: GPT=pretrain, GPT (prompted)=pretrain:fewshot, SFT=sft; large: SFT=sft_large"
    assert evaluate.parse_models(split.split(","), "eval.models") == specs
    assert len(evaluate.parse_models(["SFT=sft", ""], "k")) == 1  # empty entries skipped
    for bad in ("", "SFT", "SFT=sft:greedy", "a=sft,a=pretrain", ": SFT=sft", [], ["a: "]):
        with pytest.raises(ConfigError, match=r"eval\.models"):
            evaluate.parse_models(bad, "eval.models")


def _config(stages: str, models: str, **eval_keys) -> ml_collections.ConfigDict:
    from experiments import tiny_instructgpt

    config = tiny_instructgpt.get_config("smoke")
    config.stages = stages.split(",")
    config.eval = evaluate.default_config()
    config.eval.update(models=models.split(","), **eval_keys)
    return config


def test_missing_stage_is_a_clear_error(tmp_path):
    workdir = str(tmp_path)
    with pytest.raises(
        ConfigError, match=r"^config key 'eval.split' must be one of \('dev', 'test'\)"
    ):
        evaluate.run(_config("sft,eval", "SFT=sft", split="train"), "eval", workdir)
    c = evaluate.default_config()
    assert evaluate.prompt_files(c, "eval") == (
        "@world/prompts_dev.jsonl",
        "@world/prompts_dev_fewshot.jsonl",
    )
    c.update(split="test", prompts="mine.jsonl")
    assert evaluate.prompt_files(c, "eval") == ("mine.jsonl", "@world/prompts_test_fewshot.jsonl")
    with pytest.raises(ConfigError, match=r"'eval.rm_from' names stage 'rm', which is not in "):
        evaluate.run(_config("sft,eval", "SFT=sft"), "eval", workdir)
    no_rm = dict(rm_from="", collect_from="")
    with pytest.raises(ConfigError, match=r"'eval.models' names stage 'ppo_xl'.*no config"):
        evaluate.run(_config("sft,eval", "SFT=sft,PPO-xl=ppo_xl", **no_rm), "eval", workdir)
    with pytest.raises(ConfigError, match=r"'eval.models'.*'collect'.*not in config.stages"):
        evaluate.run(_config("sft,eval", "X=collect", **no_rm), "eval", workdir)
    with pytest.raises(ConfigError, match=r"'eval.best_of_n_from' names stage 'sft_xl'"):
        evaluate.run(
            _config("sft,eval", "SFT=sft", best_of_n_from="sft_xl", **no_rm), "eval", workdir
        )
    with pytest.raises(ConfigError, match=r"'eval.models': stage 'sft' runs after 'eval'"):
        evaluate.run(_config("eval,sft", "SFT=sft", **no_rm), "eval", workdir)
    with pytest.raises(InputError, match=r"'eval.models': stage 'sft' has not finished"):
        evaluate.run(_config("sft,eval", "SFT=sft", **no_rm), "eval", workdir)
    os.makedirs(tmp_path / "sft")
    (tmp_path / "sft" / "DONE").write_text("{}")
    with pytest.raises(InputError, match=r"'eval.reference': stage 'pretrain' has not finished"):
        evaluate.run(
            _config("pretrain,sft,eval", "SFT=sft", reference="pretrain", **no_rm), "eval", workdir
        )


# ------------------------------------------------------------------ the stage end to end
@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """world, tokenizer, pretrain, sft (1-layer d32 model, a few steps) run in-process; then
    finished rm / collect / ppo stages faked: result files, and the SFT export as `ppo`."""
    from experiments import tiny_instructgpt
    from instructrl import main

    root = str(tmp_path_factory.mktemp("eval"))
    config = tiny_instructgpt.get_config("smoke")
    config.stages = ["world", "tokenizer", "pretrain", "sft"]
    config.model.update(num_layers=1, d_model=32, num_heads=2, d_ff=64)
    config.world.update(
        num_pretrain=200,
        num_pretrain_heldout=6,
        num_demonstrations=120,
        num_rm=10,
        num_ppo=10,
        num_eval=18,
        num_public=36,
    )
    config.data.num_threads = 1
    config.pretrain.update(num_steps=8, log_every=4)
    config.sft.update(num_steps=8, log_every=4, select_by="last")
    main.run(config, root)
    shutil.copytree(os.path.join(root, "sft", "export"), os.path.join(root, "ppo", "export"))
    # A random-init scalar-head RM on the SFT shape (eval measures it against the gold judge)
    from flax.core.meta import unbox

    from instructrl.checkpoint import export_params, load_exported

    _, model_dict = load_exported(os.path.join(root, "sft", "export"))
    rm = Transformer(ModelConfig.from_dict(model_dict), head="scalar")
    x = jnp.ones((1, 8), jnp.int32)
    rm_params = unbox(rm.init(jax.random.key(3), x, positions_from_mask(x), x)["params"])
    export_params(rm_params, model_dict, os.path.join(root, "rm", "export"))
    with open(os.path.join(root, "ppo", "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in _ppo_rows())
    for stage, name, content in (
        ("rm", "results.json", {"val_accuracy": 0.66, "val_loss": 0.6}),
        ("collect", "labelers.json", {"inter_labeler_agreement": 0.73}),
        ("ppo", None, None),
    ):
        os.makedirs(os.path.join(root, stage), exist_ok=True)
        if name:
            with open(os.path.join(root, stage, name), "w") as f:
                json.dump(content, f)
        with open(os.path.join(root, stage, "DONE"), "w") as f:
            f.write("{}\n")
    return root


def _eval_config(models: str = "SFT=sft", **eval_keys) -> ml_collections.ConfigDict:
    config = _config("world,tokenizer,pretrain,sft,collect,rm,ppo,eval", models, **eval_keys)
    config.model.update(num_layers=1, d_model=32, num_heads=2, d_ff=64)
    config.ppo = ml_collections.ConfigDict({"kind": "ppo"})
    return config


def _naive_heldout_nll(workdir: str, stage: str, num_docs: int, window: int = 128) -> float:
    """Mean NLL per token of [BOS] text [EOS] over the first held-out documents. Target t
    is predicted from the tokens since the start of its window, ((t - 1) // window) * window;
    one unpadded forward pass per window, log-softmax in float64."""
    from instructrl.sample import load_stage_model
    from instructrl.tokenizer import Tokenizer

    model, params = load_stage_model(workdir, stage)
    tok = Tokenizer.load(os.path.join(workdir, "tokenizer", "tokenizer.model"))
    forward = jax.jit(lambda t, m: model.apply({"params": params}, t, positions_from_mask(m), m))
    with open(os.path.join(workdir, "world", "pretrain_heldout.jsonl")) as f:
        texts = [json.loads(line)["text"] for line in f][:num_docs]
    total, count = 0.0, 0
    for text in texts:
        ids = tok.encode(text, add_bos=True, add_eos=True)
        logp = {}
        for t in range(1, len(ids)):
            start = (t - 1) // window * window
            if start not in logp:
                tokens = jnp.asarray([ids[start : start + window]], jnp.int32)
                logits = forward(tokens, jnp.ones_like(tokens))
                logp[start] = _log_softmax64(np.asarray(logits, np.float64)[0])
            total -= logp[start][t - 1 - start, ids[t]]
            count += 1
    return total / count


def lines_of(out_dir: str) -> list[dict]:
    with open(os.path.join(out_dir, "samples.jsonl")) as f:
        return [json.loads(line) for line in f]


def _check_rm_gold_accuracy(workdir: str, rm_result: dict, samples: list[dict]) -> None:
    """The RM's accuracy vs gold on the reference samples, recomputed one pair at a time."""
    from instructrl.models.reward import RewardModel
    from instructrl.tokenizer import Tokenizer

    tok = Tokenizer.load(os.path.join(workdir, "tokenizer", "tokenizer.model"))
    rm = RewardModel.load(os.path.join(workdir, "rm", "export"), tok)
    credit = []
    for x in (x for x in samples if x["label"] == "reference"):
        k = len(x["responses"])
        raw = rm.score([x["prompt"]] * k, x["responses"], stopped=x["stopped"], raw=True)
        for a, b in itertools.combinations(range(k), 2):
            ga, gb = x["gold_scores"][a], x["gold_scores"][b]
            if ga != gb:
                same = (raw[a] > raw[b]) == (ga > gb)
                credit.append(0.5 if raw[a] == raw[b] else float(same))
    assert rm_result["gold_pairs"] == len(credit) > 0
    assert rm_result["gold_accuracy"] == pytest.approx(np.mean(credit))


@pytest.mark.slow
def test_eval_stage_end_to_end(workdir, capsys):
    models = "GPT=pretrain, GPT (prompted)=pretrain:fewshot, SFT=sft, PPO=ppo"
    config = _eval_config(models=models, num_samples=2, heldout_num=4, best_of_n=6)
    evaluate.run(config, "eval", workdir)
    out_dir = os.path.join(workdir, "eval")
    with open(os.path.join(out_dir, "results.json")) as f:
        results = json.load(f)
    by_label = {m["label"]: m for m in results["models"]}
    assert list(by_label) == ["GPT", "GPT (prompted)", "SFT", "PPO"]
    assert results["settings"]["split"] == "dev"  # the default: settings are chosen on dev
    for m in results["models"]:
        assert 0 <= m["win_rate"] <= 1 and m["stderr"] is not None and m["n"] == 18
        assert set(m["families"]) == set(FAMILY_NAMES)
        assert 0 <= m["stopped_rate"] <= 1 and m["length_tokens"] >= 0
    sft = by_label["SFT"]  # against itself (independent samples): 1/2 up to noise
    assert abs(sft["win_rate"] - 0.5) <= 4 * sft["stderr"] + 0.02
    naive = _naive_heldout_nll(workdir, "sft", 4, window=config.data.seq_len)
    assert sft["heldout_nll"] == pytest.approx(naive, rel=1e-5)
    assert 0 <= sft["public_choice_accuracy"] <= 1
    assert by_label["GPT (prompted)"]["heldout_nll"] is None  # the base model's tax is GPT's
    assert by_label["PPO"]["heldout_nll"] == pytest.approx(sft["heldout_nll"])  # same params
    # KL of each evaluated model to the reference on its own samples: 0 for the reference's
    # own params (SFT, and this PPO export, which has them), > 0 for the base model.
    assert abs(sft["kl_to_reference"]) < 1e-5 and abs(by_label["PPO"]["kl_to_reference"]) < 1e-5
    assert by_label["GPT"]["kl_to_reference"] > 0.01  # 0.086 here (SFT ran a few steps)
    assert by_label["GPT (prompted)"]["kl_to_reference"] is None
    assert results["reward_models"][0]["val_accuracy"] == 0.66
    _check_rm_gold_accuracy(workdir, results["reward_models"][0], lines_of(out_dir))
    assert results["labelers"][0]["inter_labeler_agreement"] == 0.73
    assert results["ppo"][0]["stage"] == "ppo" and results["ppo"][0]["kl"] == pytest.approx(4.8)
    for name in results["plots"]:
        _assert_png(os.path.join(out_dir, name))
    assert "overoptimization.png" in results["plots"] and "best_of_n.png" in results["plots"]
    bon = results["best_of_n"]
    assert bon["n"] == [1, 2, 4, 6] and bon["samples"] == 6
    assert bon["reference"] == bon["policy"] == "sft"
    np.testing.assert_allclose(bon["kl"], [np.log(n) - (n - 1) / n for n in bon["n"]])
    gold, rm = bon["curves"]
    assert gold["selector"] == "gold judge" and rm["selector"] == "RM rm"
    assert gold["win_rate"][0] == pytest.approx(rm["win_rate"][0])  # n = 1: no selection
    assert np.all(np.diff(gold["win_rate"]) >= -1e-12)  # the gold judge's pick never hurts
    assert all(0 <= w <= 1 for w in rm["win_rate"])
    with open(os.path.join(out_dir, "results.md")) as f:
        md = f.read()
    printed = capsys.readouterr().out
    assert "| model |" in printed and "| GPT (prompted) |" in printed
    assert eval_plots.main_table(results) in md and eval_plots.main_table(results) in printed
    assert "## Best-of-n" in md and "| RM rm |" in md
    assert "best-of-n from sft by RM rm, win rate vs sft: n=1 " in printed
    with open(os.path.join(out_dir, "samples.jsonl")) as f:
        lines = [json.loads(line) for line in f]
    assert len(lines) == 18 * 5 and all(len(x["responses"]) == 2 for x in lines)


@pytest.mark.slow
def test_greedy_self_comparison_is_exactly_half_and_deterministic(workdir):
    results = []
    for name in ("eval_a", "eval_b"):
        config = _eval_config(
            greedy=True, num_prompts=9, heldout_num=2, rm_from="", collect_from=""
        )
        config[name] = config.eval
        evaluate.run(config, name, workdir)
        with open(os.path.join(workdir, name, "results.json")) as f:
            results.append(json.load(f))
    (sft,) = results[0]["models"]
    assert sft["win_rate"] == 0.5 and sft["stderr"] == 0.0  # greedy: identical responses
    assert results[0]["models"] == results[1]["models"]
