"""Statistics over runs (seeds) of one experiment's eval results, and their Markdown tables
and plots: mean ± sample sd per model, per value of a swept config key, and best-of-n.
The command line that reads the runs is `python -m instructrl.summarize`."""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

from instructrl.eval import plots as eval_plots

METRICS = (
    ("gold_score", "gold score"),
    ("constraint_rate", "constraints"),
    ("stopped_rate", "stopped"),
    ("heldout_nll", "held-out NLL"),
    ("public_task_accuracy", "public task"),
    ("kl_to_reference", "KL to reference"),
)


@dataclasses.dataclass(frozen=True)
class Run:
    run_dir: str
    seed: int | None  # None: neither settings.seed nor RUN_DIR/config.json's "seed"
    summary: dict  # the content of results.json


@dataclasses.dataclass(frozen=True)
class Stat:
    values: tuple[float | None, ...]  # one per run, in run order (None: missing)
    mean: float | None  # over the present values
    sd: float | None  # sample sd (n - 1) over the present values; None below 2
    n: int  # runs with a value


def all_numeric(values: Sequence[Any]) -> bool:
    """Whether every value is a number (a bool is not)."""
    return all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)


def stat(values: Sequence[float | None]) -> Stat:
    """Mean and sample sd (n - 1) over the values that are not None."""
    present = [float(v) for v in values if v is not None]
    return Stat(
        values=tuple(values),
        mean=statistics.fmean(present) if present else None,
        sd=statistics.stdev(present) if len(present) > 1 else None,
        n=len(present),
    )


def model_stats(runs: Sequence[Run], key: str) -> dict[tuple[str, str], Stat]:
    """{(size, label): Stat of field `key` over runs} in the first run's model order; a model
    without the field (or with null) counts as missing in that run."""
    by_run = [{model_key(m): m for m in run.summary["models"]} for run in runs]
    return {
        k: stat([models[k].get(key) for models in by_run])
        for k in map(model_key, runs[0].summary["models"])
    }


def list_stats(runs: Sequence[Run], section: str, field: str) -> dict[str, Stat]:
    """{stage: Stat of `field`} over runs for the entries of `reward_models` or `labelers`."""
    stages = list(dict.fromkeys(e["stage"] for run in runs for e in run.summary[section]))
    out = {}
    for stage in stages:
        values = []
        for run in runs:
            entry = next((e for e in run.summary[section] if e["stage"] == stage), None)
            values.append(None if entry is None else entry.get(field))
        out[stage] = stat(values)
    return out


def _fillers_dropped(runs: Sequence[Run], field: str) -> Stat:
    """Stat over runs of `field` of the reference's samples with their trailing filler words
    dropped (eval.judge.fillers_dropped; missing in older results)."""
    return stat(
        [(run.summary["reference"].get("fillers_dropped") or {}).get(field) for run in runs]
    )


def fillers_dropped_stats(runs: Sequence[Run]) -> tuple[Stat, Stat] | None:
    """(win rate, filler rate) over runs of the reference's samples with their trailing
    filler words dropped; None unless some run's reference has samples that end in one."""
    rate = _fillers_dropped(runs, "rate")
    if not any(rate.values):
        return None
    return _fillers_dropped(runs, "win_rate"), rate


def _num(x: float | None) -> str:
    return "—" if x is None else f"{x:.3f}"


def mean_sd_cell(s: Stat) -> str:
    if s.n == 0:
        return "—"
    return f"{s.mean:.3f} ± {_num(s.sd)} ({s.n} run{'s' if s.n != 1 else ''})"


def per_seed_cell(s: Stat) -> str:
    return " / ".join(_num(v) for v in s.values)


def _mean_cell(s: Stat, runs: int, with_sd: bool = False) -> str:
    """The mean, "± sd" after it (with_sd, from 2 values), then "(k/n)" where only k of the
    n runs have the value."""
    if s.n == 0:
        return ""
    sd = f" ± {s.sd:.3f}" if with_sd and s.sd is not None else ""
    return f"{s.mean:.3f}{sd}" + (f" ({s.n}/{runs})" if s.n < runs else "")


def _split(s: Mapping[str, Any]) -> str:
    return f" {s['split']}" if s.get("split") in ("dev", "test") else ""


def settings_text(s: Mapping[str, Any]) -> str:
    """How the win rates were measured, from an eval's `settings`."""
    return (
        f"{s['num_prompts']}{_split(s)} prompts x {s['num_samples']} samples, "
        f"T={s['temperature']}{', greedy' if s['greedy'] else ''}; gold judge, ties 1/2."
    )


def seed_name(run: Run) -> str:
    return f"seed {'?' if run.seed is None else run.seed}"


def summary_markdown(
    runs: Sequence[Run], eval_stage: str = "eval", plot: str = "", left_out: Sequence[str] = ()
) -> str:
    """The whole summary (the module doc); `plot` is a PNG path to link, relative to where
    the Markdown is written; `left_out` names models not in every run (--shared_models)."""
    first = runs[0].summary
    cols = eval_plots.sizes(first)
    heads = dict(cols)
    n = len(runs)
    s = first["settings"]
    out = [
        f"# {n} run{'s' if n != 1 else ''} ({', '.join(map(seed_name, runs))}), "
        f"reference stage {first['reference']['stage']}",
        "",
        f"Runs: {', '.join(r.run_dir for r in runs)} (stage {eval_stage}); {settings_text(s)}",
        "",
        *([f"Left out, not in every run: {'; '.join(left_out)}.", ""] if left_out else []),
        f"## Win rate against {first['reference']['stage']}",
        "",
        "mean ± sample sd over runs; per seed in the order of the runs above.",
        "",
    ]
    wins = model_stats(runs, "win_rate")
    seed_heads = ["per seed"] if len(cols) == 1 else [f"per seed ({h})" for _, h in cols]
    rows = []
    for label in eval_plots.labels(first):
        found = [wins.get((size, label)) for size, _ in cols]
        rows.append(
            [
                label,
                *(mean_sd_cell(w) if w else "—" for w in found),
                *(per_seed_cell(w) if w else "—" for w in found),
            ]
        )
    out += [eval_plots.markdown_table(["model", *heads.values(), *seed_heads], rows), ""]
    dropped = fillers_dropped_stats(runs)
    if dropped:
        wins_dropped, rate = dropped
        out += [
            f"{first['reference']['stage']} with its trailing filler words dropped "
            f"({rate.mean:.1%} of its samples end in one, mean over runs) wins "
            f"{mean_sd_cell(wins_dropped)} against it, per seed {per_seed_cell(wins_dropped)}: "
            "what removing that one flaw alone is worth.",
            "",
        ]

    out += ["## Quality, constraints, alignment tax (mean over runs)", ""]
    means = {key: model_stats(runs, key) for key, _ in METRICS}
    rows = [
        [
            f"{m['label']} [{heads[m['size']]}]",
            *(_mean_cell(means[key][model_key(m)], n) for key, _ in METRICS),
        ]
        for m in first["models"]
    ]
    out += [eval_plots.markdown_table(["model", *(h for _, h in METRICS)], rows), ""]
    out += flaws_markdown(runs, heads)

    rm = list_stats(runs, "reward_models", "val_accuracy")
    gold = list_stats(runs, "reward_models", "gold_accuracy")
    agree = list_stats(runs, "labelers", "inter_labeler_agreement")
    parts = [f"RM validation accuracy ({k}): {mean_sd_cell(v)}" for k, v in rm.items()]
    parts += [
        f"RM accuracy against the gold judge ({k}): {mean_sd_cell(v)}"
        for k, v in gold.items()
        if v.n
    ]
    parts += [f"inter-labeler agreement ({k}): {mean_sd_cell(v)}" for k, v in agree.items()]
    paper = first.get("paper") or {}
    if paper:
        parts.append(f"paper: ~{paper['rm_accuracy']:.2f} / {paper['inter_labeler_agreement']:.3f}")
    out.append("; ".join(parts) + "." if parts else "No reward model or labeler results.")
    out += best_of_n_markdown(runs)
    if plot:
        out += ["", f"![mean win rate]({plot})"]
    return "\n".join(out) + "\n"


def flaws_markdown(runs: Sequence[Run], heads: Mapping[str, str]) -> list[str]:
    """Mean over runs of each visible flaw's share of samples (world.visible_flaws), per
    model and for the reference's own samples; nothing when the evals did not count them."""
    first = runs[0].summary
    kinds = list(first["reference"].get("flaws") or {})
    if not kinds:
        return []

    def cells(get) -> list[str]:
        return [_mean_cell(stat([get(run, k) for run in runs]), len(runs)) for k in kinds]

    ref = first["reference"]["stage"]
    rows = [[f"{ref} (reference)", *cells(lambda run, k: run.summary["reference"]["flaws"][k])]]
    for m in first["models"]:
        key = model_key(m)

        def get(run, k, key=key):
            found = next((x for x in run.summary["models"] if model_key(x) == key), {})
            return (found.get("flaws") or {}).get(k)

        rows.append([f"{m['label']} [{heads[m['size']]}]", *cells(get)])
    return [
        "## Visible flaws (share of samples, mean over runs)",
        "",
        eval_plots.markdown_table(["model", *kinds], rows),
        "",
    ]


def _model_names(summary: Mapping[str, Any]) -> dict[tuple[str, str], str]:
    """{(size, label): column name} in the run's model order; the size only when several."""
    heads = dict(eval_plots.sizes(summary))
    return {
        model_key(m): m["label"] if len(heads) == 1 else f"{m['label']} [{heads[m['size']]}]"
        for m in summary["models"]
    }


def by_markdown(
    groups: Sequence[tuple[Any, Sequence[Run]]], key: str, eval_stage: str = "eval", plot: str = ""
) -> str:
    """The sweep summary of `--by=KEY` (the module doc)."""
    runs = [r for _, group in groups for r in group]
    first = runs[0].summary
    ref = first["reference"]["stage"]
    names = _model_names(first)
    s = first["settings"]
    out = [
        f"# {len(runs)} runs by {key}, reference stage {ref}",
        "",
        f"Runs (stage {eval_stage}): "
        + "; ".join(
            f"{key}={value}: {', '.join(f'{r.run_dir} ({seed_name(r)})' for r in group)}"
            for value, group in groups
        )
        + f". {settings_text(s)}",
        "",
    ]
    for field, title, with_sd in (
        ("win_rate", f"Win rate against {ref}", True),
        ("heldout_nll", "Held-out pretraining NLL (alignment tax; lower is better)", False),
    ):
        stats = [model_stats(group, field) for _, group in groups]
        if not any(st.n for by_model in stats for st in by_model.values()):
            continue
        # The win-rate table ends with the flaw-removal reference column when there is one.
        extra = with_sd and fillers_dropped_stats(runs) is not None
        rows = []
        for (value, group), by_model in zip(groups, stats, strict=True):
            cells = [_mean_cell(by_model[k], len(group), with_sd) for k in names]
            if extra:
                cells.append(_mean_cell(_fillers_dropped(group, "win_rate"), len(group), True))
            rows.append([str(value), str(len(group)), *cells])
        heads = [*names.values(), *([f"{ref}, fillers dropped"] if extra else [])]
        what = "mean ± sample sd (from 2 runs)" if with_sd else "mean"
        if extra:
            what = (
                f"Last column: {ref}'s own samples with their trailing filler words dropped "
                f"(what removing that one flaw alone is worth). {what[0].upper()}{what[1:]}"
            )
        out += [
            f"## {title} by {key}",
            "",
            f'{what} over the runs with each value ("(k/n)": only k of its n runs have it).',
            "",
            eval_plots.markdown_table([key, "runs", *heads], rows),
            "",
        ]
    if plot:
        out += [f"![win rate by {key}]({plot})", ""]
    return "\n".join(out)


def plot_by(groups: Sequence[tuple[Any, Sequence[Run]]], key: str, path: str) -> None:
    """Win rate against the reference by the value of `key`: a line per model (mean over the
    runs with each value, sd error bars), dots for the runs' own values, dashed 1/2, and
    dotted the reference with its trailing fillers dropped (when its samples have any)."""
    first = groups[0][1][0].summary
    values = [v for v, _ in groups]
    numeric = all_numeric(values)
    xs = [float(v) for v in values] if numeric else list(range(len(values)))
    fig, (ax,) = eval_plots.figure(6.5, 4.5)
    wins = [model_stats(group, "win_rate") for _, group in groups]
    for k, name in _model_names(first).items():
        stats = [by_model[k] for by_model in wins]
        line = [(x, st) for x, st in zip(xs, stats, strict=True) if st.n]
        if not line:
            continue
        (drawn,) = ax.plot([x for x, _ in line], [st.mean for _, st in line], "o-", label=name)
        ax.errorbar(
            [x for x, _ in line],
            [st.mean for _, st in line],
            yerr=[st.sd or 0.0 for _, st in line],
            fmt="none",
            ecolor=drawn.get_color(),
            capsize=3,
        )
        for x, st in line:
            dots = [v for v in st.values if v is not None]
            ax.plot([x] * len(dots), dots, ".", color=drawn.get_color(), markersize=3)
    if fillers_dropped_stats([r for _, group in groups for r in group]) is not None:
        line = [(x, _fillers_dropped(g, "win_rate")) for x, (_, g) in zip(xs, groups, strict=True)]
        line = [(x, st) for x, st in line if st.n]
        ax.plot([x for x, _ in line], [st.mean for _, st in line], "k:", marker="x",
                label=f"{first['reference']['stage']}, fillers dropped")  # fmt: skip
    ax.axhline(0.5, color="grey", linestyle="--", linewidth=1)
    if not numeric:
        ax.set_xticks(xs, [str(v) for v in values])
    ax.set_xlabel(key)
    ax.set_ylim(0, 1)
    ax.set_ylabel(f"win rate against {first['reference']['stage']}")
    ax.set_title(f"Win rate by {key} (error bars: sd over runs)")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path)


def best_of_n_markdown(runs: Sequence[Run]) -> list[str]:
    """Best-of-n win rate per selector and n, mean ± sd over the runs that have the same n
    (instructrl/stages/evaluate.py best_of_n), and each run's peak over n in run order ("—" without
    it, or with other n than the first run that has it); no lines if no run has it."""
    bons = [r.summary.get("best_of_n") or {} for r in runs]
    have = [b for b in bons if b]
    if not have:
        return []
    ns, kls = have[0]["n"], have[0]["kl"]
    curves = [{c["selector"]: c for c in b.get("curves", [])} for b in bons]
    same_n = [b.get("n") == ns for b in bons]
    selectors = list(dict.fromkeys(k for c in curves for k in c))
    rows = []
    for sel in selectors:
        found = [c.get(sel) if ok else None for c, ok in zip(curves, same_n, strict=True)]
        cells = [
            mean_sd_cell(stat([f and f["win_rate"][i] for f in found])) for i in range(len(ns))
        ]
        peaks = [
            "—" if f is None else "{:.3f} (n={})".format(*max(zip(f["win_rate"], ns, strict=True)))
            for f in found
        ]
        rows.append([sel, *cells, " / ".join(peaks)])
    head = [
        "selector",
        *(f"n={n} (KL {kl:.2f})" for n, kl in zip(ns, kls, strict=True)),
        "peak per seed",
    ]
    return [
        "",
        "## Best-of-n from the reference (mean ± sd over runs)",
        "",
        f"{len(have)} of {len(runs)} runs have it; win rate of keeping the one of n samples "
        "the selector scores highest. Gao et al. (2022) find RL less KL-efficient than "
        "best-of-n, so PPO against an RM is not expected to beat that RM's peak.",
        "",
        eval_plots.markdown_table(head, rows),
    ]


def plot_mean_win_rates(runs: Sequence[Run], path: str) -> None:
    """Bars: mean win rate per model type, one bar per size side by side, sd error bars;
    dots: the runs' own values; dashed line: 1/2 (as good as the reference)."""
    first = runs[0].summary
    cols = eval_plots.sizes(first)
    names = eval_plots.labels(first)
    wins = model_stats(runs, "win_rate")
    fig, (ax,) = eval_plots.figure(max(5.0, 1.2 * len(names) + 2), 4.5)
    width = 0.8 / len(cols)
    for j, (size, head) in enumerate(cols):
        xs, ys, es = [], [], []
        for i, label in enumerate(names):
            w = wins.get((size, label))
            if w is None or w.n == 0:
                continue
            x = i + (j - (len(cols) - 1) / 2) * width
            xs.append(x)
            ys.append(w.mean)
            es.append(w.sd or 0.0)
            dots = [v for v in w.values if v is not None]
            ax.plot([x] * len(dots), dots, "k.", markersize=4, zorder=3)
        ax.bar(xs, ys, width=width * 0.9, yerr=es if any(es) else None, capsize=4, label=head)
    ax.axhline(0.5, color="grey", linestyle="--", linewidth=1)
    ax.set_xticks(range(len(names)), names, rotation=15)
    ax.set_ylim(0, 1)
    ax.set_ylabel(f"win rate against {first['reference']['stage']}")
    n = len(runs)
    ax.set_title(f"Mean win rate over {n} run{'s' if n != 1 else ''} (error bars: sd over runs)")
    ax.legend(title="model size")
    fig.tight_layout()
    fig.savefig(path)


def model_key(m: Mapping[str, Any]) -> tuple[str, str]:
    return m["size"], m["label"]
