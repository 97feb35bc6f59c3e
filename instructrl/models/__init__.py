"""Transformer (GPT-2/Llama styles), KV-cache sampling and log-prob helpers."""

from instructrl.models.sampling import (
    SampleOutput,
    filter_logits,
    response_logprobs,
    sample,
    sample_jit,
    sequence_logprobs,
)
from instructrl.models.transformer import (
    ModelConfig,
    Transformer,
    init_cache,
    init_scalar_from_lm,
    positions_from_mask,
)

__all__ = [
    "ModelConfig",
    "SampleOutput",
    "Transformer",
    "filter_logits",
    "init_cache",
    "init_scalar_from_lm",
    "positions_from_mask",
    "response_logprobs",
    "sample",
    "sample_jit",
    "sequence_logprobs",
]
