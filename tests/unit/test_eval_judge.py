"""One flaw removed: the reference's samples without trailing fillers (instructrl/eval/judge.py
`fillers_dropped`), judged by the gold scorer against a pair loop, and its line in the tables."""

from __future__ import annotations

import numpy as np
import pytest

from instructrl import world
from instructrl.eval import judge
from instructrl.eval import plots as eval_plots
from instructrl.world import FAMILY_NAMES
from tests.unit.test_eval_plots import _fake_summary


# ------------------------------------------------------------------ one flaw removed
def test_fillers_dropped_matches_a_pair_loop():
    """The reference's samples without trailing fillers against the samples as they are:
    every pair of one prompt judged by the gold scorer, ties 1/2, one prompt at a time."""
    rng = np.random.default_rng(3)
    records = [world.make_prompt(rng, family) for family in FAMILY_NAMES for _ in range(3)]
    texts, stopped = [], []
    for r in records:
        answer = " " + world.gold_answer(r, rng)
        row = [answer, answer + " ok", answer + " thanks so", " so", answer + " oops"]
        texts.append([row[i] for i in rng.permutation(5)[:4]])
        stopped.append([bool(x) for x in rng.integers(0, 2, 4)] if r is records[0] else [True] * 4)
    ref = judge.gold_scores(records, texts, stopped)
    got = judge.fillers_dropped(records, texts, stopped, ref)

    per_prompt, changed = [], 0
    for r, ts, ss, ref_row in zip(records, texts, stopped, ref, strict=True):
        outcomes = []
        for t, s in zip(ts, ss, strict=True):
            kept = t
            for _ in range(3):
                words = kept.split(" ")
                if len([w for w in words if w]) > 1 and words[-1] in world.FILLERS:
                    kept = " ".join(words[:-1])
            changed += kept != t
            mine = world.score(r, kept, s)
            outcomes += [1.0 if mine > o else 0.5 if mine == o else 0.0 for o in ref_row]
        per_prompt.append(np.mean(outcomes))
    assert got["rate"] == pytest.approx(changed / (4 * len(records)))
    assert 0.2 < got["rate"] < 0.8
    assert got["win_rate"] == pytest.approx(np.mean(per_prompt))
    assert got["stderr"] == pytest.approx(np.std(per_prompt, ddof=1) / np.sqrt(len(per_prompt)))
    assert got["win_rate"] > 0.55  # dropping a filler never lowers a gold score here
    assert got["n"] == len(records)

    # No filler anywhere: nothing changes, exactly 1/2, and no line in the tables.
    flat = [[" " + world.gold_answer(r)] * 2 for r in records]
    ok = [[True] * 2] * len(records)
    none = judge.fillers_dropped(records, flat, ok, judge.gold_scores(records, flat, ok))
    assert none["rate"] == 0.0 and none["win_rate"] == 0.5
    assert eval_plots.fillers_dropped_line({"stage": "sft", "fillers_dropped": none}) == ""
    assert eval_plots.fillers_dropped_line({"stage": "sft"}) == ""  # results before this
    line = eval_plots.fillers_dropped_line({"stage": "sft", "fillers_dropped": got})
    assert line.startswith(f"sft with its trailing filler words dropped ({got['rate']:.1%} ")
    summary = _fake_summary()
    summary["reference"]["fillers_dropped"] = got
    md = eval_plots.results_markdown(summary)
    assert line.replace("sft", "sft_large") in md
    assert "trailing filler" not in eval_plots.results_markdown(_fake_summary())


class WordTokenizer:
    """Enough of a tokenizer for response_metrics' length: one token per word."""

    def encode(self, text: str) -> list[str]:
        return text.split()


def test_response_metrics_win_rate_is_over_prompts():
    """The overall (and per-family) win rate of K samples per prompt against M reference
    samples: n is the number of prompts, the rate the mean of per-prompt outcomes (every
    sample x reference pair of the prompt, ties 1/2) and its stderr the standard error over
    those per-prompt outcomes, not over samples."""
    rng = np.random.default_rng(11)
    records = [world.make_prompt(rng, family) for family in FAMILY_NAMES for _ in range(4)]
    k, m = 4, 3
    texts, stopped, ref_texts, ref_stopped = [], [], [], []
    for r in records:
        for out, (ts, ss) in (
            ((texts, stopped), world.synthetic_responses(r, k, rng)),
            ((ref_texts, ref_stopped), world.synthetic_responses(r, m, rng)),
        ):
            out[0].append(ts)
            out[1].append(ss)
    ref_scores = judge.gold_scores(records, ref_texts, ref_stopped)
    got, scores = judge.response_metrics(records, texts, stopped, ref_scores, WordTokenizer())

    per_prompt, per_sample = [], []
    for r, ts, ss, refs in zip(records, texts, stopped, ref_scores, strict=True):
        rows = []
        for t, st in zip(ts, ss, strict=True):
            mine = world.score(r, t, st)
            rows.append([1.0 if mine > o else 0.5 if mine == o else 0.0 for o in refs])
        per_sample += [float(np.mean(row)) for row in rows]
        per_prompt.append(float(np.mean(rows)))
    per_prompt, per_sample = np.array(per_prompt), np.array(per_sample)
    n = len(records)
    assert got["n"] == n and scores.shape == (n, k)
    assert got["win_rate"] == pytest.approx(per_prompt.mean(), abs=1e-12)
    assert got["stderr"] == pytest.approx(per_prompt.std(ddof=1) / np.sqrt(n), rel=1e-9)
    # Over samples the mean is the same, but the spread is not: with the right n and the
    # per-sample standard error (or the per-sample n) the numbers differ from the above.
    assert 0.1 < per_prompt.mean() < 0.9 and len(per_sample) == n * k
    wrong = per_sample.std(ddof=1) / np.sqrt(n)
    assert abs(wrong - got["stderr"]) > 0.2 * got["stderr"], (wrong, got["stderr"])
    for family in FAMILY_NAMES:
        idx = [i for i, r in enumerate(records) if r["family"] == family]
        fam = got["families"][family]
        assert fam["n"] == len(idx) == 4, family
        assert fam["win_rate"] == pytest.approx(per_prompt[idx].mean(), abs=1e-12), family
        want = per_prompt[idx].std(ddof=1) / np.sqrt(len(idx))
        assert fam["stderr"] == pytest.approx(want, rel=1e-9), family


def test_drop_trailing_fillers_cases():
    cases = {
        " pink pink ok": " pink pink",
        " pink thanks so": " pink",
        " ok": " ok",  # the first word stays
        " ok ok": " ok",
        " so pink": " so pink",
        " pink ok\nInstruction: x": " pink ok\nInstruction: x",
        " pink okay": " pink okay",
        "": "",
        " ": " ",
    }
    for text, want in cases.items():
        assert world.drop_trailing_fillers(text) == want, text


def test_response_metrics_count_each_visible_flaw_per_sample():
    rng = np.random.default_rng(1)
    records = [world.make_prompt(rng, family) for family in FAMILY_NAMES]
    texts = [[" " + world.gold_answer(r), " sure " + world.gold_answer(r) + " ok"] for r in records]
    stopped = [[True, True] for _ in records]

    class Tok:
        def encode(self, text):
            return text.split()

    metrics, _ = judge.response_metrics(records, texts, stopped, None, Tok())
    flat = [t for ts in texts for t in ts]
    for kind in world.VISIBLE_FLAWS:
        want = np.mean([world.visible_flaws(t)[kind] for t in flat])
        assert metrics["flaws"][kind] == pytest.approx(want)
    assert metrics["flaws"]["hedge"] == pytest.approx(0.5)
