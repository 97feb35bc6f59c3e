"""Tests for the simulated labelers and the gold judge (instructrl/world/labelers.py)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from instructrl.world import gold_answer, make_prompt, score, synthetic_responses
from instructrl.world.labelers import (
    PAPER_AGREEMENT,
    LabelerPool,
    calibrate_noise,
    collect_comparisons,
    gold_compare,
    pairwise_agreement,
    win_rate_with_stderr,
)


def _sample(seed: int, n: int) -> tuple[list[dict], list[list[str]], list[list[bool]]]:
    """n prompts, each with K in 4..9 responses from the mock policy mix."""
    rng = np.random.default_rng(seed)
    prompts, responses, stopped = [], [], []
    for _ in range(n):
        p = make_prompt(rng)
        r, s = synthetic_responses(p, int(rng.integers(4, 10)), rng)
        prompts.append(p)
        responses.append(r)
        stopped.append(s)
    return prompts, responses, stopped


def test_rankings_are_permutations_and_duplicates_tie():
    pool = LabelerPool(seed=1)
    prompts, responses, stopped = _sample(0, 100)
    rng = np.random.default_rng(0)
    for p, rs, st in zip(prompts, responses, stopped, strict=True):
        rs = [*rs, rs[0]]  # an exact duplicate must tie with its original
        st = [*st, st[0]]
        ranking, groups = pool.rank(p, rs, st, rng)
        assert sorted(ranking) == list(range(len(rs)))
        assert [i for g in groups for i in g] == ranking
        assert any(0 in g and len(rs) - 1 in g for g in groups)
        perceived = pool.perceived_scores(p, rs, st, 0, np.random.default_rng(1))
        assert perceived.shape == (len(rs),) and perceived[0] == perceived[-1]


def test_rank_is_deterministic_given_rng():
    pool = LabelerPool()
    prompts, responses, stopped = _sample(1, 20)
    for p, rs, st in zip(prompts, responses, stopped, strict=True):
        a = pool.rank(p, rs, st, np.random.default_rng(5))
        b = pool.rank(p, rs, st, np.random.default_rng(5))
        assert a == b


def test_noise_free_labeler_ranks_by_gold_score_and_ties_equal_scores():
    pool = LabelerPool(noise=0.0, length_bias=0.0)
    prompts, responses, stopped = _sample(2, 100)
    rng = np.random.default_rng(0)
    for p, rs, st in zip(prompts, responses, stopped, strict=True):
        gold = [score(p, r, s) for r, s in zip(rs, st, strict=True)]
        ranking, groups = pool.rank(p, rs, st, rng)
        assert all(gold[a] >= gold[b] for a, b in itertools.pairwise(ranking))
        assert all(len({gold[i] for i in g}) == 1 for g in groups)
        assert len(groups) == len(set(gold))


def test_length_bias_direction():
    pool = LabelerPool(noise=0.0, length_bias=0.5, num_labelers=6, seed=3)
    _, bias = pool.traits()
    record = {
        "prompt": "x",
        "family": "word_limit",
        "params": {"animal": "frog", "attribute": "colour", "limit": 5},
    }
    short, long = " green", " a frog is usually green"
    assert score(record, short) == score(record, long) == 1.0
    for labeler in range(6):
        ranking, _ = pool.rank(record, [short, long], None, np.random.default_rng(0), labeler)
        assert ranking == ([1, 0] if bias[labeler] > 0 else [0, 1])


def _naive_agreement(pool, prompts, responses, stopped, rng) -> float:
    """Python-loop reference: same random draws as pairwise_agreement, pairs counted one by one."""
    total = count = 0.0
    for p, rs, st in zip(prompts, responses, stopped, strict=True):
        keys = list(dict.fromkeys(zip(rs, st, strict=True)))
        if len(keys) < 2:
            continue
        l1, l2 = (int(x) for x in rng.choice(pool.num_labelers, size=2, replace=False))
        s1 = pool.perceived_scores(p, [k[0] for k in keys], [k[1] for k in keys], l1, rng)
        s2 = pool.perceived_scores(p, [k[0] for k in keys], [k[1] for k in keys], l2, rng)
        for i in range(len(keys)):
            for j in range(i + 1, len(keys)):
                o1 = int(s1[i] > s1[j]) - int(s1[i] < s1[j])
                o2 = int(s2[i] > s2[j]) - int(s2[i] < s2[j])
                total += 1.0 if o1 == o2 else 0.5 if o1 == 0 or o2 == 0 else 0.0
                count += 1
    return total / count


def test_pairwise_agreement_matches_naive_reference():
    prompts, responses, stopped = _sample(3, 60)
    for pool in (LabelerPool(), LabelerPool(noise=0.05, length_bias=0.2, seed=4)):
        got = pairwise_agreement(pool, prompts, responses, np.random.default_rng(9), stopped)
        want = _naive_agreement(pool, prompts, responses, stopped, np.random.default_rng(9))
        assert got == pytest.approx(want, abs=1e-12)
    exact = LabelerPool(noise=0.0, length_bias=0.0)
    assert pairwise_agreement(exact, prompts, responses, np.random.default_rng(0), stopped) == 1.0
    chaos = LabelerPool(noise=100.0)
    assert (
        abs(pairwise_agreement(chaos, prompts, responses, np.random.default_rng(0), stopped) - 0.5)
        < 0.05
    )


def test_default_pool_agreement_matches_paper_on_fresh_samples():
    # Fresh prompts/responses (the default noise was fitted on other seeds); measured, not assumed.
    prompts, responses, stopped = _sample(1234, 500)
    for seed in (0, 1):
        pool = LabelerPool(seed=seed)
        agreement = pairwise_agreement(
            pool, prompts, responses, np.random.default_rng(seed + 7), stopped
        )
        assert abs(agreement - PAPER_AGREEMENT) < 0.04, agreement


def test_calibrate_noise_hits_target_on_held_out_samples():
    fit = _sample(10, 300)
    held_out = _sample(11, 400)
    for target in (0.65, 0.8):
        noise = calibrate_noise(LabelerPool(), *fit, target=target, seed=0)
        pool = LabelerPool(noise=noise)
        measured = pairwise_agreement(
            pool, held_out[0], held_out[1], np.random.default_rng(3), held_out[2]
        )
        assert abs(measured - target) < 0.03, (target, noise, measured)
    with pytest.raises(ValueError, match="target agreement"):
        calibrate_noise(LabelerPool(), *fit, target=0.999)


def test_collect_comparisons_format_and_ties_dropped():
    prompts, responses, stopped = _sample(4, 80)
    prompts.append(prompts[0])
    responses.append([" same", " same", " same"])  # one distinct response: no comparison
    stopped.append([True, True, True])
    pool = LabelerPool()
    out = collect_comparisons(prompts, responses, stopped, pool, np.random.default_rng(0))
    again = collect_comparisons(prompts, responses, stopped, pool, np.random.default_rng(0))
    assert out == again
    assert 70 <= len(out) <= 80
    for rec in out:
        k = len(rec["responses"])
        assert k >= 2 and sorted(rec["ranking"]) == list(range(k))
        assert isinstance(rec["prompt"], str) and rec["family"] and "params" in rec
        assert 0 <= rec["labeler"] < pool.num_labelers
    assert not any("ties" in rec for rec in out)  # noisy labelers separate distinct texts
    gold_pool = LabelerPool(noise=0.0, length_bias=0.0)
    tied = 0
    for rec in collect_comparisons(prompts, responses, None, gold_pool, np.random.default_rng(0)):
        assert len(set(rec["responses"])) == len(rec["responses"])  # duplicates collapsed
        assert_ranked_by_gold(rec)
        tied += len(rec.get("ties", []))
    assert tied > 0  # distinct responses with equal gold scores are kept as ties


def assert_ranked_by_gold(rec: dict) -> None:
    """The record's ranking puts strictly better gold scores first; responses with equal
    gold scores are exactly its tie groups."""
    stopped = rec.get("stopped", [True] * len(rec["responses"]))
    gold = {i: score(rec, rec["responses"][i], stopped[i]) for i in rec["ranking"]}
    group = {i: n for n, g in enumerate(rec.get("ties", [])) for i in g}
    for a, b in itertools.pairwise(rec["ranking"]):
        same = a in group and group.get(b) == group[a]
        assert gold[a] == gold[b] if same else gold[a] > gold[b], (rec["prompt"], gold)


def test_gold_compare_and_ties():
    rng = np.random.default_rng(0)
    r = make_prompt(rng, "list")
    good, other_good = gold_answer(r), gold_answer(r, rng)
    assert gold_compare(r, good, " nothing") == 1.0
    assert gold_compare(r, " nothing", good) == 0.0
    assert gold_compare(r, good, other_good) == 0.5
    assert gold_compare(r, good, good, stopped_a=True, stopped_b=False) == 1.0


def test_win_rate_with_stderr_matches_float64_reference():
    rng = np.random.default_rng(0)
    for n in (2, 7, 500):
        x = rng.choice([0.0, 0.5, 1.0], size=n).tolist()
        mean = sum(x) / n
        var = sum((v - mean) ** 2 for v in x) / (n - 1)
        got_mean, got_se = win_rate_with_stderr(x)
        assert got_mean == pytest.approx(mean, abs=1e-12)
        assert got_se == pytest.approx(math.sqrt(var / n), abs=1e-12)
    assert math.isnan(win_rate_with_stderr([1.0])[1])
    with pytest.raises(ValueError):
        win_rate_with_stderr([])
