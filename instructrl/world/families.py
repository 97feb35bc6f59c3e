"""Instruction families: prompt generators, gold answers and gold scorers with partial credit.

A prompt record is {"prompt": str, "family": str, "params": dict}; the params hold everything
the gold rule needs, so `score(record, response, stopped)` needs nothing else. The response
is the text the model wrote after the prompt's final "Answer:".

Score = family grade of the answer words (in [0, 1]; 1 only for a correct answer that keeps
every constraint) x EXTRA_TEXT_FACTOR if text follows the answer (a new line, another
"Instruction:") x NO_STOP_FACTOR if the response was cut off without a stop token.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np

from instructrl.world import vocab
from instructrl.world.vocab import answer_words, fact, format_prompt, perturb_answer, pick

EXTRA_TEXT_FACTOR = 0.7  # answered, then kept talking (e.g. wrote the next instruction)
NO_STOP_FACTOR = 0.5  # never emitted the stop token within the sampling budget

Params = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    generate: Callable[[np.random.Generator], tuple[str, Params]]  # -> (instruction, params)
    answer: Callable[[Params, np.random.Generator | None], str]  # rng None -> canonical answer
    grade: Callable[[Params, list[str]], float]  # answer words -> [0, 1]


# ---------------------------------------------------------------- shared grading rules
def sequence_grade(gold: list[str], words: list[str]) -> float:
    """0.6 x fraction of positions right + 0.2 x right length + 0.2 x right multiset."""
    if not words:
        return 0.0
    positions = sum(g == w for g, w in zip(gold, words, strict=False)) / max(len(gold), len(words))
    return 0.6 * positions + 0.2 * (len(gold) == len(words)) + 0.2 * (sorted(gold) == sorted(words))


def number_grade(target: int, words: list[str]) -> float:
    """0.75 x correctness (partial within 2 of the target) + 0.25 x 'a single number only'."""
    numbers = [int(w) for w in words if w.lstrip("-").isdigit()]
    if not numbers:
        return 0.0
    if target in numbers:
        content = 1.0
    else:
        content = 0.5 * max(0.0, 1.0 - abs(numbers[0] - target) / 3.0)
    return 0.75 * content + 0.25 * (len(words) == 1 and len(numbers) == 1)


# ---------------------------------------------------------------- 1. reverse
def _reverse_gen(rng):
    words = pick(rng, vocab.WORD_POOL, size=int(rng.integers(3, 6)), replace=False)
    t = pick(rng, ["Reverse the words: {}", "Write these words in reverse order: {}"])
    return t.format(" ".join(words)), {"words": words}


def _reverse_answer(p, rng):
    return " ".join(reversed(p["words"]))


def _reverse_grade(p, words):
    return sequence_grade(list(reversed(p["words"])), words)


# ---------------------------------------------------------------- 2. sort numbers
def _sort_gen(rng):
    nums = [int(x) for x in rng.choice(50, size=int(rng.integers(3, 6)), replace=False)]
    order = pick(rng, ["ascending", "descending"])
    if order == "ascending":
        t = pick(rng, ["Sort from smallest to largest: {}", "Put in order, smallest first: {}"])
    else:
        t = pick(rng, ["Sort from largest to smallest: {}", "Put in order, largest first: {}"])
    return t.format(" ".join(map(str, nums))), {"numbers": nums, "order": order}


def _sorted(p) -> list[str]:
    return [str(n) for n in sorted(p["numbers"], reverse=p["order"] == "descending")]


def _sort_answer(p, rng):
    return " ".join(_sorted(p))


def _sort_grade(p, words):
    return sequence_grade(_sorted(p), words)


# ---------------------------------------------------------------- 3. arithmetic
def _arith_gen(rng):
    a, b = (int(x) for x in rng.integers(0, 21, size=2))
    op = pick(rng, ["plus", "minus"])
    if op == "minus":
        a, b = max(a, b), min(a, b)
        t = pick(rng, ["What is {a} minus {b}?", "Subtract {b} from {a}."])
    else:
        t = pick(rng, ["What is {a} plus {b}?", "Add {a} and {b}."])
    return t.format(a=a, b=b), {"a": a, "b": b, "op": op}


def _arith_value(p) -> int:
    return p["a"] + p["b"] if p["op"] == "plus" else p["a"] - p["b"]


def _arith_answer(p, rng):
    return str(_arith_value(p))


def _arith_grade(p, words):
    return number_grade(_arith_value(p), words)


# ---------------------------------------------------------------- 4. count occurrences
def _count_gen(rng):
    target, *others = pick(rng, vocab.WORD_POOL, size=3, replace=False)
    n = int(rng.integers(4, 8))
    k = int(rng.integers(1, min(4, n - 1) + 1))
    words = [target] * k + pick(rng, others, size=n - k)
    words = [words[int(i)] for i in rng.permutation(n)]
    t = pick(rng, ["How many times does {w} appear in: {s}", "Count the word {w} in: {s}"])
    return t.format(w=target, s=" ".join(words)), {"target": target, "words": words}


def _count_answer(p, rng):
    return str(p["words"].count(p["target"]))


def _count_grade(p, words):
    return number_grade(p["words"].count(p["target"]), words)


# ---------------------------------------------------------------- 5. case change
def _case_gen(rng):
    words = pick(rng, vocab.WORD_POOL, size=int(rng.integers(2, 5)), replace=False)
    mode = pick(rng, ["upper", "lower"])
    if mode == "upper":
        t = pick(rng, ["Write in capital letters: {}", "Make these words upper case: {}"])
        shown = words
    else:
        t = pick(rng, ["Write in small letters: {}", "Make these words lower case: {}"])
        shown = [w.upper() for w in words]
    return t.format(" ".join(shown)), {"words": words, "mode": mode}


def _case_target(p) -> list[str]:
    return [w.upper() if p["mode"] == "upper" else w for w in p["words"]]


def _case_answer(p, rng):
    return " ".join(_case_target(p))


def _case_grade(p, words):
    """0.4 x words right ignoring case + 0.4 x words right with case + 0.2 x right length."""
    gold = _case_target(p)
    if not words:
        return 0.0
    n = max(len(gold), len(words))
    loose = sum(g.lower() == w.lower() for g, w in zip(gold, words, strict=False)) / n
    exact = sum(g == w for g, w in zip(gold, words, strict=False)) / n
    return 0.4 * loose + 0.4 * exact + 0.2 * (len(gold) == len(words))


# ---------------------------------------------------------------- 6. repeat a word
def _repeat_gen(rng):
    word, n = pick(rng, vocab.WORD_POOL), int(rng.integers(2, 7))
    t = pick(rng, ["Repeat the word {w} {n} times.", "Say {w} {n} times.", "Write {w} {n} times."])
    return t.format(w=word, n=n), {"word": word, "n": n}


def _repeat_answer(p, rng):
    return " ".join([p["word"]] * p["n"])


def _repeat_grade(p, words):
    """0.3 x fraction of words that are the word + 0.7 x closeness of the count to n."""
    if not words:
        return 0.0
    hits = sum(w == p["word"] for w in words)
    return 0.3 * hits / len(words) + 0.7 * max(0.0, 1.0 - abs(hits - p["n"]) / p["n"])


# ---------------------------------------------------------------- 7. list K items
def _list_gen(rng):
    category, k = (
        pick(rng, ["animals", "colours", "fruits", "even", "odd"]),
        int(rng.integers(2, 6)),
    )
    limit = exclude = None
    if category in ("even", "odd"):
        limit = int(rng.integers(2 * k + 2, 41))
        text = f"List {k} {category} numbers below {limit}."
    else:
        verb = pick(rng, ["List", "Name", "Give me"])
        text = f"{verb} {k} {category}."
        if rng.random() < 0.4:
            exclude = pick(rng, vocab.category_members(category, None, None))
            text = f"{verb} {k} {category}, but not {exclude}."
    return text, {"category": category, "k": k, "limit": limit, "exclude": exclude}


def _list_members(p) -> list[str]:
    return vocab.category_members(p["category"], p["limit"], p["exclude"])


def _list_answer(p, rng):
    members = _list_members(p)
    if rng is None:
        return " ".join(members[: p["k"]])
    idx = sorted(rng.choice(len(members), size=p["k"], replace=False))
    if p["category"] not in ("even", "odd"):
        idx = [idx[int(i)] for i in rng.permutation(len(idx))]
    return " ".join(members[int(i)] for i in idx)


def _list_grade(p, words):
    """0.4 x fraction of words that are new valid items + 0.6 x closeness of that count to k."""
    if not words:
        return 0.0
    valid = set(_list_members(p))
    distinct = len({w for w in words if w in valid})
    return 0.4 * distinct / len(words) + 0.6 * max(0.0, 1.0 - abs(distinct - p["k"]) / p["k"])


# ---------------------------------------------------------------- 8. one-word answer
_QUESTIONS = {
    "colour": "what colour is the {a}?",
    "home": "where does the {a} live?",
    "food": "what does the {a} eat?",
}
_WHICH = {
    "colour": "which animal is {v}, the {a} or the {b}?",
    "home": "which animal lives in the {v}, the {a} or the {b}?",
    "food": "which animal eats {v}, the {a} or the {b}?",
}


def _one_word_gen(rng):
    animal, attribute = pick(rng, vocab.ANIMALS), pick(rng, vocab.INSTRUCTION_ATTRIBUTES)
    lead = pick(rng, ["Answer in one word: ", "One word only: "])
    other = None
    if rng.random() < 0.5:
        value = fact(animal, attribute)
        other = pick(rng, [x for x in vocab.ANIMALS if fact(x, attribute) != value])
        pair = (animal, other) if rng.random() < 0.5 else (other, animal)
        q = _WHICH[attribute].format(v=value, a=pair[0], b=pair[1])
    else:
        q = _QUESTIONS[attribute].format(a=animal)
    return lead + q, {"animal": animal, "attribute": attribute, "other": other}


def _one_word_answer(p, rng):
    return p["animal"] if p["other"] else fact(p["animal"], p["attribute"])


def _one_word_grade(p, words):
    """0.65 x the right word is there + 0.35 x exactly one word."""
    return 0.65 * (_one_word_answer(p, None) in words) + 0.35 * (len(words) == 1)


# ---------------------------------------------------------------- 9. answer within N words
_WITHIN = {
    "colour": "{lead}, what colour is the {a}?",
    "home": "{lead}, say where the {a} lives.",
    "food": "{lead}, say what the {a} eats.",
}
_WITHIN_ANSWERS = {  # shortest first
    "colour": ["{v}", "it is {v}", "the {a} is {v}", "a {a} is usually {v}"],
    "home": ["{v}", "the {v}", "in the {v}", "it lives in the {v}", "the {a} lives in the {v}"],
    "food": ["{v}", "eats {v}", "it eats {v}", "the {a} eats {v}", "a {a} likes to eat {v}"],
}


def _within_gen(rng):
    animal, attribute = pick(rng, vocab.ANIMALS), pick(rng, vocab.INSTRUCTION_ATTRIBUTES)
    limit = int(rng.integers(2, 7))
    leads = ["In at most {n} words", "Using no more than {n} words", "In {n} words or fewer"]
    lead = pick(rng, leads).format(n=limit)
    text = _WITHIN[attribute].format(lead=lead, a=animal)
    return text, {"animal": animal, "attribute": attribute, "limit": limit}


def _within_answer(p, rng):
    a, value = p["animal"], fact(p["animal"], p["attribute"])
    fits = [t for t in _WITHIN_ANSWERS[p["attribute"]] if len(t.split()) <= p["limit"]]
    template = fits[-1] if rng is None else pick(rng, fits)
    return template.format(a=a, v=value)


def _within_grade(p, words):
    """0.6 x states the true fact (and no other value of it) + 0.4 x within the word limit."""
    if not words:
        return 0.0
    value = fact(p["animal"], p["attribute"])
    wrong = set(vocab.attribute_values(p["attribute"])) - {value}
    true_fact = value in words and not wrong.intersection(words)
    return 0.6 * true_fact + 0.4 * (len(words) <= p["limit"])


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family("reverse", _reverse_gen, _reverse_answer, _reverse_grade),
        Family("sort", _sort_gen, _sort_answer, _sort_grade),
        Family("arithmetic", _arith_gen, _arith_answer, _arith_grade),
        Family("count", _count_gen, _count_answer, _count_grade),
        Family("case", _case_gen, _case_answer, _case_grade),
        Family("repeat", _repeat_gen, _repeat_answer, _repeat_grade),
        Family("list", _list_gen, _list_answer, _list_grade),
        Family("one_word", _one_word_gen, _one_word_answer, _one_word_grade),
        Family("word_limit", _within_gen, _within_answer, _within_grade),
    )
}
FAMILY_NAMES: tuple[str, ...] = tuple(FAMILIES)


def _family(record: dict) -> Family:
    name = record.get("family")
    if name not in FAMILIES:
        raise ValueError(f"prompt record has family={name!r}; expected one of {FAMILY_NAMES}")
    return FAMILIES[name]


def make_prompt(rng: np.random.Generator, family: str | None = None) -> dict:
    """A fresh prompt record {"prompt", "family", "params"}; family None -> uniform."""
    name = family if family is not None else pick(rng, FAMILY_NAMES)
    instruction, params = FAMILIES[name].generate(rng)
    return {"prompt": format_prompt(instruction), "family": name, "params": params}


def gold_answer(record: dict, rng: np.random.Generator | None = None) -> str:
    """A correct answer (score 1.0). rng None -> the canonical one; else a random valid one
    (families with many valid answers, e.g. "list 3 animals", vary like human writers)."""
    return _family(record).answer(record["params"], rng)


def score(record: dict, response: str, stopped: bool = True) -> float:
    """Gold score in [0, 1] of `response` (the text after the prompt) for a prompt record."""
    words, extra = answer_words(response)
    grade = float(_family(record).grade(record["params"], words))
    if not -1e-9 <= grade <= 1.0 + 1e-9:
        raise AssertionError(f"{record['family']} grade {grade} outside [0, 1]")
    grade = min(max(grade, 0.0), 1.0)  # weighted sums of exact 1s may round to 1 +- 1 ulp
    return grade * (EXTRA_TEXT_FACTOR if extra else 1.0) * (1.0 if stopped else NO_STOP_FACTOR)


def slip(record: dict, answer: str, rng: np.random.Generator, kind: str = "random") -> str:
    """A labeler's mistake on `answer`: word-level slips (vocab.perturb_answer of `kind`),
    compounded until the gold scorer marks the result below 1 (a dropped word is harmless in
    "describe in at most 5 words", so one slip is not always an error)."""
    for _ in range(100):
        answer = perturb_answer(answer, rng, kind)
        if score(record, answer) < 1.0:
            return answer
    raise RuntimeError(f"no slip found for {record['prompt']!r}")
