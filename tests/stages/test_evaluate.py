"""Tests for the `eval` stage (instructrl/stages/evaluate.py) and its tables/plots (eval_plots.py).

Fast: win-rate aggregation against hand computations and the gold judge, the constraint
check, held-out NLL against a naive float64 loop, config parsing and stage errors, tables
and PNGs from a hand-made summary. Slow (one module fixture runs world, tokenizer, pretrain
and SFT with a 1-layer model in-process, then fakes finished rm/collect/ppo stages): the
stage end to end, SFT against itself, greedy determinism.
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
from PIL import Image

from instructrl import world
from instructrl.errors import ConfigError, InputError
from instructrl.eval import judge
from instructrl.eval import metrics as eval_metrics
from instructrl.eval import plots as eval_plots
from instructrl.models import ModelConfig, Transformer, positions_from_mask
from instructrl.stages import evaluate
from instructrl.world import FAMILY_NAMES, labelers, make_prompt, score, synthetic_responses


# ------------------------------------------------------------------ win rates
def test_pairwise_outcomes_by_hand():
    model = np.array([[1.0, 0.5], [0.0, 0.0]])
    ref = np.array([[0.5, 0.5, 0.0], [0.0, 0.2, 0.0]])
    # prompt 0: 1 beats all three (3), 0.5 ties two and beats one (0.5 + 0.5 + 1) -> 5/6
    # prompt 1: 0 ties 0 twice and loses to 0.2, for both samples -> (0.5 + 0 + 0.5) / 3
    np.testing.assert_allclose(eval_metrics.pairwise_outcomes(model, ref), [5 / 6, 1 / 3])
    out = eval_metrics.win_rate([1.0, 0.0, 0.5, 0.5])
    assert out["win_rate"] == 0.5 and out["n"] == 4
    # sample std (ddof 1) of (1, 0, .5, .5) is sqrt(0.5 / 3); stderr divides by sqrt(4)
    assert out["stderr"] == pytest.approx(np.sqrt(0.5 / 3) / 2)
    assert eval_metrics.win_rate([0.5])["stderr"] is None


def test_pairwise_outcomes_match_gold_judge_loop():
    rng = np.random.default_rng(0)
    records = [make_prompt(rng) for _ in range(30)]
    got_m, got_r, expected = [], [], []
    for r in records:
        m, ms = synthetic_responses(r, 3, rng)
        f, fs = synthetic_responses(r, 2, rng)
        m[1] = f[0]  # an identical response: the judge must call it a tie
        ms[1] = fs[0]
        got_m.append([score(r, t, s) for t, s in zip(m, ms, strict=True)])
        got_r.append([score(r, t, s) for t, s in zip(f, fs, strict=True)])
        pairs = [
            labelers.gold_compare(r, a, b, sa, sb)
            for (a, sa), (b, sb) in itertools.product(
                zip(m, ms, strict=True), zip(f, fs, strict=True)
            )
        ]
        expected.append(sum(pairs) / len(pairs))
    np.testing.assert_allclose(eval_metrics.pairwise_outcomes(got_m, got_r), expected)


def test_ranking_accuracy_matches_a_pair_loop():
    """RM-vs-gold accuracy: pairs of one prompt with different gold scores; equal RM scores
    count 1/2; gold ties and other prompts' responses never pair."""
    rng = np.random.default_rng(1)
    for n, k in ((1, 2), (7, 4), (20, 6)):
        gold = rng.choice([0.0, 0.2, 0.5, 1.0], size=(n, k))
        rm = rng.choice([-1.0, 0.0, 0.3, 2.0], size=(n, k))  # few values: RM ties happen
        credit = []
        for i in range(n):
            for a in range(k):
                for b in range(a + 1, k):
                    if gold[i, a] == gold[i, b]:
                        continue
                    if rm[i, a] == rm[i, b]:
                        credit.append(0.5)
                    else:
                        credit.append(float((rm[i, a] > rm[i, b]) == (gold[i, a] > gold[i, b])))
        got, pairs = eval_metrics.ranking_accuracy(rm, gold)
        assert pairs == len(credit)
        assert got == (pytest.approx(np.mean(credit)) if credit else None)
    assert eval_metrics.ranking_accuracy(np.zeros((3, 2)), np.ones((3, 2))) == (None, 0)
    assert eval_metrics.ranking_accuracy([[1.0, 0.0]], [[0.0, 1.0]]) == (0.0, 1)


def test_best_of_n_matches_enumerating_every_draw():
    """The closed-form best-of-n expectation against a loop over all C(S, n) draws, with tied
    selector scores (ties go to the lowest index) and tied gold scores."""
    rng = np.random.default_rng(0)
    num, s, m = 5, 7, 3
    selector = rng.integers(0, 4, size=(num, s)).astype(np.float64)  # many ties
    gold = rng.integers(0, 3, size=(num, s)) / 2.0
    ref = rng.integers(0, 3, size=(num, m)) / 2.0
    for n in range(1, s + 1):
        got = eval_metrics.best_of_n_outcomes(selector, gold, ref, n)
        for i in range(num):
            total, draws = 0.0, 0
            for subset in itertools.combinations(range(s), n):
                pick = max(subset, key=lambda j: (selector[i, j], -j))
                g = gold[i, pick]
                total += np.mean([1.0 if g > r else 0.5 if g == r else 0.0 for r in ref[i]])
                draws += 1
            np.testing.assert_allclose(got[i], total / draws, rtol=0, atol=1e-12)
    # n = 1 is the plain win rate of the samples; n = S always keeps the selector's best
    np.testing.assert_allclose(
        eval_metrics.best_of_n_outcomes(selector, gold, ref, 1),
        eval_metrics.pairwise_outcomes(gold, ref),
        atol=1e-12,
    )
    best = np.array([max(range(s), key=lambda j: (selector[i, j], -j)) for i in range(num)])
    np.testing.assert_allclose(
        eval_metrics.best_of_n_outcomes(selector, gold, ref, s),
        eval_metrics.pairwise_outcomes(gold[np.arange(num), best][:, None], ref),
        atol=1e-12,
    )
    with pytest.raises(ValueError, match="n=8"):
        eval_metrics.best_of_n_outcomes(selector, gold, ref, s + 1)
    assert eval_metrics.best_of_n_kl(1) == 0.0
    np.testing.assert_allclose(eval_metrics.best_of_n_kl(4), np.log(4) - 0.75)


def test_constraints_kept():
    one = {"family": "one_word", "params": {}}
    assert eval_metrics.constraints_kept(one, " owl")
    assert not eval_metrics.constraints_kept(one, " the owl")
    assert not eval_metrics.constraints_kept(one, " owl\nInstruction: more")  # kept talking
    assert not eval_metrics.constraints_kept(one, " owl", stopped=False)
    limit = {"family": "word_limit", "params": {"limit": 3}}
    assert eval_metrics.constraints_kept(limit, " it is green")
    assert not eval_metrics.constraints_kept(limit, " the frog is green")
    assert not eval_metrics.constraints_kept(limit, "")
    lst = {
        "family": "list",
        "params": {"category": "animals", "k": 2, "limit": None, "exclude": "cat"},
    }
    assert eval_metrics.constraints_kept(lst, " dog cow")
    assert not eval_metrics.constraints_kept(lst, " dog cat")
    assert not eval_metrics.constraints_kept(lst, " dog cow pig")
    odd = {"family": "list", "params": {"category": "odd", "k": 2, "limit": 9, "exclude": None}}
    assert eval_metrics.constraints_kept(odd, " 1 3")
    assert not eval_metrics.constraints_kept(odd, " 1 11")
    assert eval_metrics.constraints_kept({"family": "reverse", "params": {}}, " a b") is None


# ------------------------------------------------------------------ alignment tax: NLL
def _log_softmax64(logits: np.ndarray) -> np.ndarray:
    top = logits.max(-1, keepdims=True)
    return logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))


def test_batched_nll_matches_naive_float64():
    cfg = ModelConfig(vocab_size=50, max_len=16, num_layers=1, d_model=32, num_heads=2, d_ff=64)
    model = Transformer(cfg)
    dummy = jnp.zeros((1, 4), jnp.int32)
    params = jax.jit(model.init)(jax.random.key(0), dummy, dummy, jnp.ones_like(dummy))["params"]
    forward = jax.jit(lambda t, m: model.apply({"params": params}, t, positions_from_mask(m), m))
    rng = np.random.default_rng(1)
    rows = [list(rng.integers(1, 50, size=n)) for n in (2, 5, 17, 9, 3)]  # 17 = max_len + 1
    first = [1, 1, 4, 2, 2]
    sums, counts = eval_metrics.batched_nll(model, params, rows, first, pad_id=0, batch_size=2)
    for row, f, s, c in zip(rows, first, sums, counts, strict=True):
        tokens = jnp.asarray([row[:-1]], jnp.int32)
        mask = jnp.ones_like(tokens)
        logits = np.asarray(forward(tokens, mask), np.float64)[0]
        logp = _log_softmax64(logits)
        naive = -sum(logp[t - 1, row[t]] for t in range(f, len(row)))
        assert c == len(row) - f
        assert s == pytest.approx(naive, rel=1e-5, abs=1e-4)


def test_text_windows_predict_every_token_once():
    ids = list(range(100, 123))  # 23 tokens -> 22 targets
    for window in (4, 5, 22, 30):
        rows = eval_metrics.text_windows(ids, window)
        assert all(len(r) <= window + 1 for r in rows)
        targets = [t for r in rows for t in r[1:]]
        assert targets == ids[1:]


# ------------------------------------------------------------------ config and errors
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
    for bad in ("", "SFT", "SFT=sft:greedy", "a=sft,a=pretrain", ": SFT=sft"):
        with pytest.raises(ConfigError, match=r"eval\.models"):
            evaluate.parse_models(bad, "eval.models")


def _config(stages: str, models: str, **eval_keys) -> ml_collections.ConfigDict:
    from experiments import tiny_instructgpt

    config = tiny_instructgpt.get_config("smoke")
    config.stages = stages
    config.eval = evaluate.default_config()
    config.eval.update(models=models, **eval_keys)
    return config


def test_missing_stage_is_a_clear_error(tmp_path):
    workdir = str(tmp_path)
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


# ------------------------------------------------------------------ tables and plots
def _fake_summary() -> dict:
    models = []
    for size, params in (("small", 1000), ("large", 9000)):
        for i, label in enumerate(("GPT", "GPT (prompted)", "SFT", "PPO")):
            fewshot = label == "GPT (prompted)"
            wr = 0.2 + 0.1 * i + (0.1 if size == "large" else 0.0)
            models.append(
                {
                    "size": size,
                    "label": label,
                    "stage": f"{label.lower()[:3]}_{size}",
                    "fewshot": fewshot,
                    "params": params,
                    "win_rate": wr,
                    "stderr": 0.05,
                    "n": 9,
                    "gold_score": wr,
                    "perfect_rate": 0.1,
                    "constraint_rate": 0.4,
                    "stopped_rate": 0.9,
                    "length_words": 3.0,
                    "length_tokens": 5.0,
                    "families": {f: {"win_rate": wr, "stderr": None, "n": 1} for f in FAMILY_NAMES},
                    "heldout_nll": None if fewshot else 2.5,
                    "public_task_accuracy": None if fewshot else 0.5,
                    "public_choice_accuracy": None if fewshot else 0.75,
                }
            )
    return {
        "reference": {
            "stage": "sft_large",
            "gold_score": 0.5,
            "perfect_rate": 0.2,
            "stopped_rate": 0.9,
        },
        "settings": {
            "num_prompts": 9,
            "num_samples": 2,
            "temperature": 1.0,
            "greedy": False,
            "families": list(FAMILY_NAMES),
        },
        "models": models,
        "reward_models": [{"stage": "rm", "val_accuracy": 0.7}],
        "labelers": [{"stage": "collect", "inter_labeler_agreement": 0.72}],
        "paper": {"rm_accuracy": 0.72, "inter_labeler_agreement": 0.726},
        "ppo": [],
    }


def _ppo_rows(n: int = 12, gold_every: int = 3) -> list[dict]:
    rows = []
    for s in range(1, n + 1):
        row = {"step": s, "score": 0.1 * s, "kl": 0.4 * s, "beta": 0.02, "score_raw": 9.0}
        if s % gold_every == 0:
            row["eval/gold_score"] = 0.5 + 0.05 * s - 0.005 * s * s
        rows.append(row)
    return rows


def _assert_png(path: str) -> None:
    with Image.open(path) as image:
        image.verify()
        assert image.format == "PNG" and min(image.size) > 100


def test_tables_and_plots_from_a_summary(tmp_path):
    summary = _fake_summary()
    runs = {"PPO_small": _ppo_rows(), "ppo_large": _ppo_rows(gold_every=100)}
    summary["ppo"] = eval_plots.ppo_summaries(runs)
    assert summary["ppo"][0]["kl"] == pytest.approx(4.8)
    assert summary["ppo"][0]["gold_score"] == pytest.approx(0.5 + 0.6 - 0.72)
    assert summary["ppo"][0]["score"] == pytest.approx(1.2)  # "score_raw" is not "score"
    assert summary["ppo"][1]["gold_score"] is None
    written = eval_plots.write_plots(summary, runs, str(tmp_path))
    assert written == [
        "win_rate.png",
        "win_rate_by_family.png",
        "ppo_training.png",
        "overoptimization.png",
    ]
    for name in written:
        _assert_png(str(tmp_path / name))
    table = eval_plots.main_table(summary)
    assert "| model | small (1K) | large (9K) |" in table
    assert "| GPT (prompted) | 0.300 ± 0.050 | 0.400 ± 0.050 |" in table
    md = eval_plots.results_markdown(summary)
    for heading in (
        "Win rate by family",
        "constraints",
        "Alignment tax",
        "inter-labeler",
        "PPO training",
    ):
        assert heading in md
    assert "GPT (prompted) [small (1K)]" not in md.split("## Alignment tax")[1]  # same model


def test_trailing_mean():
    x = np.arange(1.0, 21.0)  # window 2 for 20 values
    np.testing.assert_allclose(eval_plots.trailing_mean(x), [1.0, *(x[1:] - 0.5)])
    np.testing.assert_allclose(eval_plots.trailing_mean(x[:5]), x[:5])  # window 1


def test_plots_without_ppo_and_json_safe(tmp_path):
    summary = _fake_summary()
    assert eval_plots.write_plots(summary, {}, str(tmp_path)) == [
        "win_rate.png",
        "win_rate_by_family.png",
    ]
    safe = eval_plots.json_safe({"a": float("nan"), "b": np.float32(0.5), "c": [np.int64(3)]})
    assert json.dumps(safe, allow_nan=False) == '{"a": null, "b": 0.5, "c": [3]}'
    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 1, "kl": 0.1}\n{"step": 2,\n')
    with pytest.raises(InputError, match=r"m.jsonl:2: not valid JSON"):
        eval_plots.read_metrics(str(path))


# ------------------------------------------------------------------ the stage end to end
@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """world, tokenizer, pretrain, sft (1-layer d32 model, a few steps) run in-process; then
    finished rm / collect / ppo stages faked: result files, and the SFT export as `ppo`."""
    from experiments import tiny_instructgpt
    from instructrl import main

    root = str(tmp_path_factory.mktemp("eval"))
    config = tiny_instructgpt.get_config("smoke")
    config.stages = "world,tokenizer,pretrain,sft"
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


# ------------------------------------------------------------------ one flaw removed
def test_fillers_dropped_matches_a_pair_loop():
    """The reference's samples without trailing fillers against the samples as they are:
    every pair of one prompt judged by the gold scorer, ties 1/2, one prompt at a time."""
    rng = np.random.default_rng(3)
    records = [world.make_prompt(rng, family) for family in FAMILY_NAMES for _ in range(3)]
    texts, stopped = [], []
    for r in records:
        answer = " " + world.gold_answer(r, rng)
        row = [answer, answer + " ok", answer + " thanks so", " so", answer + " oops"]
        texts.append([row[i] for i in rng.permutation(5)[:4]])
        stopped.append([bool(x) for x in rng.integers(0, 2, 4)] if r is records[0] else [True] * 4)
    ref = judge.gold_scores(records, texts, stopped)
    got = judge.fillers_dropped(records, texts, stopped, ref)

    per_prompt, changed = [], 0
    for r, ts, ss, ref_row in zip(records, texts, stopped, ref, strict=True):
        outcomes = []
        for t, s in zip(ts, ss, strict=True):
            kept = t
            for _ in range(3):
                words = kept.split(" ")
                if len([w for w in words if w]) > 1 and words[-1] in world.FILLERS:
                    kept = " ".join(words[:-1])
            changed += kept != t
            mine = world.score(r, kept, s)
            outcomes += [1.0 if mine > o else 0.5 if mine == o else 0.0 for o in ref_row]
        per_prompt.append(np.mean(outcomes))
    assert got["rate"] == pytest.approx(changed / (4 * len(records)))
    assert 0.2 < got["rate"] < 0.8
    assert got["win_rate"] == pytest.approx(np.mean(per_prompt))
    assert got["stderr"] == pytest.approx(np.std(per_prompt, ddof=1) / np.sqrt(len(per_prompt)))
    assert got["win_rate"] > 0.55  # dropping a filler never lowers a gold score here
    assert got["n"] == len(records)

    # No filler anywhere: nothing changes, exactly 1/2, and no line in the tables.
    flat = [[" " + world.gold_answer(r)] * 2 for r in records]
    ok = [[True] * 2] * len(records)
    none = judge.fillers_dropped(records, flat, ok, judge.gold_scores(records, flat, ok))
    assert none["rate"] == 0.0 and none["win_rate"] == 0.5
    assert eval_plots.fillers_dropped_line({"stage": "sft", "fillers_dropped": none}) == ""
    assert eval_plots.fillers_dropped_line({"stage": "sft"}) == ""  # results before this
    line = eval_plots.fillers_dropped_line({"stage": "sft", "fillers_dropped": got})
    assert line.startswith(f"sft with its trailing filler words dropped ({got['rate']:.1%} ")
    summary = _fake_summary()
    summary["reference"]["fillers_dropped"] = got
    md = eval_plots.results_markdown(summary)
    assert line.replace("sft", "sft_large") in md
    assert "trailing filler" not in eval_plots.results_markdown(_fake_summary())


def test_drop_trailing_fillers_cases():
    cases = {
        " pink pink ok": " pink pink",
        " pink thanks so": " pink",
        " ok": " ok",  # the first word stays
        " ok ok": " ok",
        " so pink": " so pink",
        " pink ok\nInstruction: x": " pink ok\nInstruction: x",
        " pink okay": " pink okay",
        "": "",
        " ": " ",
    }
    for text, want in cases.items():
        assert world.drop_trailing_fillers(text) == want, text
