"""The gold judge on sampled responses: gold scores, win rates against a reference's samples
(overall and per family), constraints and length, the worth of dropping trailing filler
words, and best-of-n curves by any selector (an RM or the gold judge itself)."""

from __future__ import annotations

import logging

import numpy as np

from instructrl import world
from instructrl.eval.metrics import (
    best_of_n_kl,
    best_of_n_outcomes,
    constraints_kept,
    pairwise_outcomes,
    win_rate,
)


def best_of_n(config, name, bon: dict | None, rm_selectors: dict, ref_scores) -> dict | None:
    """Best-of-n from the samples `bon` against each RM (rm_selectors: label -> raw scores
    [N, S] of those samples) and against the gold judge itself: RL-free over-optimisation
    (Gao et al. 2022).

    For n = 1, 2, 4, ... up to `best_of_n` the exact expected win rate (against the
    reference's eval samples, gold judge) of keeping the one of n that the selector scores
    highest, at KL(best-of-n || sampled model) = log n - (n-1)/n nats. An RM whose curve falls
    as n grows is being over-optimised; Gao et al. find RL less KL-efficient than best-of-n,
    so PPO against that RM is not expected to beat its curve. None when `bon` is None.
    """
    if bon is None:
        return None
    c = config[name]
    gold = bon["gold"]
    ns = sorted({2**i for i in range(c.best_of_n.bit_length())} | {c.best_of_n})
    curves = []
    for label, scores in {"gold judge": gold, **rm_selectors}.items():
        points = [win_rate(best_of_n_outcomes(scores, gold, ref_scores, n)) for n in ns]
        curves.append(
            {
                "selector": label,
                "win_rate": [p["win_rate"] for p in points],
                "stderr": [p["stderr"] for p in points],
            }
        )
        logging.info(
            "%s: best-of-n by %s: %s",
            name,
            label,
            dict(zip(ns, curves[-1]["win_rate"], strict=True)),
        )
    return {
        "policy": bon["policy"],
        "reference": c.reference,
        "samples": c.best_of_n,
        "n": ns,
        "kl": [best_of_n_kl(n) for n in ns],
        "curves": curves,
    }


def gold_scores(records, texts, stopped) -> np.ndarray:
    """Gold scores f64 [N, k] of texts/stopped [N][k] for their prompt records."""
    return np.array(
        [
            [world.score(r, t, s) for t, s in zip(ts, ss, strict=True)]
            for r, ts, ss in zip(records, texts, stopped, strict=True)
        ]
    )


def fillers_dropped(records, texts, stopped, ref_scores) -> dict:
    """What removing one visible flaw alone is worth: the reference's samples `texts` [N][M]
    with their trailing filler words dropped (world.drop_trailing_fillers; the slip of
    world.demo_slips="filler"), judged against the samples as they are (ref_scores [N, M]).
    {"rate": share of samples that end in a filler, "win_rate", "stderr", "n"}."""
    dropped = [[world.drop_trailing_fillers(t) for t in ts] for ts in texts]
    changed = [
        d != t for ds, ts in zip(dropped, texts, strict=True) for d, t in zip(ds, ts, strict=True)
    ]
    outcomes = pairwise_outcomes(gold_scores(records, dropped, stopped), ref_scores)
    return {"rate": float(np.mean(changed)), **win_rate(outcomes)}


def response_metrics(records, texts, stopped, ref_scores, tokenizer) -> tuple[dict, np.ndarray]:
    """Win rate against ref_scores [N, M] (overall, per family; left out when None), gold
    score, constraints and length of one model's samples; and its gold scores [N, k]."""
    scores = gold_scores(records, texts, stopped)
    outcomes = None if ref_scores is None else pairwise_outcomes(scores, ref_scores)
    kept = [
        constraints_kept(r, t, s)
        for r, ts, ss in zip(records, texts, stopped, strict=True)
        for t, s in zip(ts, ss, strict=True)
    ]
    kept = [x for x in kept if x is not None]
    flat = [t for ts in texts for t in ts]
    families = {}
    for fam in world.FAMILY_NAMES:
        idx = [i for i, r in enumerate(records) if r["family"] == fam]
        if idx:
            wins = {} if outcomes is None else win_rate(outcomes[idx])
            families[fam] = {**wins, "gold_score": float(scores[idx].mean()), "n": len(idx)}
    metrics = {
        **({"n": len(records)} if outcomes is None else win_rate(outcomes)),
        "gold_score": float(scores.mean()),
        "perfect_rate": float(np.mean(scores >= 1.0)),
        "constraint_rate": float(np.mean(kept)) if kept else None,
        "constraint_responses": len(kept),
        "stopped_rate": float(np.mean([s for ss in stopped for s in ss])),
        "length_words": float(np.mean([len(t.split()) for t in flat])),
        "length_tokens": float(np.mean([len(tokenizer.encode(t)) for t in flat])),
        # share of samples showing each visible demonstrator flaw (world.visible_flaws)
        "flaws": {
            k: float(np.mean([world.visible_flaws(t)[k] for t in flat]))
            for k in world.VISIBLE_FLAWS
        },
        "families": families,
    }
    return metrics, scores
