"""Speed of the data layer on this CPU: building datasets and every stage's grain pipeline.

    python -m experiments.benchmarks.data_speed            # 100k synthetic records per kind
    python -m experiments.benchmarks.data_speed --quick    # 2k records, seconds

Prints one JSON object: for each kind the build rate (validation + length checks + TFDS
array_record writing), and for each pipeline records/s, real tokens/s and the time per batch
of 32 rows x 256 tokens (steady state, after the first batch), to put next to train step
times: the input pipeline must not be what a step waits on.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Sequence

import numpy as np

from instructrl.data.builder import build_dataset
from instructrl.data.config import KINDS, default_data_config
from instructrl.data.pipeline import (
    DataIterator,
    ppo_pipeline,
    pretrain_pipeline,
    rm_pipeline,
    sft_pipeline,
)
from instructrl.world import synthetic

BATCH, SEQ_LEN = 32, 256


def _count(name: str, batch: dict[str, np.ndarray], bos: int) -> tuple[int, int]:
    """(records, real tokens) in one batch; packed rows hold several records."""
    if name == "ppo":
        return int((batch["prompt_mask"].sum(-1) > 0).sum()), int(batch["prompt_mask"].sum())
    if name == "rm":
        return int((batch["response_mask"].sum(-1) > 0).sum()), int((batch["mask"] > 0).sum())
    real = batch["mask"] > 0
    starts = real & ((batch["positions"] == 0) & (batch["tokens"] == bos))
    return int(starts.sum()), int(real.sum())


def _measure(
    name: str, make: Callable[[], DataIterator], bos: int, max_batches: int
) -> dict[str, float]:
    t0 = time.perf_counter()
    it = make()
    first = next(it)
    t1 = time.perf_counter()
    records, _ = _count(name, first, bos)
    batches = 0
    steady_records = steady_tokens = 0
    for batch in it:
        r, t = _count(name, batch, bos)
        steady_records += r
        steady_tokens += t
        batches += 1
    t2 = time.perf_counter()
    steady = max(t2 - t1, 1e-9)
    return {
        "first_batch_s": round(t1 - t0, 3),
        "batches": batches + 1,
        "records": records + steady_records,
        "records_per_s": round(steady_records / steady, 1),
        "tokens_per_s": round(steady_tokens / steady, 1),
        "ms_per_batch": round(1000 * steady / max(batches, 1), 3),
        "tokens_per_batch": round(steady_tokens / max(batches, 1), 1),
    }


def run(num_records: int, workdir: str, num_threads: int, num_workers: int) -> dict[str, object]:
    tok = synthetic.train_tokenizer(os.path.join(workdir, "tok"), vocab_size=2048, lines=20_000)
    c = default_data_config()
    c.dir, c.tfds_dir = os.path.join(workdir, "data"), os.path.join(workdir, "tfds")
    c.seq_len, c.max_prompt_len, c.max_response_len = SEQ_LEN, 128, 128
    c.validation_fraction = 0.0
    c.num_threads, c.num_workers = num_threads, num_workers
    c.num_epochs = 1
    words = synthetic.vocabulary()
    result: dict[str, object] = {
        "records_per_kind": num_records,
        "batch_size": BATCH,
        "seq_len": SEQ_LEN,
        "num_threads": num_threads,
        "num_workers": num_workers,
        "cpu_count": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
        "tokenizer_vocab": tok.vocab_size,
    }
    built, build = {}, {}
    for kind in KINDS:
        lengths = {"pretrain": {"response_words": (5, 60)}}.get(kind, {})
        recs = synthetic.synthetic_records(kind, num_records, words=words, **lengths)
        synthetic.write_jsonl(os.path.join(c.dir, f"{kind}.jsonl"), recs)
        t = time.perf_counter()
        built[kind] = build_dataset(kind, c, tok)
        dt = time.perf_counter() - t
        s = built[kind].stats
        build[kind] = {
            "seconds": round(dt, 2),
            "records_per_s": round(num_records / dt, 1),
            "kept": s.records,
            "dropped_long_prompts": s.dropped_long_prompts,
            "truncated_responses": s.truncated_responses,
        }
    result["build"] = build
    kw = dict(batch_size=BATCH, num_epochs=1)
    pipelines: dict[str, Callable[[], DataIterator]] = {
        "sft_padded": lambda: sft_pipeline(built["demonstrations"], tok, c, pack=False, **kw),
        "sft_packed": lambda: sft_pipeline(built["demonstrations"], tok, c, pack=True, **kw),
        "pretrain_padded": lambda: pretrain_pipeline(built["pretrain"], tok, c, pack=False, **kw),
        "pretrain_packed": lambda: pretrain_pipeline(built["pretrain"], tok, c, pack=True, **kw),
        "rm": lambda: rm_pipeline(built["comparisons"], tok, c, **kw),
        "ppo": lambda: ppo_pipeline(built["prompts"], tok, c, **kw),
    }
    result["pipelines"] = {
        name: _measure(name, make, tok.bos_id, max_batches=10**9)
        for name, make in pipelines.items()
    }
    result["k_max"] = built["comparisons"].stats.max_responses
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.benchmarks.data_speed")
    parser.add_argument("--quick", action="store_true", help="2k records instead of 100k")
    parser.add_argument("--records", type=int, default=0, help="records per kind (overrides)")
    parser.add_argument("--num_threads", type=int, default=default_data_config().num_threads)
    parser.add_argument("--num_workers", type=int, default=0)
    parser.add_argument("--workdir", default="", help="keep files here (default: a temp dir)")
    args = parser.parse_args(argv)
    n = args.records or (2_000 if args.quick else 100_000)
    if args.workdir:
        result = run(n, args.workdir, args.num_threads, args.num_workers)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            result = run(n, tmp, args.num_threads, args.num_workers)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
