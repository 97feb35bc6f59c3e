"""Pretraining text, the public cloze task, demonstrations, few-shot prompts, mock policies.

The pretraining corpus mirrors why a base LM does not obey: instruction-like lines appear
mostly in exam sheets (an "Answer:" left blank, then the next instruction) or in stories
(chatter after "Answer:"); only answer keys (a minority of documents) answer them. A
base model given "Instruction: ...\\nAnswer:" therefore usually continues the sheet, and
k answered examples in the context (few-shot) push it towards the answer-key mode.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from instructrl.world import vocab
from instructrl.world.families import gold_answer, make_prompt, slip
from instructrl.world.vocab import ANIMALS, fact, format_completion, perturb_answer, pick

# Document kinds and their share of the corpus.
DOC_WEIGHTS: dict[str, float] = {
    "facts": 0.22,
    "story": 0.13,
    "lists": 0.13,
    "exam": 0.27,  # instructions, answers left blank or deferred
    "chatter": 0.10,  # one instruction inside a story, not answered
    "answer_key": 0.15,  # instructions with correct answers
}
_FACT_TEMPLATES = {
    "colour": ["the {a} is {v}.", "a {a} is {v}.", "you can see the {v} {a}."],
    "home": ["the {a} lives in the {v}.", "you can find a {a} in the {v}."],
    "food": ["the {a} eats {v}.", "a {a} likes to eat {v}."],
    "sound": ["the {a} says {v}.", "a {a} says {v}."],
    "young": ["a baby {a} is called a {v}."],
}
_EXAM_HEADERS = ["Homework.", "Quiz.", "Exam questions.", "Practice sheet.", "Class test."]
_KEY_HEADERS = ["Answer key.", "Worked examples.", "Solutions."]
_DEFERRALS = ["see page {n}.", "ask the teacher.", "write it below.", "we did this in class."]

SamplePrompt = Callable[[np.random.Generator], dict]


# ---------------------------------------------------------------- plain text
def _fact_sentence(rng, animal: str, attribute: str | None = None) -> str:
    attribute = attribute or pick(rng, vocab.ATTRIBUTES)
    return pick(rng, _FACT_TEMPLATES[attribute]).format(a=animal, v=fact(animal, attribute))


def _facts_doc(rng) -> str:
    animals = pick(rng, ANIMALS, size=int(rng.integers(2, 5)), replace=False)
    sentences = []
    for a in animals:
        attrs = pick(rng, vocab.ATTRIBUTES, size=int(rng.integers(2, 4)), replace=False)
        sentences += [_fact_sentence(rng, a, at) for at in attrs]
    return " ".join(sentences)


def _story_sentences(rng) -> list[str]:
    n1, n2 = pick(rng, vocab.NAMES, size=2, replace=False)
    a, fruit = pick(rng, ANIMALS), pick(rng, vocab.FRUITS)
    x, y = (int(v) for v in rng.integers(1, 10, size=2))
    return [
        f"{n1} went to the {fact(a, 'home')}.",
        f"{n1} saw a {fact(a, 'colour')} {a}.",
        f"the {a} said {fact(a, 'sound')}.",
        f"{n1} had {x} {fruit}s. {n2} gave {n1} {y} more. now {n1} has {x + y} {fruit}s.",
    ][: int(rng.integers(2, 5))]


def _list_line(rng) -> str:
    kind = int(rng.integers(6))
    if kind < 3:
        name, items = [("animals", ANIMALS), ("colours", vocab.COLOURS), ("fruits", vocab.FRUITS)][
            kind
        ]
        return (
            f"{name}: "
            + ", ".join(pick(rng, items, size=int(rng.integers(2, 6)), replace=False))
            + "."
        )
    n = int(rng.integers(4, 8))
    if kind == 3:
        start = int(rng.integers(0, 41))
        return "counting: " + " ".join(str(start + i) for i in range(n)) + "."
    if kind == 4:
        start = int(rng.integers(n + 5, 46))
        return "counting down: " + " ".join(str(start - i) for i in range(n)) + "."
    start = 2 * int(rng.integers(0, 10)) + int(rng.integers(2))
    name = "even numbers" if start % 2 == 0 else "odd numbers"
    return f"{name}: " + " ".join(str(start + 2 * i) for i in range(n)) + "."


# ---------------------------------------------------------------- documents with instructions
def _item(record: dict, follow: str) -> str:
    return record["prompt"] + follow


def pretrain_document(rng: np.random.Generator, sample_prompt: SamplePrompt) -> dict:
    """One document: {"text": str, "kind": str, "instructions": [prompt records used]}."""
    kinds, weights = list(DOC_WEIGHTS), np.array(list(DOC_WEIGHTS.values()))
    kind = kinds[int(rng.choice(len(kinds), p=weights / weights.sum()))]
    used: list[dict] = []
    if kind == "facts":
        text = _facts_doc(rng)
    elif kind == "story":
        text = " ".join([*_story_sentences(rng), _fact_sentence(rng, pick(rng, ANIMALS))])
    elif kind == "lists":
        text = "\n".join(_list_line(rng) for _ in range(int(rng.integers(2, 5))))
    elif kind in ("exam", "answer_key"):
        used = [sample_prompt(rng) for _ in range(int(rng.integers(2, 5)))]
        if kind == "answer_key":
            lines = [_item(r, format_completion(gold_answer(r, rng))) for r in used]
        elif rng.random() < 0.7:
            lines = [_item(r, "") for r in used]  # blank answers: next line is the next instruction
        else:
            deferral = pick(rng, _DEFERRALS)
            lines = [_item(r, " " + deferral.format(n=int(rng.integers(2, 60)))) for r in used]
        header = pick(rng, _KEY_HEADERS if kind == "answer_key" else _EXAM_HEADERS)
        text = "\n".join([header, *lines])
    else:  # chatter
        used = [sample_prompt(rng)]
        story = _story_sentences(rng)
        name = pick(rng, vocab.NAMES)
        reply = pick(rng, [f"{name} did not know.", "the bell rang.", f"{name} put up a hand."])
        text = "\n".join([story[0], _item(used[0], " " + reply), " ".join(story[1:])])
    return {"text": text, "kind": kind, "instructions": used}


def pretrain_corpus(rng: np.random.Generator, n: int, sample_prompt: SamplePrompt) -> list[dict]:
    """n documents (see pretrain_document); sample_prompt draws the instructions they quote."""
    return [pretrain_document(rng, sample_prompt) for _ in range(n)]


# ---------------------------------------------------------------- public task (alignment tax)
def public_task(rng: np.random.Generator, n: int) -> list[dict]:
    """Cloze items in the pretraining distribution that instructions never train directly.

    All 32 animal sound / young-name facts plus (n - 32) distinct counting sequences.
    Record: {"prompt": "the cow says", "answer": "moo", "choices": [4 words], "kind"}.
    """
    if n < 2 * len(ANIMALS):
        raise ValueError(f"public task size {n} < {2 * len(ANIMALS)} (the fact items)")
    records = []
    for attribute, template in (("sound", "the {a} says"), ("young", "a baby {a} is called a")):
        values = vocab.attribute_values(attribute)
        for a in ANIMALS:
            answer = fact(a, attribute)
            wrong = pick(rng, [v for v in values if v != answer], size=3, replace=False)
            records.append(_cloze(rng, template.format(a=a), answer, wrong, attribute))
    seen = set()
    while len(records) < n:
        down, length = bool(rng.integers(2)), int(rng.integers(3, 6))
        start = int(rng.integers(length + 5, 46)) if down else int(rng.integers(0, 41))
        step = -1 if down else 1
        if (down, length, start) in seen:
            continue
        seen.add((down, length, start))
        shown = " ".join(str(start + step * i) for i in range(length))
        answer = start + step * length
        prompt = ("counting down: " if down else "counting: ") + shown
        wrong = [str(answer + d) for d in (-step, 2 * step, 3 * step)]
        records.append(_cloze(rng, prompt, str(answer), wrong, "counting"))
    return records


def _cloze(rng, prompt: str, answer: str, wrong: list[str], kind: str) -> dict:
    choices = [answer, *wrong]
    choices = [choices[int(i)] for i in rng.permutation(len(choices))]
    return {"prompt": prompt, "answer": answer, "choices": choices, "kind": kind}


def public_task_accuracy(records: Sequence[dict], predictions: Sequence[str]) -> float:
    """Fraction of items whose prediction's first word is the answer.

    predictions: the model's continuation of each prompt (greedy), or the choice it gives
    the highest log-likelihood; trailing punctuation and later words are ignored.
    """
    if len(records) != len(predictions) or not records:
        raise ValueError(f"{len(records)} public-task records vs {len(predictions)} predictions")
    hits = 0
    for r, p in zip(records, predictions, strict=True):
        words, _ = vocab.answer_words(p)
        hits += bool(words) and words[0] == r["answer"]
    return hits / len(records)


# ---------------------------------------------------------------- demonstrations, few-shot
def make_demonstration(
    record: dict, rng: np.random.Generator, error_rate: float, slip_kind: str = "random"
) -> dict:
    """{"prompt", "completion", "family", "params"}: a gold answer; with probability
    error_rate a wrong one instead (families.slip of `slip_kind`: the gold score is below 1)."""
    answer = gold_answer(record, rng)
    if rng.random() < error_rate:
        answer = slip(record, answer, rng, slip_kind)
    return {"prompt": record["prompt"], "completion": format_completion(answer), **_extra(record)}


def _extra(record: dict) -> dict:
    return {k: v for k, v in record.items() if k != "prompt"}


def few_shot_prompt(record: dict, examples: Sequence[dict]) -> dict:
    """The record with k answered examples ({"prompt", "completion"}) prepended to its prompt.

    The query is unchanged at the end, so the response (after the last "Answer:") is scored
    with the same record fields.
    """
    prefix = "".join(f"{ex['prompt']}{ex['completion']}\n" for ex in examples)
    return {**record, "prompt": prefix + record["prompt"], "fewshot_k": len(examples)}


def few_shot_examples(
    record: dict,
    pool: Sequence[dict],
    k: int,
    rng: np.random.Generator,
    same_family: bool = True,
    max_chars: int | None = None,
) -> list[dict]:
    """k examples from pool (demonstration records) other than the query itself.

    max_chars: only examples short enough that the few-shot prompt stays within max_chars
    characters (each example gets an equal share of what the query leaves), so the prompt
    fits the model's context.
    """
    budget = None if max_chars is None else (max_chars - len(record["prompt"])) // max(k, 1)
    candidates = [
        ex
        for ex in pool
        if ex["prompt"] != record["prompt"]
        and (not same_family or ex["family"] == record["family"])
        and (budget is None or len(ex["prompt"]) + len(ex["completion"]) + 1 <= budget)
    ]
    if len(candidates) < k:
        raise ValueError(
            f"only {len(candidates)} few-shot candidates for family {record['family']!r} "
            f"within max_chars={max_chars}; raise it or lower k"
        )
    return [candidates[int(i)] for i in rng.choice(len(candidates), size=k, replace=False)]


# ---------------------------------------------------------------- a mock policy for tests
def synthetic_responses(
    record: dict, k: int, rng: np.random.Generator
) -> tuple[list[str], list[bool]]:
    """k responses in the mix an SFT/base sampler produces: correct, slipped, off-task,
    continuing the exam sheet, or running on without a stop. Returns (responses, stopped)."""
    responses, stopped = [], []
    for _ in range(k):
        u = rng.random()
        answer = gold_answer(record, rng)
        done = True
        if u < 0.35:
            text = answer
        elif u < 0.65:
            text = perturb_answer(answer, rng)
            if rng.random() < 0.4:
                text = perturb_answer(text, rng)
        elif u < 0.75:
            text = gold_answer(make_prompt(rng), rng)
        elif u < 0.85:
            text = "\n" + make_prompt(rng)["prompt"]
        else:
            tail = " ".join(pick(rng, vocab.WORD_POOL, size=int(rng.integers(2, 8))))
            text, done = f"{answer} {tail}", False
        responses.append(format_completion(text) if not text.startswith("\n") else text)
        stopped.append(done)
    return responses, stopped
