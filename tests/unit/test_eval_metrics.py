"""Win rates and the other numbers of the `eval` stage (instructrl/eval/metrics.py).

Win-rate aggregation against hand computations and the gold judge, RM ranking accuracy and
best-of-n against pair loops, the constraint check, held-out NLL against a naive float64
loop. The stage itself: tests/stages/test_evaluate.py; tables and plots: test_eval_plots.py.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from instructrl.eval import metrics as eval_metrics
from instructrl.models import ModelConfig, Transformer, positions_from_mask
from instructrl.world import labelers, make_prompt, score, synthetic_responses


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
