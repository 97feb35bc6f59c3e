"""Pure measurements of the `eval` stage (instructrl/stages/evaluate.py): win rates against a
reference with standard errors, the explicit-constraint check, and held-out LM loss.

No files, no config: arrays and records in, numbers out.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from instructrl.models import Transformer, positions_from_mask, sequence_logprobs
from instructrl.world import labelers
from instructrl.world.vocab import answer_words


# ---------------------------------------------------------------- win rates
def pairwise_outcomes(model_scores: np.ndarray, ref_scores: np.ndarray) -> np.ndarray:
    """Per-prompt win rate f64 [N] of gold scores [N, K] against reference scores [N, M]:
    the mean over all K x M pairs of 1 (model higher), 1/2 (equal), 0 (lower)."""
    a = np.asarray(model_scores, np.float64)[:, :, None]
    b = np.asarray(ref_scores, np.float64)[:, None, :]
    return np.mean(np.where(a > b, 1.0, np.where(a == b, 0.5, 0.0)), axis=(1, 2))


def ranking_accuracy(scores: np.ndarray, gold: np.ndarray) -> tuple[float | None, int]:
    """How well `scores` [N, K] (e.g. an RM's) order K responses of each prompt as the gold
    judge does (gold [N, K]): over the within-prompt pairs whose gold scores differ, the share
    ordered alike (equal `scores` count 1/2), and the number of such pairs (None when 0)."""
    s = np.asarray(scores, np.float64)
    g = np.asarray(gold, np.float64)
    k = g.shape[1]
    upper = np.triu(np.ones((k, k), bool), 1)[None]
    ds = s[:, :, None] - s[:, None, :]
    dg = g[:, :, None] - g[:, None, :]
    pairs = upper & (dg != 0)
    credit = np.where(ds == 0, 0.5, (np.sign(ds) == np.sign(dg)).astype(np.float64))
    n = int(pairs.sum())
    return (float(credit[pairs].mean()) if n else None), n


def best_of_n_outcomes(
    selector_scores: np.ndarray, gold: np.ndarray, ref_scores: np.ndarray, n: int
) -> np.ndarray:
    """Per-prompt expected win rate f64 [N] of best-of-n sampling against ref_scores [N, M].

    Each prompt has S >= n samples with `selector_scores` [N, S] (e.g. an RM's, or the gold
    scores themselves for an oracle) and gold scores `gold` [N, S]. Best-of-n draws n of the
    S samples uniformly without replacement and keeps the one the selector scores highest
    (ties: the lowest index). The result is the exact expectation over all C(S, n) draws,
    not one draw: the sample of selector rank r (0 = lowest) is kept with probability
    C(r, n-1) / C(S, n) (Nakano et al. 2021's unbiased best-of-n estimator). Its outcome
    is its win rate against the M reference samples (ties 1/2).
    """
    sel = np.asarray(selector_scores, np.float64)
    g = np.asarray(gold, np.float64)
    if sel.shape != g.shape or sel.ndim != 2:
        raise ValueError(f"best_of_n_outcomes: shapes {sel.shape} and {g.shape} must be [N, S]")
    s = sel.shape[1]
    if not 1 <= n <= s:
        raise ValueError(f"best_of_n_outcomes: n={n} must be in [1, {s}] (samples per prompt)")
    values = pairwise_outcomes(g.reshape(-1, 1), np.repeat(ref_scores, s, axis=0))
    values = values.reshape(sel.shape)
    # ascending selector rank; among equal scores the lowest index ranks highest
    order = np.lexsort((-np.arange(s)[None, :].repeat(len(sel), 0), sel), axis=-1)
    weights = np.array([math.comb(r, n - 1) for r in range(s)], np.float64) / math.comb(s, n)
    return np.sum(np.take_along_axis(values, order, axis=1) * weights, axis=1)


def best_of_n_kl(n: int) -> float:
    """KL(best-of-n || base) = log n - (n - 1) / n nats, the analytic value for a continuous
    selector score (Stiennon et al. 2020); an upper bound when samples repeat."""
    return math.log(n) - (n - 1) / n


def win_rate(outcomes: Sequence[float]) -> dict[str, float | int | None]:
    """{"win_rate", "stderr" (None for one prompt), "n"} of per-prompt outcomes."""
    mean, se = labelers.win_rate_with_stderr(outcomes)
    return {"win_rate": mean, "stderr": None if np.isnan(se) else se, "n": len(outcomes)}


# ---------------------------------------------------------------- constraints
def constraints_kept(record: dict, response: str, stopped: bool = True) -> bool | None:
    """Whether a response keeps the explicit constraint its prompt states; None if it states none.

    The tasks' gold scorers mix constraint and content; this checks the constraint alone:
      one_word    "in one word"             exactly one answer word
      word_limit  "in at most N words"      1..N answer words
      list        "K items", "but not X",   exactly K words, X not among them, every
                  "below N"                 number below N
    A response that keeps talking after its answer, or never stops, breaks a length or
    count constraint whatever its first line says.
    """
    family, p = record.get("family"), record.get("params", {})
    if family not in ("one_word", "word_limit", "list"):
        return None
    words, extra = answer_words(response)
    if extra or not stopped or not words:
        return False
    if family == "one_word":
        return len(words) == 1
    if family == "word_limit":
        return len(words) <= p["limit"]
    if p.get("exclude") is not None and p["exclude"] in words:
        return False
    if p.get("limit") is not None and not all(w.isdigit() and int(w) < p["limit"] for w in words):
        return False
    return len(words) == p["k"]


# ---------------------------------------------------------------- held-out LM loss
def token_nll(
    model: Transformer, params: Any, tokens: jax.Array, mask: jax.Array, loss_mask: jax.Array
) -> jax.Array:
    """Next-token NLL f32 [B, T-1] of right-padded rows tokens/mask/loss_mask int32 [B, T].

    Entry t is -log p(tokens[t+1] | tokens[:t+1]); 0 where loss_mask[t+1] == 0 (not counted).
    """
    inputs_, in_mask = tokens[:, :-1], mask[:, :-1]
    logp = sequence_logprobs(
        model,
        params,
        inputs_,
        positions_from_mask(in_mask),
        in_mask,
        tokens[:, 1:],
        loss_mask[:, 1:],
    )
    return -logp


def _row_nll(model: Transformer, params: Any, tokens, mask, loss_mask) -> jax.Array:
    """Summed next-token NLL f32 [B] of token rows (token_nll summed over T)."""
    return jnp.sum(token_nll(model, params, tokens, mask, loss_mask), axis=1)


# Compiled once per (model config, shapes): eval scores six models of one config on the same
# held-out and public-task rows, which a jit built inside each call recompiled every time.
_row_nll_jit = jax.jit(_row_nll, static_argnums=0)


def batched_nll(
    model: Transformer,
    params: Any,
    rows: Sequence[Sequence[int]],
    first_counted: Sequence[int],
    *,
    pad_id: int,
    batch_size: int,
) -> tuple[np.ndarray, np.ndarray]:
    """(summed NLL f64 [R], counted tokens [R]) of token rows; row r counts its tokens from
    index first_counted[r] (>= 1) on. Rows are right-padded to one length and batches to
    batch_size rows, so the jitted forward compiles once per model config and row length."""
    if not rows:
        raise ValueError("batched_nll: no rows")
    length = max(len(r) for r in rows)
    if length > model.config.max_len + 1:
        raise ValueError(f"batched_nll: a row of {length} tokens exceeds max_len + 1")
    sums, counts = np.zeros(len(rows)), np.zeros(len(rows), np.int64)
    for start in range(0, len(rows), batch_size):
        chunk = list(range(start, min(start + batch_size, len(rows))))
        tokens = np.full((batch_size, length), pad_id, np.int32)
        mask = np.zeros((batch_size, length), np.int32)
        loss_mask = np.zeros((batch_size, length), np.int32)
        for i in range(batch_size):  # filler rows repeat the first one, uncounted
            r = chunk[i] if i < len(chunk) else chunk[0]
            tokens[i, : len(rows[r])], mask[i, : len(rows[r])] = rows[r], 1
            if i < len(chunk):
                loss_mask[i, first_counted[r] : len(rows[r])] = 1
        out = np.asarray(_row_nll_jit(model, params, tokens, mask, loss_mask), np.float64)
        sums[chunk] = out[: len(chunk)]
        counts[chunk] = loss_mask[: len(chunk)].sum(axis=1)
    return sums, counts


def text_windows(token_ids: Sequence[int], window: int) -> list[list[int]]:
    """[BOS] text [EOS] ids cut into rows of <= window + 1 tokens that overlap by one, so each
    token after the first is predicted exactly once (a row's first token is context only)."""
    ids = list(token_ids)
    return [ids[s : s + window + 1] for s in range(0, max(len(ids) - 1, 1), window)]
