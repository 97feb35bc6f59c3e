"""Defaults of the `config.data` section: where the JSONL files are and how they become batches.

Files of a kind are found either under `dir` (`<dir>/<kind>.jsonl`, or every `.jsonl` file in
`<dir>/<kind>/`; pretraining text also `.txt`) or given explicitly as a comma-separated list of
paths/globs in the key named after the kind. A validation split comes from `<kind>_validation`
files (`<dir>/<kind>_validation.jsonl` or the explicit key) when present, otherwise from a
deterministic hash of each record's prompt (text, for pretraining) with `validation_fraction`;
hashing the prompt keeps one prompt in the same split for SFT, RM and PPO.

Lengths (tokens; see instructrl/data/records.py): sequences are `[BOS] prompt response [EOS]`
of at most `seq_len` tokens. Prompts with more than `max_prompt_len` tokens (BOS included)
are dropped and counted, as the paper drops prompts over 1k tokens; responses are cut to
`max_response_len` tokens (and to the room left by the prompt) and counted.

Chat templates (`chat_template`): "none" (the default: sequences are `[BOS] prompt response
[EOS]` as above), "model" (the checkpoint's template: tokenizer_config.json's chat_template
or chat_template.jinja next to tokenizer.json) or a path to a `.jinja` file; rendered by
instructrl/chat_template.py as transformers' apply_chat_template does. With a template the
prompt is the rendered user turn(s) + generation prompt and EOS is the template's stop token
(instructrl/chat_format.py); lengths count those tokens. The collect and eval stages and
`python -m instructrl.sample` sample from the rendered prompt until that stop token and
judge or write the reply without the template's framing.
"""

from __future__ import annotations

import ml_collections

KINDS = ("pretrain", "demonstrations", "comparisons", "prompts")


def default_data_config() -> ml_collections.ConfigDict:
    """The data section; embed as `config.data` and override per experiment."""
    c = ml_collections.ConfigDict()
    c.dir = ""  # folder holding <kind>.jsonl / <kind>/ / <kind>_validation.jsonl
    for kind in KINDS:
        c[kind] = ""  # explicit comma-separated files or globs (overrides `dir`)
        c[f"{kind}_validation"] = ""
    c.tfds_dir = ""  # where the array_record datasets are built; "" -> the stage passes one
    c.chat_template = "none"  # "none" | "model" | path/to/template.jinja (see the docstring)
    c.validation_fraction = 0.05  # hash split when no *_validation files exist
    c.skip_invalid = False  # True: skip bad records and report counts per reason
    c.max_prompt_len = 1024  # tokens incl. BOS; longer prompts are dropped (paper: 1k)
    c.max_response_len = 1024  # tokens excl. EOS; longer responses are truncated
    c.min_response_len = 1  # a prompt must leave room for this many response tokens + EOS
    c.seq_len = 2048  # tokens per sequence ([BOS] prompt response [EOS]) / packed row
    c.max_responses = 0  # K_max of RM batches; 0 = the largest K in the dataset
    c.pack = True  # SFT/pretraining: pack several documents per row (segment ids)
    c.ptx_ratio = 0.0  # PPO: pretraining sequences per prompt in the parallel ptx stream
    c.seed = 0  # shuffle seed
    c.num_epochs = 1  # passes over the data; 0 = repeat forever
    c.num_workers = 0  # grain worker processes (0 = in the main process)
    c.num_threads = 4  # grain reader threads per process (0 = in the main thread, no prefetch)
    return c
