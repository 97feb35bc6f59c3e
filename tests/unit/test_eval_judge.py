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
