"""Data layer: record formats and validation, importers, TFDS builders, grain pipelines.

records.py   readers + validation of the JSONL kinds (file:line errors, skip_invalid)
convert.py   importers: HH-RLHF, summarize-from-feedback, Alpaca (also a command)
builder.py   JSONL -> versioned array_record datasets via TFDS (no TensorFlow)
examples.py  one record -> token arrays (SFT, LM, RM, prompts)
pipeline.py  grain pipelines per stage, per-process sharding, checkpointable iterators
config.py    default_data_config(): the `config.data` section
"""

from instructrl.data.builder import BuiltDataset, build_dataset, length_limits, resolve_files
from instructrl.data.config import KINDS, default_data_config
from instructrl.data.pipeline import (
    DataIterator,
    lm_dataset,
    ppo_pipeline,
    pretrain_pipeline,
    prompt_record,
    rm_pipeline,
    sft_pipeline,
    shard_records,
)
from instructrl.data.records import (
    REASONS,
    InvalidRecord,
    LengthLimits,
    LoadStats,
    Record,
    check_record,
    iter_records,
    read_comparisons,
    read_demonstrations,
    read_pretrain,
    read_prompts,
    read_records,
)

__all__ = [
    "KINDS",
    "REASONS",
    "BuiltDataset",
    "DataIterator",
    "InvalidRecord",
    "LengthLimits",
    "LoadStats",
    "Record",
    "build_dataset",
    "check_record",
    "default_data_config",
    "iter_records",
    "length_limits",
    "lm_dataset",
    "ppo_pipeline",
    "pretrain_pipeline",
    "prompt_record",
    "read_comparisons",
    "read_demonstrations",
    "read_pretrain",
    "read_prompts",
    "read_records",
    "resolve_files",
    "rm_pipeline",
    "sft_pipeline",
    "shard_records",
]
