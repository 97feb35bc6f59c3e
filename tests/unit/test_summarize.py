"""Tests for `python -m instructrl.summarize` (the eval results of several runs).

Synthetic results.json files in the layout instructrl/stages/evaluate.py writes, with known numbers:
means and sample sds against numpy float64, per-seed values in run order, missing fields,
the one-line errors (exit 2) through a real subprocess, and the PNG.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from instructrl import summarize
from instructrl.errors import InputError
from instructrl.eval import plots as eval_plots
from instructrl.eval import seeds
from tests.conftest import REPO, subprocess_env

# size -> params; label -> (stage, fewshot). "large" has no prompted GPT.
SIZES = {"small": 1_500, "large": 24_000}
FLAWS = ("filler", "hedge", "ramble")
MODELS = {
    "GPT": ("pretrain", False),
    "GPT (prompted)": ("pretrain", True),
    "SFT": ("sft", False),
    "PPO-ptx": ("ppo_ptx", False),
}
SEEDS = (3, 11, 7)


def _model(size: str, params: int, label: str, rng: np.random.Generator) -> dict:
    stage, fewshot = MODELS[label]
    stage += "_large" if size == "large" else ""

    def u() -> float:
        return float(rng.uniform(0.05, 0.95))

    return {
        "size": size,
        "label": label,
        "stage": stage,
        "fewshot": fewshot,
        "params": params,
        "max_new_tokens": 33,
        "win_rate": u(),
        "stderr": 0.01,
        "n": 40,
        "gold_score": u(),
        "perfect_rate": u(),
        "constraint_rate": u(),
        "constraint_responses": 60,
        "stopped_rate": u(),
        "length_words": 3.5,
        "length_tokens": 9.0,
        "families": {"sort": {"win_rate": u(), "stderr": 0.02, "n": 40, "gold_score": u()}},
        "heldout_nll": None if fewshot else 1 + u(),
        "heldout_tokens": None if fewshot else 1234,
        "public_task_accuracy": None if fewshot else u(),
        "public_choice_accuracy": None if fewshot else u(),
        "kl_to_reference": None if fewshot else 3 * u(),
        "flaws": {k: u() / 4 for k in FLAWS},
    }


def _results(seed: int, sizes=SIZES, reference: str = "sft_large") -> dict:
    rng = np.random.default_rng(seed)
    models = [
        _model(size, params, label, rng)
        for size, params in sizes.items()
        for label in MODELS
        if not (size == "large" and label == "GPT (prompted)")
    ]
    return {
        "reference": {
            "stage": reference,
            "n": 40,
            "gold_score": 0.3,
            "perfect_rate": 0.1,
            "constraint_rate": 0.5,
            "constraint_responses": 60,
            "stopped_rate": 0.99,
            "length_words": 3.0,
            "length_tokens": 8.0,
            "families": {},
            "flaws": {k: 0.1 * (i + 1) + seed / 100 for i, k in enumerate(FLAWS)},
        },
        "settings": {
            "num_prompts": 40,
            "num_samples": 4,
            "temperature": 1.0,
            "greedy": False,
            "seed": seed,
            "judge": "gold scores, ties 1/2",
            "families": ["sort"],
        },
        "sizes": eval_plots.size_params(models),
        "models": models,
        "reward_models": [{"stage": "rm", "val_loss": 0.6, "val_accuracy": _rate(rng)}],
        "labelers": [{"stage": "collect", "inter_labeler_agreement": _rate(rng), "noise": 0.05}],
        "paper": {"rm_accuracy": 0.72, "inter_labeler_agreement": 0.726},
        "ppo": [],
        "plots": ["win_rate.png"],
    }


def _rate(rng: np.random.Generator) -> float:
    return float(rng.uniform(0.5, 0.8))


def _write_run(root, name: str, results: dict, seed: int | None) -> str:
    run_dir = os.path.join(root, name)
    os.makedirs(os.path.join(run_dir, "eval"))
    with open(os.path.join(run_dir, "eval", "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    if seed is not None:
        with open(os.path.join(run_dir, "config.json"), "w") as f:
            json.dump({"seed": seed, "stages": "eval"}, f)
    return run_dir


@pytest.fixture
def three_runs(tmp_path) -> tuple[list[str], list[dict]]:
    results = [_results(s) for s in SEEDS]
    # Run 2 predates public_task_accuracy for small SFT and settings.seed (config.json has it;
    # run 1's config.json names another seed: settings.seed, what the eval ran with, wins);
    # run 3 has neither.
    del next(m for m in results[1]["models"] if m["label"] == "SFT" and m["size"] == "small")[
        "public_task_accuracy"
    ]
    del results[1]["settings"]["seed"], results[2]["settings"]["seed"]
    dirs = [
        _write_run(tmp_path, f"run{i}", r, [SEEDS[0] + 100, SEEDS[1], None][i])
        for i, r in enumerate(results)
    ]
    return dirs, results


def _model_of(results: dict, size: str, label: str) -> dict:
    return next(m for m in results["models"] if (m["size"], m["label"]) == (size, label))


def _value(results: dict, size: str, label: str, key: str):
    m = next(m for m in results["models"] if m["size"] == size and m["label"] == label)
    return m.get(key)


def _rows(text: str, header_start: str) -> dict[str, list[str]]:
    """The rows of the Markdown table whose header starts with `header_start`, by first cell."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    rows = {}
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        rows[cells[0]] = cells[1:]
    return rows


def _main(capsys, *argv: str) -> str:
    assert summarize.main(list(argv)) == 0
    return capsys.readouterr().out


# ------------------------------------------------------------------ statistics
def test_stat_against_numpy_and_missing_values():
    rng = np.random.default_rng(0)
    for n in (2, 3, 7):
        x = rng.normal(size=n)
        s = seeds.stat([*x, None])
        assert s.n == n and s.values[-1] is None
        assert s.mean == pytest.approx(np.mean(x), abs=1e-12)
        assert s.sd == pytest.approx(np.std(x, ddof=1), abs=1e-12)
    one = seeds.stat([None, 0.25])
    assert (one.mean, one.sd, one.n) == (0.25, None, 1)
    assert seeds.mean_sd_cell(one) == "0.250 ± — (1 run)"
    none = seeds.stat([None, None])
    assert (none.mean, none.sd, none.n) == (None, None, 0)


# ------------------------------------------------------------------ tables
def test_win_rate_table_means_sds_and_per_seed_order(three_runs, capsys):
    dirs, results = three_runs
    out = _main(capsys, *dirs)
    assert out.splitlines()[0] == "# 3 runs (seed 3, seed 11, seed ?), reference stage sft_large"
    rows = _rows(out, "| model | small")
    assert list(rows)[2:] == list(MODELS)  # after the header and |---| lines, in order
    assert (
        "| model | small (1.5K) | large (24K) | per seed (small (1.5K)) | per seed (large (24K)) |"
        in out.splitlines()
    )
    for label in MODELS:
        for j, size in enumerate(SIZES):
            if size == "large" and label == "GPT (prompted)":
                assert rows[label][j] == "—" and rows[label][2 + j] == "—"
                continue
            x = np.array([_value(r, size, label, "win_rate") for r in results], np.float64)
            assert rows[label][j] == f"{x.mean():.3f} ± {x.std(ddof=1):.3f} (3 runs)"
            assert rows[label][2 + j] == " / ".join(f"{v:.3f}" for v in x)

    # Another order of the runs: same means, per-seed values follow the new order.
    out = _main(capsys, dirs[2], dirs[0], dirs[1])
    assert out.splitlines()[0].startswith("# 3 runs (seed ?, seed 3, seed 11)")
    x = [_value(results[i], "small", "SFT", "win_rate") for i in (2, 0, 1)]
    assert _rows(out, "| model | small")["SFT"][2] == " / ".join(f"{v:.3f}" for v in x)


def test_metrics_table_means_and_missing_fields(three_runs, capsys):
    dirs, results = three_runs
    rows = _rows(_main(capsys, *dirs), "| model | gold score")
    keys = [k for k, _ in seeds.METRICS]
    for size, head in (("small", "small (1.5K)"), ("large", "large (24K)")):
        for label in MODELS:
            if size == "large" and label == "GPT (prompted)":
                assert f"{label} [{head}]" not in rows
                continue
            cells = rows[f"{label} [{head}]"]
            for key, cell in zip(keys, cells, strict=True):
                values = [_value(r, size, label, key) for r in results]
                present = np.array([v for v in values if v is not None], np.float64)
                nullable = ("heldout_nll", "public_task_accuracy", "kl_to_reference")
                if label == "GPT (prompted)" and key in nullable:
                    assert cell == ""  # null in every run: blank
                elif (size, label, key) == ("small", "SFT", "public_task_accuracy"):
                    assert len(present) == 2 and cell == f"{present.mean():.3f} (2/3)"
                else:
                    assert cell == f"{present.mean():.3f}"


def test_visible_flaws_table_means_over_runs(three_runs, capsys):
    dirs, results = three_runs
    rows = _rows(_main(capsys, *dirs), "| model | filler")
    ref = np.array([[r["reference"]["flaws"][k] for k in FLAWS] for r in results]).mean(0)
    assert rows["sft_large (reference)"] == [f"{x:.3f}" for x in ref]
    for size, head in (("small", "small (1.5K)"), ("large", "large (24K)")):
        for label in ("SFT", "PPO-ptx"):
            want = [
                np.mean([_model_of(r, size, label)["flaws"][k] for r in results]) for k in FLAWS
            ]
            assert rows[f"{label} [{head}]"] == [f"{x:.3f}" for x in want]


def test_rm_and_labeler_line(three_runs, capsys):
    dirs, results = three_runs
    out = _main(capsys, *dirs)
    rm = np.array([r["reward_models"][0]["val_accuracy"] for r in results])
    agree = np.array([r["labelers"][0]["inter_labeler_agreement"] for r in results])
    line = next(x for x in out.splitlines() if x.startswith("RM validation accuracy"))
    assert f"(rm): {rm.mean():.3f} ± {rm.std(ddof=1):.3f} (3 runs)" in line
    assert f"(collect): {agree.mean():.3f} ± {agree.std(ddof=1):.3f} (3 runs)" in line


def test_single_run_one_size_names_column_like_evaluate(tmp_path, capsys):
    results = _results(5, sizes={"": 1_500})
    for m in results["models"]:
        m["stage"] = m["stage"].removesuffix("_large")
    run = _write_run(tmp_path, "solo", results, seed=5)
    out = _main(capsys, run, f"--out={tmp_path / 'summary.md'}")
    assert out == (tmp_path / "summary.md").read_text()
    assert out.splitlines()[0] == "# 1 run (seed 5), reference stage sft_large"
    # evaluate's own table names the column the same way
    assert "| model | 1.5K params |" in eval_plots.main_table(results)
    rows = _rows(out, "| model | 1.5K params | per seed |")
    w = _value(results, "", "SFT", "win_rate")
    assert rows["SFT"] == [f"{w:.3f} ± — (1 run)", f"{w:.3f}"]


# ------------------------------------------------------------------ errors (subprocess)
def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "instructrl.summarize", *args],
        cwd=REPO,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )


def _one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


def test_cli_missing_results_json(three_runs, tmp_path):
    dirs, _ = three_runs
    empty = tmp_path / "not_evaluated"
    (empty / "eval").mkdir(parents=True)
    line = _one_line_error(_cli(dirs[0], str(empty)))
    assert line == f"error: {empty}/eval/results.json: not found (run the eval stage first)"
    line = _one_line_error(_cli(dirs[0], "--eval_stage=eval_big"))
    assert (
        line == f"error: {dirs[0]}/eval_big/results.json: not found (run the eval_big stage first)"
    )


def test_cli_different_reference_or_models(tmp_path):
    a = _write_run(tmp_path, "a", _results(1), seed=1)
    b = _write_run(tmp_path, "b", _results(2, reference="sft"), seed=2)
    line = _one_line_error(_cli(a, b))
    assert line == f"error: {a} and {b}: different reference stages ('sft_large' vs 'sft')"

    other = _results(3)
    other["models"] = [
        m for m in other["models"] if m["label"] != "PPO-ptx" or m["size"] != "small"
    ]
    c = _write_run(tmp_path, "c", other, seed=3)
    line = _one_line_error(_cli(a, c))
    assert line.startswith(f"error: {a} and {c}: different models (only in the first: small: ")
    assert "PPO-ptx=ppo_ptx (1500 params)" in line and "only in the second: -)" in line

    bigger = _results(4)
    bigger["models"][0]["params"] += 1  # same label and stage, another architecture
    d = _write_run(tmp_path, "d", bigger, seed=4)
    assert "different models" in _one_line_error(_cli(a, d))


def test_shared_models_keeps_what_every_run_has(tmp_path):
    full = [_results(seed) for seed in (1, 2, 3)]
    runs = [copy.deepcopy(r) for r in full]
    runs[1]["models"] = [m for m in runs[1]["models"] if m["label"] != "PPO-ptx"]
    runs[2]["models"][0]["params"] += 1  # small GPT: another architecture in this run
    dirs = [_write_run(tmp_path, f"r{i}", r, seed=i) for i, r in enumerate(runs)]
    assert "different models" in _one_line_error(_cli(*dirs))  # strict without the flag

    proc = _cli(*dirs, "--shared_models")
    assert proc.returncode == 0, proc.stderr
    left_out = (
        "large: PPO-ptx=ppo_ptx_large (24000 params); small: GPT=pretrain (1500 params); "
        "small: GPT=pretrain (1501 params); small: PPO-ptx=ppo_ptx (1500 params)"
    )
    assert proc.stderr.strip() == f"note: left out, not in every run: {left_out}"
    assert f"Left out, not in every run: {left_out}." in proc.stdout
    rows = _rows(proc.stdout, "| model | small")
    assert "PPO-ptx" not in rows
    assert rows["GPT"][0] == "—"  # small GPT left out, large GPT kept
    for label, size, j in (("SFT", "small", 0), ("GPT", "large", 1)):
        x = np.array([_value(r, size, label, "win_rate") for r in full], np.float64)
        assert rows[label][j] == f"{x.mean():.3f} ± {x.std(ddof=1):.3f} (3 runs)"

    other = _results(4, sizes={"tiny": 10})
    e = _write_run(tmp_path, "e", other, seed=4)
    line = _one_line_error(_cli(dirs[0], e, "--shared_models"))
    assert line == f"error: {dirs[0]}, {e}: no model is in every run (--shared_models)"


def test_same_run_twice_and_bad_json_are_errors(tmp_path):
    a = _write_run(tmp_path, "a", _results(1), seed=1)
    with pytest.raises(InputError, match="the same run given twice"):
        summarize.check_consistent([summarize.load_run(a), summarize.load_run(a + "/")])
    bad = _write_run(tmp_path, "bad", _results(2), seed=2)
    with open(os.path.join(bad, "eval", "results.json"), "a") as f:
        f.write("}")
    with pytest.raises(InputError, match=r"results.json:\d+: not valid JSON"):
        summarize.load_run(bad)


# ------------------------------------------------------------------ plot
def test_plot_is_a_png_and_linked_from_the_markdown(three_runs, tmp_path, capsys):
    dirs, _ = three_runs
    png, md = tmp_path / "plots" / "win.png", tmp_path / "summary.md"
    png.parent.mkdir()
    out = _main(capsys, *dirs, f"--plot={png}", f"--out={md}")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(png) as image:
        assert image.format == "PNG" and min(image.size) > 100
    assert out.rstrip().endswith("![mean win rate](plots/win.png)")


def test_best_of_n_table_and_gold_accuracy(tmp_path, capsys):
    """Best-of-n rows: mean ± sd over the runs that have it, each run's peak (value, n); a
    run without it is left out and counted; RM accuracy against gold joins the RM line."""
    results = [_results(s) for s in SEEDS]
    rng = np.random.default_rng(5)
    ns = [1, 2, 4]
    for r in results[:2]:
        r["reward_models"][0]["gold_accuracy"] = _rate(rng)
        r["best_of_n"] = {
            "reference": "sft_large",
            "samples": 4,
            "n": ns,
            "kl": [np.log(n) - (n - 1) / n for n in ns],
            "curves": [
                {"selector": sel, "win_rate": list(rng.uniform(0.4, 0.8, 3)), "stderr": [0.01] * 3}
                for sel in ("gold judge", "RM rm")
            ],
        }
    dirs = [_write_run(tmp_path, f"run{i}", r, None) for i, r in enumerate(results)]
    out = _main(capsys, *dirs)
    assert "2 of 3 runs have it" in out
    rows = _rows(out, "| selector |")
    for k, sel in enumerate(("gold judge", "RM rm")):
        w = np.array([r["best_of_n"]["curves"][k]["win_rate"] for r in results[:2]])
        for i in range(len(ns)):
            assert rows[sel][i] == f"{w[:, i].mean():.3f} ± {w[:, i].std(ddof=1):.3f} (2 runs)"
        peaks = [f"{w[j].max():.3f} (n={ns[int(w[j].argmax())]})" for j in range(2)]
        assert rows[sel][len(ns)] == f"{peaks[0]} / {peaks[1]} / —"
    gold = np.array([r["reward_models"][0]["gold_accuracy"] for r in results[:2]])
    line = next(x for x in out.splitlines() if x.startswith("RM validation accuracy"))
    assert f"gold judge (rm): {gold.mean():.3f} ± {gold.std(ddof=1):.3f} (2 runs)" in line


# ------------------------------------------------------------------ sweeps (--by)
def _stage_config(run_dir: str, stage: str, config: dict) -> None:
    os.makedirs(os.path.join(run_dir, stage), exist_ok=True)
    with open(os.path.join(run_dir, stage, "config.json"), "w") as f:
        json.dump(config, f)


def test_by_groups_runs_by_a_config_value(tmp_path, capsys):
    """Five runs at three error rates, given out of order: rows in ascending value, each cell
    the numpy mean ± sd over that value's runs; values read from the stage the key names
    (over the workdir's config), the eval stage's, or the workdir's; a line plot."""
    rates = (0.3, 0.1, 0.3, 0.5, 0.1)
    results = [_results(seed) for seed in range(5)]
    fillers = {0: (0.29, 0.58), 2: (0.31, 0.6), 3: (0.48, 0.65), 4: (0.0, 0.5)}  # run 1: none
    for i, (rate, win) in fillers.items():
        results[i]["reference"]["fillers_dropped"] = {
            "rate": rate,
            "win_rate": win,
            "stderr": 0.01,
            "n": 40,
        }
    dirs = [_write_run(tmp_path, f"r{i}", r, seed=i) for i, r in enumerate(results)]
    for i, (d, rate) in enumerate(zip(dirs, rates, strict=True)):
        world = {"world": {"demo_error_rate": rate}, "seed": i}
        if i == 0:  # the world stage ran with 0.3; the workdir's config was changed later
            _stage_config(d, "world", world)
            with open(os.path.join(d, "config.json"), "w") as f:
                json.dump({"world": {"demo_error_rate": 0.9}, "seed": i}, f)
        elif i == 1:
            _stage_config(d, "eval", world)
        else:
            with open(os.path.join(d, "config.json"), "w") as f:
                json.dump(world, f)
    png, md = tmp_path / "by.png", tmp_path / "by.md"
    out = _main(capsys, *dirs, "--by=world.demo_error_rate", f"--plot={png}", f"--out={md}")
    assert md.read_text() == out
    assert out.startswith("# 5 runs by world.demo_error_rate, reference stage sft_large")
    wins = _rows(out, "| world.demo_error_rate |")
    nll = _rows(out.split("## Held-out")[1], "| world.demo_error_rate |")
    assert list(wins)[2:] == ["0.1", "0.3", "0.5"]
    names = wins["world.demo_error_rate"][1:-1]  # the last: the reference, fillers dropped
    assert names[:2] == ["GPT [small (1.5K)]", "GPT (prompted) [small (1.5K)]"]
    for value, members in (("0.1", (1, 4)), ("0.3", (0, 2)), ("0.5", (3,))):
        assert wins[value][0] == nll[value][0] == str(len(members))
        for j, name in enumerate(names):
            label, size = name.split(" [")[0], "large" if "large" in name else "small"
            x = np.array([_value(results[i], size, label, "win_rate") for i in members])
            sd = f" ± {x.std(ddof=1):.3f}" if len(members) > 1 else ""
            assert wins[value][1 + j] == f"{x.mean():.3f}{sd}", (value, name)
            y = [_value(results[i], size, label, "heldout_nll") for i in members]
            want = "" if y[0] is None else f"{np.mean(np.array(y, np.float64)):.3f}"
            assert nll[value][1 + j] == want, (value, name)
    assert "fillers dropped" not in _main(capsys, dirs[1], "--by=world.demo_error_rate")
    assert nll["world.demo_error_rate"][1:] == names
    # Without --by: one line under the win-rate table, mean ± sd and per seed.
    pooled = _main(capsys, dirs[0], dirs[2], dirs[4])
    assert (
        "sft_large with its trailing filler words dropped (20.0% of its samples end in one, "
        f"mean over runs) wins {np.mean([0.58, 0.6, 0.5]):.3f} ± "
        f"{np.std([0.58, 0.6, 0.5], ddof=1):.3f} (3 runs) against it, per seed "
        "0.580 / 0.600 / 0.500: what removing that one flaw alone is worth."
    ) in pooled
    assert "trailing filler" not in _main(capsys, dirs[1], dirs[4])  # no run has any
    # The reference without its trailing fillers: a last column in the win-rate table only.
    assert wins["world.demo_error_rate"][-1] == "sft_large, fillers dropped"
    assert [wins[v][-1] for v in ("0.1", "0.3", "0.5")] == ["0.500 (1/2)", "0.590 ± 0.014", "0.650"]
    assert nll["world.demo_error_rate"][-1] != "sft_large, fillers dropped"
    assert out.rstrip().endswith("![win rate by world.demo_error_rate](by.png)")
    with Image.open(png) as image:
        assert image.format == "PNG" and min(image.size) > 100

    # Text values keep the order they first appear in; a bool is not a number.
    for d, kind in zip(dirs[:3], ("random", "filler", "random"), strict=True):
        _stage_config(d, "world", {"world": {"demo_slips": kind}})
    out = _main(capsys, *dirs[:3], "--by=world.demo_slips")
    assert list(_rows(out, "| world.demo_slips |"))[2:] == ["random", "filler"]
    assert summarize.group_by_value([1, 2, 3], [True, False, True])[0] == (True, [1, 3])


def test_by_errors_name_the_file_and_key(tmp_path):
    a = _write_run(tmp_path, "a", _results(1), seed=1)
    b = _write_run(tmp_path, "b", _results(2), seed=2)
    line = _one_line_error(_cli(a, b, "--by=world.demo_error_rate"))
    assert line == f"error: {a}/config.json: no config key 'world.demo_error_rate'"
    line = _one_line_error(_cli(a, b, "--by=stages.x"))
    assert line == f"error: {a}/config.json: no config key 'stages.x'"
    _stage_config(b, "world", {"world": {"families": ["sort", "count"]}})
    with open(os.path.join(a, "config.json"), "w") as f:
        json.dump({"world": {"families": "sort"}}, f)
    line = _one_line_error(_cli(a, b, "--by=world.families"))
    assert line == (
        f"error: {b}/world/config.json: config key 'world.families' is not a single value "
        "(['sort', 'count'])"
    )
    os.remove(os.path.join(a, "config.json"))
    line = _one_line_error(_cli(a, b, "--by=world.families"))
    assert line == f"error: {a}/config.json: not found (to read 'world.families')"
