"""grain input pipelines per stage: shard -> shuffle -> repeat -> tokenise -> pad/pack -> batch.

    built = build_dataset("demonstrations", config.data, tok, data_dir=...)
    it = sft_pipeline(built, tok, config.data, batch_size=32)     # a DataIterator
    batch = next(it)                     # dict of numpy arrays, per-process batch rows
    state = it.get_state()               # JSON bytes; it.set_state(state) resumes exactly

Batches (B = batch_size / process_count rows on each process, T = data.seq_len):
  sft, pretrain  tokens, targets, loss_mask, mask, positions           int32 [B, T]
                 (packed: mask holds segment ids 1, 2, ... and positions restart at 0 per
                 document, so attention never crosses documents; SFT loss_mask covers exactly
                 the completion tokens + EOS, pretraining every real token)
  rm             tokens, mask, positions int32 [B, K, T]; response_mask int32 [B, K];
                 pair_mask float32 [B, K, K] (K = K_max), all C(K,2) pairs of a prompt in
                 one row, ties dropped
  ppo            prompt_tokens, prompt_mask int32 [B, P] left-padded (P = max_prompt_len);
                 index int64 [B] (row of the split: prompt_record() recovers the text and
                 passthrough fields); with ptx_ratio > 0 also ptx_tokens, ptx_targets,
                 ptx_loss_mask, ptx_mask, ptx_positions int32
                 [round(ptx_ratio * batch_size) / process_count, T]

Each process reads only its own shard (records i with i % process_count == process_index,
cut to equal sizes so every process yields the same number of batches), shuffled with the
seed and reshuffled each epoch. `process_index`/`process_count` default to jax's.
With drop_remainder=False the last partial batch is padded with all-zero rows (every mask 0).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from typing import Any

import grain
import jax
import ml_collections
import numpy as np
from absl import flags, logging

from instructrl.data import examples
from instructrl.data.builder import BuiltDataset, length_limits
from instructrl.data.records import LoadStats
from instructrl.errors import ConfigError

Batch = dict[str, np.ndarray]


class DataIterator:
    """A batch iterator whose position can be saved and restored (as JSON bytes)."""

    def __init__(self, dataset: grain.IterDataset, stats: LoadStats | None = None):
        self.dataset = dataset
        self.stats = stats
        self._iter = iter(dataset)

    def __iter__(self) -> DataIterator:
        return self

    def __next__(self) -> Batch:
        return next(self._iter)

    def get_state(self) -> bytes:
        return json.dumps(self._iter.get_state(), sort_keys=True).encode()

    def set_state(self, state: bytes | str) -> None:
        self._iter.set_state(json.loads(state))


def _source(
    data: BuiltDataset | Sequence[Any], split: str
) -> tuple[Sequence[Any], LoadStats | None]:
    if isinstance(data, BuiltDataset):
        if split not in data.sources:
            raise ConfigError(
                f"data.{data.kind}: no '{split}' split in {data.path} (splits: "
                f"{', '.join(data.sources)}); give {data.kind}_validation files or validation_fraction > 0"
            )
        return data.sources[split], data.stats
    return data, None


def per_process_batch(batch_size: int, process_count: int) -> int:
    if batch_size % process_count:
        raise ConfigError(
            f"batch size {batch_size} is not divisible by {process_count} JAX processes"
        )
    return batch_size // process_count


def shard_records(
    source: Sequence[Any],
    *,
    seed: int,
    num_epochs: int | None,
    shuffle: bool = True,
    process_index: int | None = None,
    process_count: int | None = None,
    with_index: bool = False,
) -> grain.MapDataset:
    """This process's equal-sized shard, shuffled per epoch and repeated (None = forever)."""
    pi = jax.process_index() if process_index is None else process_index
    pc = jax.process_count() if process_count is None else process_count
    ds = grain.MapDataset.source(source)
    if with_index:
        ds = ds.map_with_index(examples.WithIndex(len(ds)))
    per = len(ds) // pc
    if per == 0:
        raise ConfigError(f"{len(ds)} records cannot be shared by {pc} processes")
    if len(ds) - per * pc:
        logging.info(
            "data: %d records left out so that %d processes get %d each",
            len(ds) - per * pc,
            pc,
            per,
        )
    ds = ds[pi : per * pc : pc]
    if shuffle:
        ds = ds.shuffle(seed=seed)
    return ds.repeat(num_epochs)


def _finish(
    ds: grain.IterDataset, batch_size: int, drop_remainder: bool, num_workers: int
) -> grain.IterDataset:
    if drop_remainder:
        ds = ds.batch(batch_size, drop_remainder=True)
    else:
        ds = ds.batch(
            batch_size,
            batch_fn=functools.partial(grain.experimental.batch_and_pad, batch_size=batch_size),
        )
    return _workers(ds, num_workers)


def _workers(ds: grain.IterDataset, num_workers: int) -> grain.IterDataset:
    if num_workers <= 0:
        return ds
    if not flags.FLAGS.is_parsed():
        # grain 0.2.18 worker processes read an absl flag and fail when the program did not
        # parse absl flags (google/grain#1355, fixed upstream later); argparse programs such as
        # instructrl.main never do, so mark them parsed with their defaults.
        logging.info("data: marking absl flags as parsed for grain worker processes")
        flags.FLAGS.mark_as_parsed()
    return ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))


def _options(
    config: ml_collections.ConfigDict, seed: int | None, num_epochs: int | None
) -> tuple[int, int | None]:
    seed = config.seed if seed is None else seed
    if num_epochs is None:
        num_epochs = config.num_epochs
    return seed, (None if num_epochs == 0 else num_epochs)


def _read(ds: grain.MapDataset, config: ml_collections.ConfigDict) -> grain.IterDataset:
    # num_threads = 0 reads in the calling thread: for records of a few tokens each, the
    # thread pool's hand-offs and grain's per-element scan of its 256-deep prefetch buffer
    # cost more host time than tokenising does (the tiny experiment's data).
    buffer = 256 if config.num_threads > 0 else 0
    return ds.to_iter_dataset(
        grain.ReadOptions(num_threads=config.num_threads, prefetch_buffer_size=buffer)
    )


def lm_dataset(
    data: BuiltDataset | Sequence[Any],
    tokenizer: Any,
    config: ml_collections.ConfigDict,
    *,
    kind: str,
    batch_size: int,
    split: str = "train",
    seed: int | None = None,
    num_epochs: int | None = None,
    shuffle: bool = True,
    pack: bool | None = None,
    drop_remainder: bool = True,
    process_index: int | None = None,
    process_count: int | None = None,
    num_workers: int | None = None,
) -> tuple[grain.IterDataset, LoadStats | None]:
    """SFT ("sft") or pretraining ("pretrain") batches as a grain IterDataset."""
    source, stats = _source(data, split)
    seed, epochs = _options(config, seed, num_epochs)
    pack = config.pack if pack is None else pack
    pc = jax.process_count() if process_count is None else process_count
    rows = per_process_batch(batch_size, pc)
    seq_len, pad = config.seq_len, tokenizer.pad_id
    ds = shard_records(
        source,
        seed=seed,
        num_epochs=epochs,
        shuffle=shuffle,
        process_index=process_index,
        process_count=pc,
    )
    if kind == "sft":
        ds = _read(ds.map(examples.SFTMap(tokenizer, length_limits(config, tokenizer))), config)
    elif kind == "pretrain":
        ds = _read(ds.map(examples.LMMap(tokenizer)), config)
    else:
        raise ValueError(f"lm_dataset: kind={kind!r}, expected 'sft' or 'pretrain'")
    lengths = {"tokens": seq_len, "targets": seq_len, "loss_mask": seq_len}
    if pack and kind == "pretrain":
        # Documents run on across rows; each piece is its own segment with positions from 0.
        ds = grain.experimental.ConcatThenSplitIterDataset(ds, length_struct=lengths).map(
            examples.FromPacked(pad)
        )
    elif pack:
        ds = grain.experimental.FirstFitPackIterDataset(
            ds,
            length_struct=lengths,
            num_packing_bins=rows,
            shuffle_bins=False,
            padding_struct={"tokens": pad, "targets": pad, "loss_mask": 0},
        ).map(examples.FromPacked(pad))
    else:
        if kind == "pretrain":
            ds = grain.experimental.FlatMapIterDataset(ds, _Chunk(seq_len))
        ds = ds.map(functools.partial(examples.pad_lm, seq_len=seq_len, pad_id=pad))
    workers = config.num_workers if num_workers is None else num_workers
    return _finish(ds, rows, drop_remainder, workers), stats


class _Chunk(grain.experimental.FlatMapTransform):
    max_fan_out = 1 << 20  # unused by FlatMapIterDataset; long documents give many rows

    def __init__(self, seq_len: int):
        self.seq_len = seq_len

    def flat_map(self, element: examples.Example) -> list[examples.Example]:
        return examples.chunk_lm(element, self.seq_len)


def sft_pipeline(
    data: BuiltDataset | Sequence[Any], tokenizer: Any, config: ml_collections.ConfigDict, **kw: Any
) -> DataIterator:
    """SFT batches (see module docstring); kw as lm_dataset (batch_size required)."""
    return DataIterator(*lm_dataset(data, tokenizer, config, kind="sft", **kw))


def pretrain_pipeline(
    data: BuiltDataset | Sequence[Any], tokenizer: Any, config: ml_collections.ConfigDict, **kw: Any
) -> DataIterator:
    """Pretraining LM batches (see module docstring); kw as lm_dataset."""
    return DataIterator(*lm_dataset(data, tokenizer, config, kind="pretrain", **kw))


def rm_pipeline(
    data: BuiltDataset | Sequence[Any],
    tokenizer: Any,
    config: ml_collections.ConfigDict,
    *,
    batch_size: int,
    split: str = "train",
    seed: int | None = None,
    num_epochs: int | None = None,
    shuffle: bool = True,
    drop_remainder: bool = True,
    process_index: int | None = None,
    process_count: int | None = None,
) -> DataIterator:
    """Reward-model batches: one row per prompt with its K_max responses and pair mask."""
    source, stats = _source(data, split)
    k_max = config.max_responses or (stats.max_responses if stats else 0)
    if k_max < 2:
        raise ConfigError(
            "config key 'data.max_responses' must be >= 2 (or 0 with a built dataset)"
        )
    seed, epochs = _options(config, seed, num_epochs)
    pc = jax.process_count() if process_count is None else process_count
    ds = shard_records(
        source,
        seed=seed,
        num_epochs=epochs,
        shuffle=shuffle,
        process_index=process_index,
        process_count=pc,
    )
    ds = _read(ds.map(examples.RMMap(tokenizer, length_limits(config, tokenizer), k_max)), config)
    return DataIterator(
        _finish(ds, per_process_batch(batch_size, pc), drop_remainder, config.num_workers), stats
    )


def _merge_ptx(pair: tuple[Batch, Batch]) -> Batch:
    prompts, ptx = pair
    return {**prompts, **{f"ptx_{k}": v for k, v in ptx.items()}}


def ppo_pipeline(
    data: BuiltDataset | Sequence[Any],
    tokenizer: Any,
    config: ml_collections.ConfigDict,
    *,
    batch_size: int,
    ptx_data: BuiltDataset | Sequence[Any] | None = None,
    split: str = "train",
    seed: int | None = None,
    num_epochs: int | None = None,
    shuffle: bool = True,
    drop_remainder: bool = True,
    process_index: int | None = None,
    process_count: int | None = None,
) -> DataIterator:
    """Left-padded prompt batches, zipped with a pretraining stream when data.ptx_ratio > 0.

    The ptx stream has round(ptx_ratio * batch_size) rows (global), repeats forever and uses
    its own shuffle order; one iterator state covers both streams.
    """
    source, stats = _source(data, split)
    seed, epochs = _options(config, seed, num_epochs)
    pc = jax.process_count() if process_count is None else process_count
    rows = per_process_batch(batch_size, pc)
    ds = shard_records(
        source,
        seed=seed,
        num_epochs=epochs,
        shuffle=shuffle,
        process_index=process_index,
        process_count=pc,
        with_index=True,
    )
    ds = _read(ds.map(examples.PromptMap(tokenizer, length_limits(config, tokenizer))), config)
    ds = _finish(ds, rows, drop_remainder, 0)
    if config.ptx_ratio > 0:
        if ptx_data is None:
            raise ConfigError("config key 'data.ptx_ratio' > 0 but no pretraining data was given")
        ptx_rows = round(config.ptx_ratio * batch_size)
        if ptx_rows < pc:
            raise ConfigError(
                f"config key 'data.ptx_ratio'={config.ptx_ratio} gives {ptx_rows} ptx rows for "
                f"batch size {batch_size}; need at least one per process ({pc})"
            )
        ptx, _ = lm_dataset(
            ptx_data,
            tokenizer,
            config,
            kind="pretrain",
            batch_size=ptx_rows,
            seed=seed + 1,
            num_epochs=0,
            process_index=process_index,
            process_count=pc,
            num_workers=0,
        )
        ds = grain.experimental.ZipIterDataset([ds, ptx], strict=False).map(_merge_ptx)
    return DataIterator(_workers(ds, config.num_workers), stats)


def prompt_record(
    data: BuiltDataset | Sequence[Any], index: int, split: str = "train"
) -> dict[str, Any]:
    """The prompt record (with passthrough fields) of a PPO batch's `index`."""
    source, _ = _source(data, split)
    return json.loads(source[int(index)]["record"])
