"""Tables (Markdown) and plots (PNG) of the `eval` stage's results, and PPO metrics reading.

Everything here works on the JSON-able summary that `instructrl.stages.evaluate.run` builds (the
content of results.json) and on PPO stages' metrics.jsonl rows; nothing touches a model.
Plots use matplotlib's object API on an Agg canvas (no pyplot, no global backend switch).

PPO metrics: a series is found by the last component of its key ("score" matches "score"
and "rollout/score", not "score_raw"); rows without the key are skipped, so metrics logged
only on some iterations (e.g. a periodic gold evaluation) plot at their own steps.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from instructrl.errors import InputError

PPO_SERIES = ("score", "kl", "beta", "gold_score")  # plotted and summarised when present


# ---------------------------------------------------------------- PPO metrics
def read_metrics(path: str) -> list[dict]:
    """The rows of a metrics.jsonl file (InputError naming path:line on a bad line)."""
    if not os.path.exists(path):
        raise InputError(f"{path}: missing (a PPO stage writes its metrics there)")
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                raise InputError(f"{path}:{lineno}: not valid JSON") from None
    return rows


def series(rows: Sequence[Mapping[str, Any]], name: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of metric `name` over the rows that log it (see the module doc)."""
    steps, values = [], []
    for i, row in enumerate(rows):
        key = next((k for k in row if re.split(r"[/.]", k)[-1] == name), None)
        if key is not None and isinstance(row[key], (int, float)):
            steps.append(row.get("step", i))
            values.append(float(row[key]))
    return np.asarray(steps, np.float64), np.asarray(values, np.float64)


def ppo_summaries(runs: Mapping[str, Sequence[Mapping[str, Any]]]) -> list[dict]:
    """Per PPO stage: logged iterations and the last logged value of each PPO_SERIES metric."""
    out = []
    for stage, rows in runs.items():
        final = {}
        for name in PPO_SERIES:
            _, values = series(rows, name)
            final[name] = float(values[-1]) if len(values) else None
        out.append(
            {
                "stage": stage,
                "logged_rows": len(rows),
                "last_step": max((r.get("step", 0) for r in rows), default=0),
                **final,
            }
        )
    return out


# ---------------------------------------------------------------- helpers
def json_safe(obj: Any) -> Any:
    """numpy scalars -> Python numbers, NaN/inf -> None (results.json is strict JSON)."""
    if isinstance(obj, Mapping):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return json_safe(obj.tolist())
    if isinstance(obj, (np.floating, float)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj


def human_count(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(n)


def size_params(models: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """{"params": {size tag: parameters}, "ratio": largest / smallest}, sizes in order."""
    params: dict[str, int] = {}
    for m in models:
        params[m["size"]] = max(params.get(m["size"], 0), m["params"])
    return {"params": params, "ratio": max(params.values()) / min(params.values())}


def sizes(summary: Mapping[str, Any]) -> list[tuple[str, str]]:
    """[(size tag, column heading)] in order of first appearance; heading names the params."""
    params = size_params(summary["models"])["params"]
    return [
        (s, f"{s} ({human_count(p)})" if s else f"{human_count(p)} params")
        for s, p in params.items()
    ]


def labels(summary: Mapping[str, Any]) -> list[str]:
    return list(dict.fromkeys(m["label"] for m in summary["models"]))


def _find(summary, size: str, label: str) -> dict | None:
    return next((m for m in summary["models"] if m["size"] == size and m["label"] == label), None)


def _fmt(x: float | None, digits: int = 3) -> str:
    return (
        "—" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{digits}f}"
    )


def _pm(m: Mapping[str, Any]) -> str:
    se = m.get("stderr")
    return f"{m['win_rate']:.3f} ± {se:.3f}" if se is not None else f"{m['win_rate']:.3f}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub-flavoured Markdown table (cells already formatted)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def _name(m: Mapping[str, Any], size_heads: Mapping[str, str]) -> str:
    return f"{m['label']} [{size_heads[m['size']]}]"


# ---------------------------------------------------------------- Markdown
def main_table(summary: Mapping[str, Any]) -> str:
    """Win rate ± standard error against the reference: a row per model type, a column per size."""
    cols = sizes(summary)
    rows = []
    for label in labels(summary):
        found = [_find(summary, s, label) for s, _ in cols]
        rows.append([label, *(_pm(m) if m else "—" for m in found)])
    s = summary["settings"]
    split = f" {s['split']}" if s.get("split") in ("dev", "test") else ""
    title = (
        f"Win rate against {summary['reference']['stage']} (gold judge, ties 1/2; "
        f"{s['num_prompts']}{split} prompts x {s['num_samples']} samples, T={s['temperature']}"
        f"{', greedy' if s['greedy'] else ''})"
    )
    return title + "\n\n" + markdown_table(["model", *(h for _, h in cols)], rows)


def fillers_dropped_line(ref: Mapping[str, Any]) -> str:
    """One sentence on the reference's samples with their trailing filler words dropped
    (eval.judge.fillers_dropped); "" when none of its samples ends in one (or older results)."""
    d = ref.get("fillers_dropped")
    if not d or not d["rate"]:
        return ""
    return (
        f"{ref['stage']} with its trailing filler words dropped ({d['rate']:.1%} of its samples "
        f"end in one) wins {d['win_rate']:.3f} ± {_fmt(d['stderr'])} against {ref['stage']}: "
        "what removing that one flaw alone is worth."
    )


def results_markdown(summary: Mapping[str, Any]) -> str:
    heads = dict(sizes(summary))
    models = summary["models"]
    out = ["# Evaluation", "", main_table(summary), ""]
    ref = summary["reference"]
    out += [
        f"Reference {ref['stage']}: mean gold score {ref['gold_score']:.3f}, perfect "
        f"{ref['perfect_rate']:.3f}, stopped {ref['stopped_rate']:.3f}.",
        "",
    ]
    dropped = fillers_dropped_line(ref)
    if dropped:
        out += [dropped, ""]
    fams = summary["settings"]["families"]
    out += ["## Win rate by family", ""]
    out.append(
        markdown_table(
            ["model", *fams],
            [
                [_name(m, heads)]
                + [_fmt(m["families"].get(f, {}).get("win_rate"), 2) for f in fams]
                for m in models
            ],
        )
    )
    out += [
        "",
        "## Instructions, constraints, length",
        "",
        "constraints: share of responses that keep the prompt's explicit constraint (one "
        "word, at most N words, K items / not X / below N); perfect: gold score 1; KL: "
        "nats per response from the reference, on the evaluated model's own samples.",
        "",
    ]
    out.append(
        markdown_table(
            [
                "model",
                "stage",
                "gold score",
                "perfect",
                "constraints",
                "stopped",
                "words",
                "tokens",
                "KL",
            ],
            [
                [
                    _name(m, heads),
                    m["stage"] + (":fewshot" if m["fewshot"] else ""),
                    _fmt(m["gold_score"]),
                    _fmt(m["perfect_rate"]),
                    _fmt(m["constraint_rate"]),
                    _fmt(m["stopped_rate"]),
                    _fmt(m["length_words"], 1),
                    _fmt(m["length_tokens"], 1),
                    _fmt(m.get("kl_to_reference"), 2),
                ]
                for m in models
            ],
        )
    )
    flawed = [m for m in [summary["reference"], *models] if any((m.get("flaws") or {}).values())]
    if flawed:
        kinds = list(models[0]["flaws"])
        out += [
            "",
            "## Visible flaws",
            "",
            "Share of samples with each flaw demonstrators slip into (filler: a filler word "
            "after the answer; hedge: a pleasantry before it; ramble: the answer said twice).",
            "",
            markdown_table(
                ["model", *kinds],
                [[f"{summary['reference']['stage']} (reference)"]
                 + [_fmt(summary["reference"]["flaws"][k]) for k in kinds]]
                + [[_name(m, heads)] + [_fmt(m["flaws"][k]) for k in kinds] for m in models],
            ),
        ]  # fmt: skip
    out += [
        "",
        "## Alignment tax",
        "",
        "held-out NLL: nats per token of held-out pretraining text (lower is better); "
        "public task: cloze accuracy, greedy first word / likeliest of 4 choices.",
        "",
    ]
    out.append(
        markdown_table(
            ["model", "stage", "held-out NLL", "public (greedy)", "public (choice)"],
            [
                [
                    _name(m, heads),
                    m["stage"],
                    _fmt(m["heldout_nll"]),
                    _fmt(m["public_task_accuracy"]),
                    _fmt(m["public_choice_accuracy"]),
                ]
                for m in models
                if not m["fewshot"]
            ],
        )
    )
    out += ["", "## Reward model accuracy vs inter-labeler agreement", ""]
    paper = summary["paper"]
    rows = [
        [f"RM {r['stage']}", "validation pairwise accuracy", _fmt(r.get("val_accuracy"))]
        for r in summary["reward_models"]
    ]
    rows += [
        [
            f"RM {r['stage']}",
            f"accuracy vs gold judge (reference samples, {r['gold_pairs']} pairs)",
            _fmt(r.get("gold_accuracy")),
        ]
        for r in summary["reward_models"]
        if "gold_pairs" in r
    ]
    rows += [
        [
            f"labelers ({r['stage']})",
            "inter-labeler agreement",
            _fmt(r.get("inter_labeler_agreement")),
        ]
        for r in summary["labelers"]
    ]
    rows += [
        [
            "paper",
            "RM accuracy / agreement",
            f"~{paper['rm_accuracy']:.2f} / {paper['inter_labeler_agreement']:.3f} ± 0.015",
        ]
    ]
    out.append(markdown_table(["what", "measure", "value"], rows))
    out += best_of_n_markdown(summary.get("best_of_n"))
    if summary["ppo"]:
        out += ["", "## PPO training (last logged values)", ""]
        out.append(
            markdown_table(
                ["stage", "last step", *PPO_SERIES],
                [
                    [p["stage"], str(p["last_step"]), *(_fmt(p[k]) for k in PPO_SERIES)]
                    for p in summary["ppo"]
                ],
            )
        )
    if summary.get("plots"):
        out += ["", "## Plots", ""] + [f"![{p}]({p})" for p in summary["plots"]]
    return "\n".join(out) + "\n"


def best_of_n_lines(bon: Mapping[str, Any] | None) -> list[str]:
    """One printed line per best-of-n selector: its win rate at each n (none when not run)."""
    if not bon:
        return []
    return [
        f"best-of-n from {bon['policy']} by {c['selector']}, win rate vs {bon['reference']}: "
        + ", ".join(f"n={n} {w:.3f}" for n, w in zip(bon["n"], c["win_rate"], strict=True))
        for c in bon["curves"]
    ]


def best_of_n_markdown(bon: Mapping[str, Any] | None) -> list[str]:
    """The best-of-n section of results.md (no lines when it was not run)."""
    if not bon:
        return []
    out = [
        "",
        "## Best-of-n: over-optimisation without RL",
        "",
        f"Per prompt {bon['samples']} samples of {bon['policy']}; keep the one of n the "
        "selector scores highest (exact expectation over all draws of n). Win rate against "
        f"{bon['reference']} (gold judge) at KL = log n - (n-1)/n nats. Gao et al. (2022) "
        "find RL less KL-efficient than best-of-n: PPO against an RM is not expected to beat "
        "that RM's curve.",
        "",
    ]
    head = [
        "selector",
        *(f"n={n} (KL {kl:.2f})" for n, kl in zip(bon["n"], bon["kl"], strict=True)),
    ]
    rows = [
        [
            c["selector"],
            *(
                _pm({"win_rate": w, "stderr": e})
                for w, e in zip(c["win_rate"], c["stderr"], strict=True)
            ),
        ]
        for c in bon["curves"]
    ]
    return [*out, markdown_table(head, rows)]


# ---------------------------------------------------------------- plots
def figure(width: float, height: float, ncols: int = 1):
    """A matplotlib Figure with `ncols` axes side by side, drawn off-screen (no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]
    return fig, axes


def plot_win_rates(summary: Mapping[str, Any], path: str) -> None:
    """The paper's Figure 1: x = model type, a line per size, error bars = 1 standard error."""
    fig, (ax,) = figure(7, 4.5)
    names = labels(summary)
    x = np.arange(len(names))
    for size, head in sizes(summary):
        found = [_find(summary, size, label) for label in names]
        xs = [i for i, m in zip(x, found, strict=True) if m]
        ys = [m["win_rate"] for m in found if m]
        es = [m["stderr"] or 0.0 for m in found if m]
        ax.errorbar(xs, ys, yerr=es, marker="o", capsize=4, label=head)
    ax.axhline(0.5, color="grey", linestyle="--", linewidth=1)
    ax.set_xticks(x, names, rotation=15)
    ax.set_ylim(0, 1)
    ax.set_ylabel(f"win rate against {summary['reference']['stage']}")
    ax.set_title("Gold-judge preference (ties 1/2)")
    ax.legend(title="model size")
    fig.tight_layout()
    fig.savefig(path)


def plot_family_win_rates(summary: Mapping[str, Any], path: str) -> None:
    heads = dict(sizes(summary))
    fams = summary["settings"]["families"]
    models = summary["models"]
    grid = np.array(
        [
            [
                np.nan
                if m["families"].get(f, {}).get("win_rate") is None
                else m["families"][f]["win_rate"]
                for f in fams
            ]
            for m in models
        ]
    )
    fig, (ax,) = figure(1.0 + 0.8 * len(fams), 1.5 + 0.4 * len(models))
    image = ax.imshow(grid, vmin=0, vmax=1, cmap="RdBu", aspect="auto")
    ax.set_xticks(np.arange(len(fams)), fams, rotation=30, ha="right")
    ax.set_yticks(np.arange(len(models)), [_name(m, heads) for m in models])
    for i, j in np.ndindex(grid.shape):
        if np.isfinite(grid[i, j]):
            ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=7)
    fig.colorbar(image, ax=ax, label="win rate")
    ax.set_title(f"Win rate against {summary['reference']['stage']} by family")
    fig.tight_layout()
    fig.savefig(path)


def plot_ppo_training(runs: Mapping[str, Sequence[Mapping]], path: str) -> bool:
    """RM score, KL (and beta, gold score when logged) against PPO iteration."""
    names = [n for n in PPO_SERIES if any(len(series(r, n)[0]) for r in runs.values())]
    if not names:
        return False
    fig, axes = figure(4 * len(names), 3.5, ncols=len(names))
    for ax, name in zip(axes, names, strict=True):
        for stage, rows in runs.items():
            steps, values = series(rows, name)
            if len(steps):
                ax.plot(steps, values, marker="." if len(steps) < 30 else None, label=stage)
        ax.set_xlabel("PPO iteration")
        ax.set_title(name)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    return True


def plot_overoptimization(
    summary: Mapping[str, Any], runs: Mapping[str, Sequence[Mapping]], path: str
) -> bool:
    """Proxy (RM score) and gold quality against KL: over-optimisation shows as gold falling
    while the RM score keeps rising. Gold comes from the PPO logs when they have a gold score;
    the final eval win rate of each PPO model is plotted at its final (smoothed) KL."""
    pairs = {
        s: (series(r, "kl"), series(r, "score"), series(r, "gold_score")) for s, r in runs.items()
    }
    pairs = {s: p for s, p in pairs.items() if len(p[0][0])}
    if not pairs:
        return False
    has_gold = any(len(g[0]) for _, _, g in pairs.values())
    fig, axes = figure(4.5 * (2 + has_gold), 3.8, ncols=2 + has_gold)
    for stage, ((ks, kl), (ss, score), (gs, gold)) in pairs.items():
        axes[0].plot(*_by_step(ks, kl, ss, score), marker=".", label=stage)
        if has_gold and len(gs):
            axes[1].plot(*_by_step(ks, kl, gs, gold), marker=".", label=stage)
    _plot_final_win_rates(axes[-1], summary, runs, marker="o")
    axes[-1].axhline(0.5, color="grey", linestyle="--", linewidth=1)
    titles = [
        "RM score (proxy) vs KL",
        *(["gold score vs KL"] if has_gold else []),
        "final eval win rate vs final KL",
    ]
    for ax, title in zip(axes, titles, strict=True):
        ax.set_xlabel("KL(policy || reference), nats per response")
        ax.set_title(title)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    return True


def plot_best_of_n(
    summary: Mapping[str, Any], runs: Mapping[str, Sequence[Mapping]], path: str
) -> None:
    """Best-of-n win rate against KL for each selector (RMs, gold judge), with each PPO
    model's final eval win rate at its final (smoothed) KL for comparison."""
    bon = summary["best_of_n"]
    fig, (ax,) = figure(6.0, 4.2)
    for c in bon["curves"]:
        ax.errorbar(
            bon["kl"],
            c["win_rate"],
            yerr=[e or 0.0 for e in c["stderr"]],
            marker="o",
            capsize=3,
            linestyle="--" if c["selector"] == "gold judge" else "-",
            label=f"best-of-n by {c['selector']}",
        )
    _plot_final_win_rates(ax, summary, runs, marker="s")
    ax.axhline(0.5, color="grey", linestyle="--", linewidth=1)
    ax.set_xlabel(f"KL, nats per response (best-of-n: to {bon['policy']}; PPO: to its init)")
    ax.set_ylabel(f"win rate vs {bon['reference']} (gold judge)")
    ax.set_title(f"best-of-n from {bon['policy']} and PPO")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)


def _plot_final_win_rates(ax, summary, runs, marker: str) -> None:
    """Each PPO model's final eval win rate (with stderr) at its final (smoothed) KL."""
    heads = dict(sizes(summary))
    for m in summary["models"]:
        kl = series(runs[m["stage"]], "kl")[1] if m["stage"] in runs else ()
        if len(kl) and not m["fewshot"]:
            ax.errorbar(
                [float(trailing_mean(kl)[-1])],
                [m["win_rate"]],
                yerr=[m["stderr"] or 0.0],
                marker=marker,
                capsize=4,
                linestyle="none",
                label=_name(m, heads),
            )


def _by_step(kl_steps, kl, y_steps, y) -> tuple[np.ndarray, np.ndarray]:
    """(KL, y) at the steps that log both, each a trailing mean over ~10% of those steps:
    per-iteration KL is noisy, and an unsmoothed curve zigzags back and forth in KL."""
    _, ik, iy = np.intersect1d(kl_steps, y_steps, return_indices=True)
    return trailing_mean(kl[ik]), trailing_mean(y[iy])


def trailing_mean(x: np.ndarray, fraction: float = 0.1) -> np.ndarray:
    """Mean of each value and the ones before it, over a window of max(1, fraction x len)."""
    w = max(1, int(len(x) * fraction))
    c = np.cumsum(np.concatenate([[0.0], np.asarray(x, np.float64)]))
    lo = np.maximum(np.arange(1, len(x) + 1) - w, 0)
    return (c[1:] - c[lo]) / (np.arange(1, len(x) + 1) - lo)


def write_plots(
    summary: Mapping[str, Any], runs: Mapping[str, Sequence[Mapping]], out_dir: str
) -> list[str]:
    """Writes the PNGs into out_dir; returns their file names."""
    written = ["win_rate.png", "win_rate_by_family.png"]
    plot_win_rates(summary, os.path.join(out_dir, written[0]))
    plot_family_win_rates(summary, os.path.join(out_dir, written[1]))
    if runs and plot_ppo_training(runs, os.path.join(out_dir, "ppo_training.png")):
        written.append("ppo_training.png")
    if runs and plot_overoptimization(summary, runs, os.path.join(out_dir, "overoptimization.png")):
        written.append("overoptimization.png")
    if summary.get("best_of_n"):
        plot_best_of_n(summary, runs, os.path.join(out_dir, "best_of_n.png"))
        written.append("best_of_n.png")
    return written
