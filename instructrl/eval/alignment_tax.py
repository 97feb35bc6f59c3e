"""The alignment tax (the paper's "performance regressions on public NLP datasets"):
per-token NLL on held-out pretraining text and accuracy on the public cloze task."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from instructrl import world
from instructrl.errors import ConfigError
from instructrl.eval.metrics import batched_nll
from instructrl.sample import generate


def alignment_tax(
    model, params, tokenizer, heldout_rows: list[list[int]], public: Sequence[dict], c
) -> dict[str, float]:
    """Held-out pretraining NLL (nats/token) on `heldout_rows` (token ids, BOS first) and
    public-task accuracy (greedy, choice) on the cloze records `public`."""
    window = max(len(r) for r in heldout_rows) - 1
    if window > model.config.max_len:
        raise ConfigError(
            f"config key 'data.seq_len' ({window}) exceeds the model's max_len "
            f"({model.config.max_len}): held-out windows would not fit"
        )
    sums, counts = batched_nll(
        model,
        params,
        heldout_rows,
        [1] * len(heldout_rows),
        pad_id=tokenizer.pad_id,
        batch_size=c.batch_size,
    )
    prompts = [r["prompt"] for r in public]
    texts, _, _ = generate(
        model,
        params,
        tokenizer,
        prompts,
        max_new_tokens=c.public_max_new_tokens,
        max_prompt_len=max(len(tokenizer.encode(p)) + 1 for p in prompts),
        greedy=True,
        batch_size=c.batch_size,
    )
    return {
        "heldout_nll": float(sums.sum() / max(counts.sum(), 1)),
        "heldout_tokens": int(counts.sum()),
        "public_task_accuracy": world.public_task_accuracy(public, texts),
        "public_choice_accuracy": public_choice_accuracy(model, params, tokenizer, public, c),
    }


def public_choice_accuracy(model, params, tokenizer, public: Sequence[dict], c) -> float:
    """Share of cloze items whose likeliest continuation " <choice>" is the answer (the
    choice's tokens are those after the prefix it shares with the prompt's encoding)."""
    rows, first = [], []
    for r in public:
        prompt = [tokenizer.bos_id, *tokenizer.encode(r["prompt"])]
        for choice in r["choices"]:
            full = [tokenizer.bos_id, *tokenizer.encode(f"{r['prompt']} {choice}")]
            shared = next(
                (i for i, (a, b) in enumerate(zip(prompt, full, strict=False)) if a != b),
                len(prompt),
            )
            rows.append(full)
            first.append(max(shared, 1))
    nll, _ = batched_nll(
        model, params, rows, first, pad_id=tokenizer.pad_id, batch_size=c.batch_size
    )
    hits, i = 0, 0
    for r in public:
        n = len(r["choices"])
        hits += r["choices"][int(np.argmin(nll[i : i + n]))] == r["answer"]
        i += n
    return hits / len(public)
