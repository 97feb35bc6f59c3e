"""Tables and plots of the `eval` stage (instructrl/eval/plots.py), from a hand-made summary."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from instructrl.errors import InputError
from instructrl.eval import plots as eval_plots
from instructrl.world import FAMILY_NAMES


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


def test_results_markdown_shows_visible_flaws_only_when_seen():
    summary = _fake_summary()
    assert "## Visible flaws" not in eval_plots.results_markdown(summary)  # older results
    zero = dict.fromkeys(("filler", "hedge", "ramble"), 0.0)
    for m in [summary["reference"], *summary["models"]]:
        m["flaws"] = dict(zero)
    assert "## Visible flaws" not in eval_plots.results_markdown(summary)  # none seen
    summary["reference"]["flaws"] = {"filler": 0.1, "hedge": 0.125, "ramble": 0.0}
    summary["models"][3]["flaws"] = {"filler": 0.0, "hedge": 0.02, "ramble": 0.0}
    md = eval_plots.results_markdown(summary)
    assert "## Visible flaws" in md and "| model | filler | hedge | ramble |" in md
    assert "| sft_large (reference) | 0.100 | 0.125 | 0.000 |" in md
    assert "| PPO [small (1K)] | 0.000 | 0.020 | 0.000 |" in md


def test_frontier_names_a_far_base_model_instead_of_drawing_it(tmp_path):
    from instructrl.eval import frontier

    def model(label, kl, win, fewshot=False):
        return dict(label=label, kl_to_reference=kl, win_rate=win, stderr=0.01, fewshot=fewshot)

    models = [model("GPT", 82.0, 0.19), model("SFT", 0.0, 0.48), model("PPO", 1.4, 0.62)]
    models += [model("DPO", 1.3, 0.62), model("GPT (prompted)", None, 0.35, fewshot=True)]
    bon = dict(kl=[0.0, 0.19, 0.64], curves=[])
    drawn, off = frontier.frontier_points(dict(models=models, best_of_n=bon))
    assert [m["label"] for m in drawn] == ["SFT", "PPO", "DPO"]
    assert [m["label"] for m in off] == ["GPT"]
    # nothing far away: everything is drawn (a KL of 3 is within 4x of 1.4)
    drawn, off = frontier.frontier_points(dict(models=[*models[1:3], model("RLOO", 3.0, 0.6)]))
    assert len(drawn) == 3 and not off
    path = str(tmp_path / "frontier.png")
    assert frontier.plot_frontier(dict(models=models, best_of_n=bon), path)
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
