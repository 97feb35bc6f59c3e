"""Summarises the `eval` results of several runs (seeds) of one experiment, as Markdown.

    python -m instructrl.summarize RUN_DIR [RUN_DIR ...] [--eval_stage=eval] \
        [--shared_models] [--by=KEY] [--out=FILE.md] [--plot=FILE.png]

Each RUN_DIR is the workdir of one run of `instructrl.main`; its `<eval_stage>/results.json`
(instructrl/stages/evaluate.py) is read; its seed is the eval's `settings.seed` (older results:
`RUN_DIR/config.json`'s). Prints:

  - the runs, their seeds and the reference stage;
  - win rate against the reference: a row per model type, a column per size, each cell
    "mean ± sd (n runs)" with sd the sample standard deviation over runs (n - 1; "—" for
    one run), then the per-seed values in the order the runs were given;
  - per model, the mean over runs of gold score, constraint rate, stop rate, held-out NLL,
    public-task accuracy and KL to the reference (blank where missing; "(k/n)" where only k
    of n runs have it);
  - when the evals counted the demonstrators' visible flaws (world.demo_slips=visible), the
    share of samples with each flaw, per model and for the reference, mean over runs;
  - RM validation accuracy, RM accuracy against the gold judge and inter-labeler
    agreement, mean ± sd over runs;
  - best-of-n from the reference against each RM and the gold judge (when the evals have
    it): win rate per n, mean ± sd over runs, and each run's peak;
  - when the reference's samples end in filler words (world.demo_slips=filler), what
    dropping them alone wins against the reference, mean ± sd over runs.

The spread over seeds is the number to quote across runs: each run's own stderr covers
prompt sampling only, not the seed's effect on training. Runs must share the reference
stage, the models (size, label, stage, few-shot, parameter count) and the eval settings;
otherwise one error line names the two runs and the difference (exit status 2).
`--shared_models` instead keeps the models that every run has (same size, label, stage,
few-shot and parameter count), e.g. seeds run with and without an extra model, and names
the models it leaves out on stderr.

`--by=KEY` summarises a sweep instead (e.g. `--by=world.demo_error_rate`, or
`--by=ppo_ptx.ptx_coef` for the paper's pretraining-mix ablation): runs are grouped by the
value of the dotted config key KEY, and the tables give each model's win rate and held-out
NLL per value, mean ± sd over the runs with that value. A run's value comes from the
`config.json` of the stage KEY's first part names (what that stage ran with), else of its
eval stage, else of the workdir. `--plot` then draws win rate against KEY, a line per model.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from instructrl import cli
from instructrl.errors import InputError
from instructrl.eval.seeds import (
    Run,
    all_numeric,
    by_markdown,
    model_key,
    plot_by,
    plot_mean_win_rates,
    summary_markdown,
)

# (results.json key, column heading) of the per-model means table.
# Settings that define what a win rate measures: runs that differ here are not seeds of one
# experiment.
SAME_SETTINGS = ("num_prompts", "num_samples", "temperature", "greedy", "split")


# ---------------------------------------------------------------- reading
def _read_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise InputError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None


def load_run(run_dir: str, eval_stage: str = "eval") -> Run:
    path = os.path.join(run_dir, eval_stage, "results.json")
    if not os.path.isfile(path):
        raise InputError(f"{path}: not found (run the {eval_stage} stage first)")
    summary = _read_json(path)
    for key in ("reference", "settings", "models", "reward_models", "labelers"):
        if key not in summary:
            raise InputError(f"{path}: no '{key}' key (not an eval results.json?)")
    if not summary["models"]:
        raise InputError(f"{path}: 'models' is empty")
    for i, m in enumerate(summary["models"]):
        missing = [k for k in ("size", "label", "stage", "params") if k not in m]
        if missing:
            raise InputError(f"{path}: models[{i}] has no {', '.join(missing)}")
    # The seed the eval ran with; config.json (the workdir's first config) for older results.
    seed = summary["settings"].get("seed")
    config_path = os.path.join(run_dir, "config.json")
    if seed is None and os.path.isfile(config_path):
        seed = _read_json(config_path).get("seed")
    return Run(run_dir, seed, summary)


def config_value(run_dir: str, key: str, eval_stage: str = "eval") -> Any:
    """The value of dotted config `key` in a run: from the config.json of the stage that the
    key's first part names, else of the eval stage, else of the workdir (the first found).
    InputError if there is none, it lacks the key, or the value is not a single number,
    string or bool."""
    folders = dict.fromkeys([key.split(".")[0], eval_stage, ""])
    paths = [os.path.join(run_dir, f, "config.json") for f in folders]
    path = next((p for p in paths if os.path.isfile(p)), None)
    if path is None:
        raise InputError(f"{os.path.join(run_dir, 'config.json')}: not found (to read '{key}')")
    value = _read_json(path)
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            raise InputError(f"{path}: no config key '{key}'")
        value = value[part]
    if not isinstance(value, int | float | str | bool):
        raise InputError(f"{path}: config key '{key}' is not a single value ({value!r})")
    return value


def group_by_value(runs: Sequence[Run], values: Sequence[Any]) -> list[tuple[Any, list[Run]]]:
    """[(value, the runs with it in the order given)]: numbers in ascending order, any other
    values in order of first appearance."""
    groups: dict[Any, list[Run]] = {}
    for run, value in zip(runs, values, strict=True):
        groups.setdefault(value, []).append(run)
    order = sorted(groups) if all_numeric(list(groups)) else list(groups)
    return [(v, groups[v]) for v in order]


def _describe(m: Mapping[str, Any]) -> str:
    fewshot = ":fewshot" if m.get("fewshot") else ""
    size = f"{m['size']}: " if m["size"] else ""
    return f"{size}{m['label']}={m['stage']}{fewshot} ({m['params']} params)"


def check_consistent(runs: Sequence[Run]) -> None:
    """InputError naming the first run, another run and how they differ, unless all runs
    share the reference stage, the eval settings and the models."""
    first = runs[0]
    seen = {os.path.realpath(first.run_dir): first.run_dir}
    for run in runs[1:]:
        real = os.path.realpath(run.run_dir)
        if real in seen:
            raise InputError(f"{seen[real]} and {run.run_dir}: the same run given twice")
        seen[real] = run.run_dir
        where = f"{first.run_dir} and {run.run_dir}"
        a, b = first.summary, run.summary
        if a["reference"]["stage"] != b["reference"]["stage"]:
            raise InputError(
                f"{where}: different reference stages "
                f"('{a['reference']['stage']}' vs '{b['reference']['stage']}')"
            )
        for key in SAME_SETTINGS:
            if a["settings"].get(key) != b["settings"].get(key):
                raise InputError(
                    f"{where}: different eval settings ({key} = "
                    f"{a['settings'].get(key)!r} vs {b['settings'].get(key)!r})"
                )
        ma = {model_key(m): _describe(m) for m in a["models"]}
        mb = {model_key(m): _describe(m) for m in b["models"]}
        if ma != mb:
            only_a = [v for k, v in ma.items() if mb.get(k) != v]
            only_b = [v for k, v in mb.items() if ma.get(k) != v]
            raise InputError(
                f"{where}: different models (only in the first: {'; '.join(only_a) or '-'}; "
                f"only in the second: {'; '.join(only_b) or '-'})"
            )


def keep_shared_models(runs: Sequence[Run]) -> tuple[list[Run], list[str]]:
    """(runs holding only the models every run has, in each run's order; descriptions of the
    models left out). InputError if the runs share no model."""
    described = [{_describe(m) for m in run.summary["models"]} for run in runs]
    shared = set.intersection(*described)
    if not shared:
        names = ", ".join(run.run_dir for run in runs)
        raise InputError(f"{names}: no model is in every run (--shared_models)")
    dropped = sorted(set.union(*described) - shared)
    kept = [
        dataclasses.replace(
            run,
            summary={
                **run.summary,
                "models": [m for m in run.summary["models"] if _describe(m) in shared],
            },
        )
        for run in runs
    ]
    return kept, dropped


# ---------------------------------------------------------------- statistics
# ---------------------------------------------------------------- Markdown
# ---------------------------------------------------------------- plot
# ---------------------------------------------------------------- command line
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m instructrl.summarize",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="workdir of one run")
    parser.add_argument("--eval_stage", default="eval", help="name of the eval stage")
    parser.add_argument(
        "--shared_models",
        action="store_true",
        help="summarise only the models every run has (the others are named on stderr)",
    )
    parser.add_argument(
        "--by",
        default="",
        metavar="KEY",
        help="summarise a sweep: group the runs by the value of this dotted config key",
    )
    parser.add_argument("--out", default="", help="also write the Markdown to this file")
    parser.add_argument(
        "--plot", default="", help="write a PNG of mean win rates (with --by: against KEY)"
    )
    parser.add_argument("--verbose", action="store_true", help="print a failure's traceback")
    args = parser.parse_args(argv)
    return cli.run(lambda: _summarize(args), argv, fallback_path=args.out or None)


def _summarize(args: argparse.Namespace) -> int:
    runs = [load_run(d, args.eval_stage) for d in args.run_dirs]
    dropped = []
    if args.shared_models:
        runs, dropped = keep_shared_models(runs)
    check_consistent(runs)
    groups = []
    if args.by:
        values = [config_value(r.run_dir, args.by, args.eval_stage) for r in runs]
        groups = group_by_value(runs, values)
    link = ""
    if args.plot:
        if groups:
            plot_by(groups, args.by, args.plot)
        else:
            plot_mean_win_rates(runs, args.plot)
        # The Markdown links the plot relative to where it is written.
        base = os.path.dirname(os.path.abspath(args.out)) if args.out else os.getcwd()
        link = os.path.relpath(os.path.abspath(args.plot), base)
    if groups:
        text = by_markdown(groups, args.by, args.eval_stage, plot=link)
    else:
        text = summary_markdown(runs, args.eval_stage, plot=link, left_out=dropped)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text)
    if dropped:
        print(f"note: left out, not in every run: {'; '.join(dropped)}", file=sys.stderr)
    for _, group in groups or [(None, runs)]:
        seeds = [r.seed for r in group if r.seed is not None]
        if len(set(seeds)) < len(seeds):
            print(f"warning: repeated seeds among the runs ({seeds})", file=sys.stderr)
    print(text, end="")
    return 0


if __name__ == "__main__":
    cli.command(main)
