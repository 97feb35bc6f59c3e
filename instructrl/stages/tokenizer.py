"""Stage `tokenizer`: trains a SentencePiece model, or copies an existing tokenizer.

Writes `DIR/<name>/tokenizer.model` (or, copying a Hugging Face tokenizer, `tokenizer.json`
and its config files); other stages name it with `tokenizer_from="<name>"`.
`input` is a comma-separated list of .txt/.jsonl files (`@stage/file` for another stage's
output), read by the data record readers: every text field of a JSONL record of any of the
four kinds, a .txt file whole; a bad line stops the stage with "file:line: ..." and nothing
is written. `model_path` instead copies a ready tokenizer: a SentencePiece `.model`
(Llama-, Gemma-style or your own), a `tokenizer.json` or a checkpoint folder holding either.
"""

from __future__ import annotations

import logging
import os
import shutil

import jax
import ml_collections

from instructrl.errors import InputError
from instructrl.stages.inputs import HF_TOKENIZER_FILE, TOKENIZER_FILE, resolve_path
from instructrl.tokenizer import Tokenizer, load, tokenizer_files


def default_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(
            kind="tokenizer",
            vocab_size=512,
            input="",
            model_path="",
            model_type="bpe",
            # True: every digit its own piece (Llama-style; numbers of any size tokenise alike);
            # False: BPE may merge "12" into one piece, shorter sequences for small numbers.
            split_digits=True,
        )
    )


def run(config: ml_collections.ConfigDict, name: str, workdir: str) -> None:
    c = config[name]
    out_dir = os.path.join(workdir, name)
    target = os.path.join(out_dir, TOKENIZER_FILE)
    if jax.process_index() == 0:
        os.makedirs(out_dir, exist_ok=True)
        if c.model_path:
            try:
                load(c.model_path)
                files = tokenizer_files(c.model_path)
            except (ValueError, OSError) as e:
                raise InputError(f"config key '{name}.model_path': {e}") from None
            if TOKENIZER_FILE in files:
                shutil.copyfile(files[TOKENIZER_FILE], target + ".tmp")
                os.replace(target + ".tmp", target)
            else:
                _copy_hf(files, out_dir)
        else:
            if not c.input:
                raise InputError(f"config key '{name}.input' is empty: give text files to train on")
            files = resolve_path(c.input, workdir).split(",")
            try:
                path = Tokenizer.train(
                    files,
                    c.vocab_size,
                    os.path.join(out_dir, "tmp"),
                    model_type=c.model_type,
                    split_digits=c.split_digits,
                )
            except (ValueError, FileNotFoundError) as e:
                raise InputError(f"stage {name}: {e}") from None
            os.replace(path, target + ".tmp")
            os.remove(os.path.join(out_dir, "tmp.vocab"))
            os.replace(target + ".tmp", target)
        logging.info("tokenizer: %r", load(out_dir))
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"instructrl_stage_{name}")


def _copy_hf(files: dict[str, str], out_dir: str) -> None:
    """Copies a Hugging Face tokenizer's files; tokenizer.json, which marks it, comes last."""
    names = sorted(files, key=lambda n: n == HF_TOKENIZER_FILE)
    for n in names:
        shutil.copyfile(files[n], os.path.join(out_dir, n + ".tmp"))
    for n in names:
        os.replace(os.path.join(out_dir, n + ".tmp"), os.path.join(out_dir, n))
