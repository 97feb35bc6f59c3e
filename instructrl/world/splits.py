"""Writes the synthetic instruction world as the standard JSONL files (docs/design.md formats).

Prompt splits are disjoint by construction: every prompt string is hashed (with the seed)
into one bucket -- demonstrations / rm / ppo (the training splits) / dev / test (held out)
-- and a split only keeps prompts of its bucket. Every setting and ablation is chosen on
dev; test is for the final tables only. Pretraining text never quotes a held-out prompt. Each file has its own random stream
(derived from seed and the file's name), so changing one size leaves the other files alone.
Training splits may repeat a prompt (small families have a few hundred prompts); the eval
splits are deduplicated.
"""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import Iterable

import numpy as np

from instructrl.world import corpus, families, vocab

SPLIT_FRACTIONS: dict[str, float] = {
    "demonstrations": 0.30,
    "rm": 0.20,
    "ppo": 0.30,
    "dev": 0.10,  # 450 unique prompts each, 50 per family: the smallest families need 10%
    "test": 0.10,
}
HELD_OUT = ("dev", "test")
_MAX_MISSES = 5_000  # draws without a new prompt of the split before giving up
_STREAMS = (
    "pretrain",
    "pretrain_heldout",
    "demonstrations",
    "rm",
    "ppo",
    "dev",
    "test",
    "fewshot",
    "public_task",
)


def prompt_split(prompt: str, seed: int) -> str:
    """The split a prompt string belongs to; a stable hash, not Python's salted hash()."""
    u = zlib.crc32(f"{seed}\x00{prompt}".encode()) / 2**32
    edge = 0.0
    for name, fraction in SPLIT_FRACTIONS.items():
        edge += fraction
        if u < edge:
            return name
    return "test"  # u within float rounding of 1.0


def _stream(seed: int, name: str) -> np.random.Generator:
    return np.random.default_rng([seed, _STREAMS.index(name)])


def split_prompts(
    rng: np.random.Generator, split: str, n: int, seed: int, unique: bool = False
) -> list[dict]:
    """n prompt records of `split`, the families in turn (balanced), then shuffled.

    unique: no prompt string twice; raises if a family's share of the split runs out.
    """
    records: list[dict] = []
    seen: set[str] = set()
    for i in range(n):
        family = families.FAMILY_NAMES[i % len(families.FAMILY_NAMES)]
        for _ in range(_MAX_MISSES):
            r = families.make_prompt(rng, family)
            if prompt_split(r["prompt"], seed) == split and not (unique and r["prompt"] in seen):
                break
        else:
            raise ValueError(
                f"split {split!r}: ran out of unique {family!r} prompts after {len(records)} "
                f"of {n}; lower its size"
            )
        seen.add(r["prompt"])
        records.append(r)
    return [records[int(i)] for i in rng.permutation(n)]


def pretrain_prompt_sampler(seed: int) -> corpus.SamplePrompt:
    """Draws instructions for pretraining text from every bucket but the held-out ones."""

    def sample(rng: np.random.Generator) -> dict:
        while True:
            r = families.make_prompt(rng)
            if prompt_split(r["prompt"], seed) not in HELD_OUT:
                return r

    return sample


def write_jsonl(path: str, rows: Iterable[dict]) -> None:
    """Writes to path.tmp, then renames: a crash never leaves a half-written file at path."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def write_world(
    out_dir: str,
    seed: int = 0,
    *,
    num_pretrain: int = 20_000,
    num_pretrain_heldout: int = 1_000,
    num_demonstrations: int = 3_000,
    num_rm: int = 1_500,
    num_ppo: int = 3_000,
    num_eval: int = 450,
    num_public: int = 200,
    demo_error_rate: float = 0.1,
    demo_slips: str = "random",
    fewshot_k: int = 1,
    fewshot_max_chars: int | None = 200,
) -> dict[str, str]:
    """Writes the world's files into out_dir; returns {name: path}.

    Names: pretrain, pretrain_heldout ({"text"}); demonstrations ({"prompt", "completion",
    "family", "params"}); prompts_rm, prompts_ppo, prompts_dev, prompts_test ({"prompt",
    "family", "params"}; dev and test `num_eval` each); prompts_dev_fewshot,
    prompts_test_fewshot (the same prompts with `fewshot_k` answered examples from
    the demonstration bucket prepended, at most `fewshot_max_chars` characters -- 200 is
    at most ~90 tokens with a 384-piece sentencepiece model -- plus "fewshot_k");
    public_task ({"prompt", "answer", "choices", "kind"}); world (world.json: the
    arguments, for the record).

    demo_error_rate is the share of demonstrations with a labeler's slip; demo_slips is its
    kind (vocab.SLIP_KINDS): "random" word-level mistakes, or "filler" (a word appended), a
    flaw the reward model can see. Only demonstrations.jsonl depends on the kind.
    """
    if not 0.0 <= demo_error_rate <= 1.0:
        raise ValueError(f"demo_error_rate={demo_error_rate} is not in [0, 1]")
    if demo_slips not in vocab.SLIP_KINDS:
        raise ValueError(f"demo_slips={demo_slips!r} is not one of {vocab.SLIP_KINDS}")
    os.makedirs(out_dir, exist_ok=True)
    paths = {}

    def put(name: str, rows: Iterable[dict], filename: str | None = None) -> None:
        paths[name] = os.path.join(out_dir, filename or f"{name}.jsonl")
        write_jsonl(paths[name], rows)

    sampler = pretrain_prompt_sampler(seed)
    for name, n in (("pretrain", num_pretrain), ("pretrain_heldout", num_pretrain_heldout)):
        docs = corpus.pretrain_corpus(_stream(seed, name), n, sampler)
        put(name, ({"text": d["text"]} for d in docs))

    rng = _stream(seed, "demonstrations")
    demo_prompts = split_prompts(rng, "demonstrations", num_demonstrations, seed)
    demos = [corpus.make_demonstration(r, rng, demo_error_rate, demo_slips) for r in demo_prompts]
    put("demonstrations", demos)
    for split, n in (("rm", num_rm), ("ppo", num_ppo)):
        put(f"prompts_{split}", split_prompts(_stream(seed, split), split, n, seed))
    held_out = {
        split: split_prompts(_stream(seed, split), split, num_eval, seed, unique=True)
        for split in HELD_OUT
    }
    for split, records in held_out.items():
        put(f"prompts_{split}", records)

    # Few-shot examples: gold-written answers to demonstration-bucket prompts.
    rng = _stream(seed, "fewshot")
    pool_prompts = split_prompts(rng, "demonstrations", 100 * len(families.FAMILIES), seed)
    pool = [corpus.make_demonstration(r, rng, 0.0) for r in pool_prompts]
    for split, records in held_out.items():
        fewshot = [
            corpus.few_shot_prompt(
                r, corpus.few_shot_examples(r, pool, fewshot_k, rng, max_chars=fewshot_max_chars)
            )
            for r in records
        ]
        put(f"prompts_{split}_fewshot", fewshot)
    put("public_task", corpus.public_task(_stream(seed, "public_task"), num_public))

    meta = dict(
        seed=seed,
        num_pretrain=num_pretrain,
        num_pretrain_heldout=num_pretrain_heldout,
        num_demonstrations=num_demonstrations,
        num_rm=num_rm,
        num_ppo=num_ppo,
        num_eval=num_eval,
        num_public=num_public,
        demo_error_rate=demo_error_rate,
        demo_slips=demo_slips,
        fewshot_k=fewshot_k,
        fewshot_max_chars=fewshot_max_chars,
        families=list(families.FAMILY_NAMES),
        split_fractions=SPLIT_FRACTIONS,
    )
    paths["world"] = os.path.join(out_dir, "world.json")
    with open(paths["world"] + ".tmp", "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=1)
    os.replace(paths["world"] + ".tmp", paths["world"])
    return paths
