"""Synthetic records of every kind, for tests and the data-speed benchmark (not for training:
the built-in instruction world lives in instructrl/world/)."""

from __future__ import annotations

import json
import os
import random
from typing import Any

from instructrl.tokenizer import Tokenizer

_SYLLABLES = [
    "ka",
    "ro",
    "mi",
    "to",
    "na",
    "se",
    "lu",
    "pa",
    "vi",
    "de",
    "zo",
    "fe",
    "gu",
    "hi",
    "ja",
    "be",
    "qu",
    "ny",
]
_EXTRA = ["café", "naïve", "東京", "日本語", "😀", "Ünïcödé"]


def vocabulary(size: int = 2000, seed: int = 0) -> list[str]:
    """Pseudo-words of 1-4 syllables, plus a few non-ASCII ones."""
    rng = random.Random(seed)
    words = {"".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 4))) for _ in range(size)}
    return sorted(words) + _EXTRA


def _text(rng: random.Random, words: list[str], lo: int, hi: int) -> str:
    return " ".join(rng.choice(words) for _ in range(rng.randint(lo, hi)))


def synthetic_records(
    kind: str,
    n: int,
    *,
    seed: int = 0,
    prompt_words: tuple[int, int] = (5, 40),
    response_words: tuple[int, int] = (5, 120),
    k_range: tuple[int, int] = (2, 4),
    words: list[str] | None = None,
) -> list[dict[str, Any]]:
    """`n` valid records of `kind` (prompts unique, responses distinct)."""
    rng = random.Random(seed)
    words = words or vocabulary(seed=seed)
    out: list[dict[str, Any]] = []
    for i in range(n):
        prompt = f"{i}: " + _text(rng, words, *prompt_words)
        if kind == "demonstrations":
            out.append({"prompt": prompt, "completion": " " + _text(rng, words, *response_words)})
        elif kind == "comparisons":
            k = rng.randint(*k_range)
            responses = [f" {j} " + _text(rng, words, *response_words) for j in range(k)]
            ranking = list(range(k))
            rng.shuffle(ranking)
            out.append({"prompt": prompt, "responses": responses, "ranking": ranking})
        elif kind == "prompts":
            out.append({"prompt": prompt, "id": f"p{i}"})
        elif kind == "pretrain":
            out.append({"text": _text(rng, words, response_words[0], 4 * response_words[1])})
        else:
            raise ValueError(f"unknown record kind {kind!r}")
    return out


def write_jsonl(path: str, records: list[dict[str, Any]]) -> str:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return path


def train_tokenizer(
    out_dir: str, vocab_size: int = 320, *, lines: int = 2000, seed: int = 0
) -> Tokenizer:
    """A small BPE tokenizer (byte fallback, so any text encodes) on synthetic text."""
    rng = random.Random(seed)
    words = vocabulary(seed=seed)
    path = os.path.join(out_dir, "corpus.txt")
    os.makedirs(out_dir, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(lines):
            f.write(_text(rng, words, 3, 20) + "\n")
    return Tokenizer.load(Tokenizer.train([path], vocab_size, os.path.join(out_dir, "tok")))
