"""Tests for the synthetic instruction world (instructrl/world).

The `world` stage through the command line: tests/stages/test_world.py.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from instructrl.world import (
    EXTRA_TEXT_FACTOR,
    FAMILY_NAMES,
    NO_STOP_FACTOR,
    PROMPT_SUFFIX,
    format_completion,
    gold_answer,
    make_demonstration,
    make_prompt,
    pretrain_corpus,
    prompt_split,
    public_task,
    public_task_accuracy,
    score,
    synthetic_responses,
    vocab,
    write_world,
)
from instructrl.world.families import slip
from instructrl.world.splits import SPLIT_FRACTIONS, pretrain_prompt_sampler
from instructrl.world.vocab import fact, perturb_answer

SMALL = dict(
    num_pretrain=300,
    num_pretrain_heldout=50,
    num_demonstrations=200,
    num_rm=100,
    num_ppo=200,
    num_eval=90,
    num_public=60,
)


def _records(family: str, n: int = 40, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [make_prompt(rng, family) for _ in range(n)]


def _rec(family: str, **params) -> dict:
    return {"prompt": "unused", "family": family, "params": params}


# A certainly-wrong answer per family (the gold rule broken in that family's own way).
def _wrong(r: dict) -> str:
    p, f = r["params"], r["family"]
    if f == "reverse":
        return " ".join(p["words"])  # not reversed
    if f == "sort":
        return " ".join(reversed(gold_answer(r).split()))  # wrong order
    if f in ("arithmetic", "count"):
        return str(int(gold_answer(r)) + 1)
    if f == "case":
        return gold_answer(r).swapcase()
    if f == "repeat":
        return " ".join([p["word"]] * (p["n"] + 1))
    if f == "list":
        return " ".join(gold_answer(r).split()[:-1])  # k - 1 items
    if f == "one_word":
        return f"it is {gold_answer(r)}"
    if f == "word_limit":
        return gold_answer(r) + " and so on and so on"  # breaks the limit
    raise AssertionError(f)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_gold_answers_score_one_and_broken_answers_less(family):
    rng = np.random.default_rng(1)
    other = make_prompt(rng)["prompt"]
    for r in _records(family):
        gold = gold_answer(r)
        assert score(r, format_completion(gold)) == 1.0
        assert score(r, gold) == 1.0
        assert score(r, format_completion(gold_answer(r, rng))) == 1.0  # random valid answer
        assert score(r, " " + gold, stopped=False) == pytest.approx(NO_STOP_FACTOR)
        assert score(r, f" {gold}\n{other}") == pytest.approx(EXTRA_TEXT_FACTOR)
        assert score(r, f" {gold} {other}") == pytest.approx(EXTRA_TEXT_FACTOR)  # newline lost
        assert score(r, "\n" + other) == 0.0  # base model continuing the exam sheet
        assert score(r, "") == 0.0
        assert score(r, " " + _wrong(r)) < 1.0


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_scores_in_unit_interval_and_perturbations_mostly_wrong(family):
    rng = np.random.default_rng(2)
    records = _records(family, 60, seed=3)
    slipped = []
    for r in records:
        responses, stopped = synthetic_responses(r, 9, rng)
        responses.append(" ".join(str(x) for x in rng.integers(0, 60, size=5)))
        stopped.append(True)
        for resp, st in zip(responses, stopped, strict=True):
            assert 0.0 <= score(r, resp, st) <= 1.0
        slipped.append(score(r, perturb_answer(gold_answer(r, rng), rng)) < 1.0)
        assert score(r, slip(r, gold_answer(r, rng), rng)) < 1.0
    assert np.mean(slipped) > 0.3  # single word-level slips are often, not always, errors


def test_partial_credit_values():
    r = _rec("reverse", words=["cat", "dog", "sun"])
    assert score(r, " cat dog sun") == pytest.approx(0.6 / 3 + 0.4)
    assert score(r, " sun dog") == pytest.approx(0.6 * 2 / 3)
    r = _rec("arithmetic", a=7, b=5, op="plus")
    assert score(r, " 12.") == 1.0
    assert score(r, " the answer is 12") == pytest.approx(0.75)
    assert score(r, " 13") == pytest.approx(0.75 * 0.5 * 2 / 3 + 0.25)
    assert score(r, " twelve") == 0.0
    r = _rec("case", words=["red", "fox"], mode="upper")
    assert score(r, " red fox") == pytest.approx(0.6)
    r = _rec("repeat", word="sun", n=3)
    assert score(r, " sun sun") == pytest.approx(0.3 + 0.7 * 2 / 3)
    r = _rec("list", category="animals", k=3, limit=None, exclude="cat")
    assert score(r, " dog cow pig") == 1.0
    assert score(r, " cat cow pig") == pytest.approx(0.4 * 2 / 3 + 0.6 * 2 / 3)  # excluded item
    r = _rec("list", category="even", k=2, limit=10, exclude=None)
    assert score(r, " 4 8") == 1.0 and score(r, " 4 10") < 1.0
    r = _rec("one_word", animal="frog", attribute="home", other=None)
    assert score(r, " the pond") == pytest.approx(0.65)
    assert score(r, " farm") == pytest.approx(0.35)
    r = _rec("one_word", animal="frog", attribute="colour", other="cow")
    assert score(r, " frog") == 1.0 and score(r, " cow") == pytest.approx(0.35)
    r = _rec("word_limit", animal="frog", attribute="home", limit=3)
    assert score(r, " the frog lives in the pond") == pytest.approx(0.6)
    assert score(r, " pond or forest") == pytest.approx(0.4)  # states a false value too
    assert score(r, " pond", stopped=False) == pytest.approx(NO_STOP_FACTOR)
    assert fact("frog", "home") == "pond"


def test_prompt_generation_is_seeded_and_short():
    def draw(seed):
        rng = np.random.default_rng(seed)
        return [make_prompt(rng) for _ in range(300)]

    a, b, c = draw(5), draw(5), draw(6)
    assert a == b and a != c
    assert {r["family"] for r in a} == set(FAMILY_NAMES)
    for r in a:
        assert r["prompt"].startswith("Instruction: ") and r["prompt"].endswith(PROMPT_SUFFIX)
        assert len(r["prompt"]) <= 110 and len(r["prompt"].split()) <= 20
        assert len(gold_answer(r).split()) <= 12
        json.dumps(r)  # params are JSON-serialisable


def test_prompt_split_fractions():
    rng = np.random.default_rng(0)
    splits = [prompt_split(make_prompt(rng)["prompt"], seed=3) for _ in range(4000)]
    for name, fraction in SPLIT_FRACTIONS.items():
        assert abs(splits.count(name) / len(splits) - fraction) < 0.03


def _follow(text: str, prompt: str) -> str:
    """Text after the first occurrence of prompt, up to the next newline."""
    rest = text[text.index(prompt) + len(prompt) :]
    return rest if rest.startswith("\n") else rest.split("\n")[0]


def test_pretraining_instructions_are_mostly_not_answered():
    docs = pretrain_corpus(np.random.default_rng(0), 2000, pretrain_prompt_sampler(0))
    follows = [(r, _follow(d["text"], r["prompt"])) for d in docs for r in d["instructions"]]
    answered = np.mean([score(r, f) == 1.0 for r, f in follows])
    assert len(follows) > 1000
    assert 0.1 < answered < 0.5, answered  # some answer keys, mostly not followed by the answer
    kinds = {d["kind"] for d in docs}
    assert kinds == {"facts", "story", "lists", "exam", "chatter", "answer_key"}


def test_demonstration_error_rate_is_measured():
    rng = np.random.default_rng(0)
    records = [make_prompt(rng) for _ in range(2000)]
    clean = [make_demonstration(r, rng, 0.0) for r in records[:300]]
    assert all(score(r, d["completion"]) == 1.0 for r, d in zip(records, clean, strict=False))
    demos = [make_demonstration(r, rng, 0.1) for r in records]
    wrong = np.mean([score(r, d["completion"]) < 1.0 for r, d in zip(records, demos, strict=True)])
    assert 0.08 < wrong < 0.12, wrong


def test_public_task_is_in_the_pretraining_distribution():
    records = public_task(np.random.default_rng(0), 80)
    assert len({r["prompt"] for r in records}) == 80
    assert public_task_accuracy(records, [" " + r["answer"] + "." for r in records]) == 1.0
    wrong = [next(c for c in r["choices"] if c != r["answer"]) for r in records]
    assert public_task_accuracy(records, wrong) == 0.0
    assert all(r["answer"] in r["choices"] and len(set(r["choices"])) == 4 for r in records)
    docs = pretrain_corpus(np.random.default_rng(1), 3000, pretrain_prompt_sampler(0))
    text = "\n".join(d["text"] for d in docs)
    facts = [r for r in records if r["kind"] != "counting"]
    assert np.mean([f"{r['prompt']} {r['answer']}." in text for r in facts]) > 0.9
    with pytest.raises(ValueError):
        public_task_accuracy(records, [])


def _bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _read(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_write_world_files_formats_disjointness_and_determinism(tmp_path):
    paths = write_world(str(tmp_path / "a"), seed=3, **SMALL)
    again = write_world(str(tmp_path / "b"), seed=3, **SMALL)
    other = write_world(str(tmp_path / "c"), seed=4, **SMALL)
    for name, path in paths.items():
        assert _bytes(path) == _bytes(again[name]), name
        if name != "world":
            assert _bytes(path) != _bytes(other[name]), name
    assert not [f for f in os.listdir(tmp_path / "a") if f.endswith(".tmp")]

    data = {name: _read(p) for name, p in paths.items() if name != "world"}
    for name in ("pretrain", "pretrain_heldout"):
        assert all(set(d) == {"text"} and isinstance(d["text"], str) for d in data[name])
    for d in data["demonstrations"]:
        assert isinstance(d["prompt"], str) and d["prompt"].endswith(PROMPT_SUFFIX)
        assert isinstance(d["completion"], str) and d["completion"].startswith(" ")
    held_out = ("prompts_dev", "prompts_test")
    fewshot = ("prompts_dev_fewshot", "prompts_test_fewshot")
    for name in ("prompts_rm", "prompts_ppo", *held_out, *fewshot):
        for r in data[name]:
            assert r["prompt"].endswith(PROMPT_SUFFIX) and r["family"] in FAMILY_NAMES
            assert score(r, gold_answer(r)) == 1.0
    assert all(set(r) >= {"prompt", "answer", "choices"} for r in data["public_task"])

    sets = {
        n: {r["prompt"] for r in data[n]}
        for n in ("demonstrations", "prompts_rm", "prompts_ppo", *held_out)
    }
    names = list(sets)
    for i, a in enumerate(names):  # train, dev and test prompts are disjoint
        for b in names[i + 1 :]:
            assert not sets[a] & sets[b], (a, b)
    text = "\n".join(d["text"] for d in data["pretrain"] + data["pretrain_heldout"])
    for split, shots_of in zip(held_out, fewshot, strict=True):
        assert len(sets[split]) == len(data[split]) == SMALL["num_eval"]  # deduplicated
        assert not [p for p in sets[split] if p in text]
        for r, q in zip(data[shots_of], data[split], strict=True):
            assert r["prompt"].endswith(q["prompt"]) and r["prompt"] != q["prompt"]
            assert r["prompt"].count(PROMPT_SUFFIX) == r["fewshot_k"] + 1
            shots = r["prompt"][: -len(q["prompt"])].split("\n")[::2]
            assert not {s + PROMPT_SUFFIX for s in shots} & (
                sets["prompts_dev"] | sets["prompts_test"]
            )


def test_write_world_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="demo_error_rate"):
        write_world(str(tmp_path), seed=0, demo_error_rate=1.5, **SMALL)
    with pytest.raises(ValueError, match=r"ran out of unique '\w+' prompts"):
        write_world(str(tmp_path), seed=0, **{**SMALL, "num_eval": 9 * 200})


def test_filler_slips_are_gold_answers_with_fillers_appended(tmp_path):
    """demo_slips="filler": about demo_error_rate of the demonstrations are a gold answer
    with filler words appended until it scores below 1, the rest score 1; every file but
    demonstrations.jsonl is the same as with "random" slips."""
    kw = {**SMALL, "demo_error_rate": 0.5}
    rand = write_world(str(tmp_path / "r"), seed=2, **kw)
    fill = write_world(str(tmp_path / "f"), seed=2, demo_slips="filler", **kw)
    demos = {}
    for name, paths in (("random", rand), ("filler", fill)):
        with open(paths["demonstrations"]) as f:
            demos[name] = [json.loads(line) for line in f]
    assert [d["prompt"] for d in demos["random"]] == [d["prompt"] for d in demos["filler"]]
    slipped = {k: [score(d, d["completion"]) < 1.0 for d in v] for k, v in demos.items()}
    for flags in slipped.values():
        assert 0.35 < np.mean(flags) < 0.65
    for d, bad in zip(demos["filler"], slipped["filler"], strict=True):
        words = d["completion"].split()
        if not bad:
            assert words[-1] not in vocab.FILLERS
            continue
        assert words[-1] in vocab.FILLERS
        while words[-1] in vocab.FILLERS:
            words.pop()
        assert score(d, " " + " ".join(words)) == 1.0  # a gold answer with fillers appended
    random_fillers = [d["completion"].split()[-1] in vocab.FILLERS for d in demos["random"]]
    assert np.mean(random_fillers) < 0.5 * np.mean(slipped["random"])  # other slips there
    for name in rand:
        if name not in ("demonstrations", "world"):
            with open(rand[name]) as a, open(fill[name]) as b:
                assert a.read() == b.read(), name
    with open(fill["world"]) as f:
        assert json.load(f)["demo_slips"] == "filler"


def test_visible_flaw_detector_by_cases():
    cases = {
        " cat dog": (),
        " cat dog thanks": ("filler",),
        " sure cat dog": ("hedge",),
        " cat dog cat dog": ("ramble",),
        " well 3 3 ok": ("filler", "hedge", "ramble"),
        " ok": (),  # one word: no flaw to see
        " yes yes": ("filler", "ramble"),  # a filler word said twice is both
    }
    for text, flaws in cases.items():
        got = vocab.visible_flaws(text)
        assert {k for k, v in got.items() if v} == set(flaws), text
        assert list(got) == list(vocab.VISIBLE_FLAWS)


def test_visible_slips_are_three_kinds_of_seen_flaw(tmp_path):
    """demo_slips="visible": about demo_error_rate of the demonstrations score below 1, each
    shows at least one visible flaw (the three kinds about equally often) and is a gold
    answer once the flaws are undone; the others show none."""
    paths = write_world(
        str(tmp_path), seed=4, demo_slips="visible", **{**SMALL, "demo_error_rate": 0.6}
    )
    with open(paths["demonstrations"]) as f:
        demos = [json.loads(line) for line in f]
    bad = [d for d in demos if score(d, d["completion"]) < 1.0]
    assert 0.45 < len(bad) / len(demos) < 0.75
    counts = dict.fromkeys(vocab.VISIBLE_FLAWS, 0)
    for d in demos:
        flaws = vocab.visible_flaws(d["completion"])
        if score(d, d["completion"]) == 1.0:
            assert not any(flaws.values()) or len(d["completion"].split()) > 1, d
            continue
        assert any(flaws.values()), d
        for k, v in flaws.items():
            counts[k] += v
        if sum(flaws.values()) > 1:  # compounded until it scored below 1: order unknown
            continue
        words = d["completion"].split()
        words = words[1:] if flaws["hedge"] else words
        words = words[:-1] if flaws["filler"] else words
        if flaws["ramble"]:
            words = words[: len(words) // 2]
        assert score(d, " " + " ".join(words)) == 1.0, d  # one flaw on a gold answer
    shares = np.array(list(counts.values())) / sum(counts.values())
    assert np.all(shares > 0.2), counts
