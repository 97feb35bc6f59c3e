"""The algorithms comparison (experiments/tiny_instructgpt.py `:algorithms`): what each
model's training stage cost, and the win-rate-against-KL frontier of all of them.

  training_cost(workdir, stage)   {"train_seconds", "train_peak_rss_mb", "train_device_peak_mb"}
                                  from the stage's DONE marker (main._run_stage writes them)
  frontier_lines(summary)         Markdown table: win rate, gold score, KL to the reference,
                                  held-out NLL, wall time and peak memory of each model (the
                                  latter two from summary["training_costs"][stage])
  plot_frontier(summary, path)    win rate vs KL of every evaluated model, with best-of-n's
                                  curve(s): the paper-style frontier, one PNG
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

from instructrl.stages import DONE_MARKER


def training_cost(workdir: str, stage: str) -> dict[str, float | None]:
    """Wall time and peak memory of `stage`'s run (None where the marker lacks them).

    The peak RSS is the process's peak up to the stage's end (ru_maxrss): exact for a stage
    run in its own process (`--config.stages=NAME`), an upper bound after earlier stages in
    the same process. The device peak is the accelerator's peak_bytes_in_use (None on CPU).
    """
    path = os.path.join(workdir, stage, DONE_MARKER)
    try:
        with open(path, encoding="utf-8") as f:
            done = json.loads(f.read() or "{}")
    except (OSError, json.JSONDecodeError):
        done = {}
    return {
        "train_seconds": done.get("seconds"),
        "train_peak_rss_mb": done.get("peak_rss_mb"),
        "train_device_peak_mb": done.get("device_peak_mb"),
    }


def _fmt(x: float | None, spec: str) -> str:
    return "—" if x is None else format(x, spec)


def frontier_lines(summary: Mapping[str, Any]) -> list[str]:
    """One Markdown row per evaluated model (few-shot prompting left out)."""
    rows = [
        "| model | win rate vs ref | gold score | KL to ref | held-out NLL | train s | peak RSS MB |",
        "|---|---|---|---|---|---|---|",
    ]
    costs = summary.get("training_costs", {})
    for m in summary["models"]:
        if m.get("fewshot"):
            continue
        cost = costs.get(m["stage"], {})
        rows.append(
            f"| {m['label']} | {_fmt(m.get('win_rate'), '.3f')} | "
            f"{_fmt(m.get('gold_score'), '.3f')} | {_fmt(m.get('kl_to_reference'), '.2f')} | "
            f"{_fmt(m.get('heldout_nll'), '.3f')} | {_fmt(cost.get('train_seconds'), '.0f')} | "
            f"{_fmt(cost.get('train_peak_rss_mb'), '.0f')} |"
        )
    return rows


def frontier_points(summary: Mapping[str, Any]) -> tuple[list[dict], list[dict]]:
    """(drawn, off the chart): the models with both a win rate and a KL (few-shot rows have
    no KL). A base model sits tens of nats away and would squash the frontier into a corner:
    a point over 4x the largest of the other KLs (best-of-n's included, at least 1 nat) is
    named, not drawn."""
    points = [
        m
        for m in summary["models"]
        if not m.get("fewshot")
        and m.get("kl_to_reference") is not None
        and m.get("win_rate") is not None
    ]
    near = [m["kl_to_reference"] for m in points] + list(
        (summary.get("best_of_n") or {}).get("kl") or []
    )
    scale = 4.0 * max([*sorted(near)[: max(1, len(near) - 1)], 1.0])
    return (
        [m for m in points if m["kl_to_reference"] <= scale],
        [m for m in points if m["kl_to_reference"] > scale],
    )


def plot_frontier(summary: Mapping[str, Any], path: str) -> bool:
    """Win rate against KL to the reference for every model with both (one point each, with
    its standard error) and best-of-n's curve per selector (KL log n - (n-1)/n). Returns
    whether anything was drawn (and written)."""
    from instructrl.eval.plots import figure

    points, off = frontier_points(summary)
    bon = summary.get("best_of_n") or {}
    if not points and not bon:
        return False
    fig, (ax,) = figure(6.4, 4.4)
    for c in bon.get("curves", []):
        ax.errorbar(
            bon["kl"], c["win_rate"], yerr=[e or 0.0 for e in c["stderr"]], marker=".",
            capsize=2, linestyle="--" if c["selector"] == "gold judge" else "-",
            label=f"best-of-n by {c['selector']}",
        )  # fmt: skip
    for m in points:
        ax.errorbar(
            [m["kl_to_reference"]], [m["win_rate"]], yerr=[m.get("stderr") or 0.0], marker="s",
            capsize=3, linestyle="none", label=m["label"],
        )  # fmt: skip
    ax.axhline(0.5, color="grey", linestyle="--", linewidth=1)
    ref = summary.get("reference", {}).get("stage", "reference")
    ax.set_xlabel(f"KL to {ref}, nats per response")
    ax.set_ylabel(f"win rate vs {ref} (gold judge)")
    ax.set_title("win rate against KL: every method from the same SFT and RM")
    if off:
        note = ", ".join(
            f"{m['label']} (KL {m['kl_to_reference']:.0f}: {m['win_rate']:.2f})" for m in off
        )
        ax.text(
            0.99, 0.02, f"off the chart: {note}", transform=ax.transAxes, ha="right", fontsize=7
        )
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    return True
