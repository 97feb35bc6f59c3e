"""The fixed vocabulary and world knowledge of the synthetic instruction world.

Everything here is a constant: the facts ("the frog is green") are the same for every seed,
so a base model pretrained with one seed and evaluated with another knows the same world.
The vocabulary is deliberately small (~150 words) so a sentencepiece model of 256-512
pieces covers it and a 1M-parameter transformer can memorise the facts.

Attributes split in two groups: colour/home/food are asked about by instructions (the
one-word and word-limit families); sound/young appear only in pretraining text and the
public cloze task, so instruction tuning does not train them directly (alignment tax).
"""

from __future__ import annotations

import numpy as np

# Prompt template: the response is everything the model writes after PROMPT_SUFFIX.
INSTRUCTION_PREFIX = "Instruction: "
PROMPT_SUFFIX = "\nAnswer:"


def pick(rng: np.random.Generator, options, size: int | None = None, replace: bool = True):
    """rng.choice over a Python sequence, returning its own str/int items (JSON-friendly)."""
    idx = rng.choice(len(options), size=size, replace=replace)
    return options[int(idx)] if size is None else [options[int(i)] for i in idx]


def format_prompt(instruction: str) -> str:
    """'Reverse the words: a b' -> 'Instruction: Reverse the words: a b\\nAnswer:'."""
    return f"{INSTRUCTION_PREFIX}{instruction}{PROMPT_SUFFIX}"


def format_completion(answer: str) -> str:
    """The demonstration completion: one space, then the answer (the EOS is the tokenizer's)."""
    return f" {answer}"


# name: (colour, home, food, sound, young)
ANIMAL_FACTS: dict[str, tuple[str, str, str, str, str]] = {
    "cat": ("grey", "house", "mice", "meow", "kitten"),
    "dog": ("brown", "yard", "bones", "woof", "puppy"),
    "cow": ("white", "farm", "grass", "moo", "calf"),
    "pig": ("pink", "farm", "corn", "oink", "piglet"),
    "frog": ("green", "pond", "flies", "croak", "tadpole"),
    "duck": ("yellow", "pond", "bread", "quack", "duckling"),
    "fox": ("red", "forest", "eggs", "yip", "kit"),
    "owl": ("brown", "tree", "mice", "hoot", "owlet"),
    "bee": ("yellow", "hive", "honey", "buzz", "larva"),
    "hen": ("white", "barn", "seeds", "cluck", "chick"),
    "sheep": ("white", "field", "grass", "baa", "lamb"),
    "horse": ("black", "stable", "hay", "neigh", "foal"),
    "bear": ("brown", "cave", "berries", "growl", "cub"),
    "goat": ("grey", "hill", "leaves", "bleat", "kid"),
    "crow": ("black", "nest", "seeds", "caw", "chick"),
    "wolf": ("grey", "forest", "meat", "howl", "pup"),
}
ANIMALS: tuple[str, ...] = tuple(ANIMAL_FACTS)
ATTRIBUTES: tuple[str, ...] = ("colour", "home", "food", "sound", "young")
INSTRUCTION_ATTRIBUTES: tuple[str, ...] = ("colour", "home", "food")


def fact(animal: str, attribute: str) -> str:
    return ANIMAL_FACTS[animal][ATTRIBUTES.index(attribute)]


def attribute_values(attribute: str) -> tuple[str, ...]:
    """All distinct values an attribute takes, in first-seen order."""
    return tuple(dict.fromkeys(fact(a, attribute) for a in ANIMALS))


COLOURS: tuple[str, ...] = (
    "red",
    "blue",
    "green",
    "brown",
    "black",
    "white",
    "yellow",
    "grey",
    "pink",
    "purple",
)
FRUITS: tuple[str, ...] = (
    "apple",
    "pear",
    "plum",
    "lemon",
    "grape",
    "melon",
    "lime",
    "kiwi",
    "mango",
)
OBJECTS: tuple[str, ...] = (
    "sun",
    "moon",
    "star",
    "box",
    "cup",
    "hat",
    "pen",
    "car",
    "bus",
    "book",
    "ball",
    "bed",
    "door",
    "key",
    "ring",
    "lamp",
    "boat",
    "cake",
    "shoe",
    "rock",
    "bell",
    "kite",
    "drum",
    "map",
)
NAMES: tuple[str, ...] = ("tom", "ann", "sam", "mia", "ben", "lily", "max", "zoe")
# Words instructions operate on (reverse, case, count, repeat).
WORD_POOL: tuple[str, ...] = OBJECTS + ANIMALS + COLOURS + FRUITS
FILLERS: tuple[str, ...] = ("ok", "done", "thanks", "maybe", "yes", "so")
HEDGES: tuple[str, ...] = ("sure", "well", "hmm", "right")  # a pleasantry before the answer


def category_members(category: str, limit: int | None, exclude: str | None) -> list[str]:
    """Valid items for the list family, in canonical order.

    category: "animals" | "colours" | "fruits" | "even" | "odd"; limit: numbers are < limit.
    """
    if category in ("even", "odd"):
        if limit is None:
            raise ValueError(f"category {category!r} needs a limit")
        start = 2 if category == "even" else 1
        items = [str(n) for n in range(start, limit, 2)]
    else:
        items = list({"animals": ANIMALS, "colours": COLOURS, "fruits": FRUITS}[category])
    return [x for x in items if x != exclude]


def answer_words(response: str) -> tuple[list[str], bool]:
    """Splits a response into the words of its answer and whether extra text follows.

    The answer is the text up to the first newline or template keyword ("Instruction:",
    "Answer:"), so scoring does not depend on whether the tokenizer keeps newlines. Leading
    whitespace is ignored; punctuation at word edges is dropped.
    """
    text = response.lstrip()
    cut = len(text)
    for marker in ("\n", INSTRUCTION_PREFIX.strip(), PROMPT_SUFFIX.strip()):
        pos = text.find(marker)
        if pos != -1:
            cut = min(cut, pos)
    first, rest = text[:cut], text[cut:]
    words = [w.strip(".,!?;:\"'") for w in first.split()]
    return [w for w in words if w], bool(rest.strip())


SLIP_KINDS: tuple[str, ...] = ("random", "filler", "visible")
# The visible flaws of demo_slips="visible", as different human demonstrators slip: a trailing
# pleasantry (a filler word after the answer), a leading hedge, and rambling past the answer
# (saying it twice). Each is easy to see in a ranking; SFT copies them at their rate.
VISIBLE_FLAWS: tuple[str, ...] = ("filler", "hedge", "ramble")


def visible_flaws(response: str) -> dict[str, bool]:
    """Which visible flaws a response shows: "filler" (ends in a FILLERS word), "hedge"
    (starts with a HEDGES word), "ramble" (the words, with or without the hedge and filler,
    are one answer said twice: flaws compound, so a hedge may be said twice too). A one-word
    response has none."""
    words = response.split()
    out = dict.fromkeys(VISIBLE_FLAWS, False)
    if len(words) < 2:
        return out
    out["filler"] = words[-1] in FILLERS
    out["hedge"] = words[0] in HEDGES
    lo, hi = int(out["hedge"]), len(words) - int(out["filler"])
    out["ramble"] = any(_said_twice(words[a:b]) for a in {0, lo} for b in {len(words), hi})
    return out


def _said_twice(words: list[str]) -> bool:
    half = len(words) // 2
    return len(words) >= 2 and len(words) % 2 == 0 and words[:half] == words[half:]


def drop_trailing_fillers(response: str) -> str:
    """`response` without the filler words (FILLERS) at its end, the slip that
    demo_slips="filler" plants in demonstrations; the first word is always kept. A response
    whose last space-separated word is not a bare filler (e.g. text follows on a new line) is
    returned unchanged."""
    words = response.split(" ")
    while words[-1] in FILLERS and sum(1 for w in words if w) > 1:
        words.pop()
    return " ".join(words)


def perturb_answer(answer: str, rng: np.random.Generator, kind: str = "random") -> str:
    """One labeler slip on a word-level answer. Always returns a string different from `answer`.

    kind "random": swap, drop, duplicate, replace, off-by-one, case flip or a filler word.
    kind "filler": always a filler word appended, a flaw a reward model sees easily (it draws
    as "random" does, then takes the filler branch). kind "visible": one of VISIBLE_FLAWS,
    uniformly: a filler appended, a hedge prepended, or the answer said twice.
    """
    if kind not in SLIP_KINDS:
        raise ValueError(f"slip kind {kind!r}: expected one of {SLIP_KINDS}")
    words = answer.split()
    if kind == "visible":
        flaw = VISIBLE_FLAWS[int(rng.integers(len(VISIBLE_FLAWS)))]
        if flaw == "hedge":
            return " ".join([pick(rng, HEDGES), *words])
        if flaw == "ramble" and words:
            return " ".join(words + words)
        return " ".join([*words, pick(rng, FILLERS)])
    for _ in range(8):
        w = list(words)
        op = rng.integers(7)
        if kind == "filler":
            op = 6
        i = int(rng.integers(len(w))) if w else 0
        if op == 0 and len(w) >= 2:
            j = (i + 1) % len(w)
            w[i], w[j] = w[j], w[i]
        elif op == 1 and len(w) >= 2:
            del w[i]
        elif op == 2 and w:
            w.insert(i, w[i])
        elif op == 3 and w:
            w[i] = pick(rng, WORD_POOL)
        elif op == 4 and w and w[i].isdigit():
            w[i] = str(max(0, int(w[i]) + pick(rng, [-2, -1, 1, 2])))
        elif op == 5 and w:
            w[i] = w[i].lower() if w[i].isupper() else w[i].upper()
        elif op == 6:
            w.append(pick(rng, FILLERS))
        out = " ".join(w)
        if out != answer:
            return out
    return f"{answer} {pick(rng, FILLERS)}"
