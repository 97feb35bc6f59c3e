"""Converts a Hugging Face checkpoint (GPT-2, Llama, Qwen; hf.SUPPORTED) into a params export,
and an export (e.g. a trained PPO policy) back into a Hugging Face checkpoint.

    python -m instructrl.convert --hf_dir=DIR --out=DIR [--dtype=float32]
    python -m instructrl.convert --to_hf --export=RUN/ppo_ptx/export --out=DIR \
        [--tokenizer=PATH] [--dtype=bfloat16]

Writes what `checkpoint.export_params` writes (OUT/params + OUT/model_config.json, the config
last), which a stage's `init_from` and `checkpoint.load_exported` read, plus a copy of the
checkpoint's tokenizer files when it has any: `tokenizer.model` (SentencePiece) and/or
`tokenizer.json` with tokenizer_config.json, special_tokens_map.json, generation_config.json
and chat_template.jinja (see `tokenizer.tokenizer_files`); `tokenizer_from=OUT` reads them.
`--to_hf` writes config.json + model.safetensors (`hf.to_pretrained`) that transformers'
`from_pretrained` loads, with the tokenizer files of `--tokenizer` (a `.model`, a
`tokenizer.json` or a folder holding either; default: the export folder's own, when convert
put them there) and their special ids in config.json; without any tokenizer it says so.
Bad input ends with one line on stderr and exit status 2.

Not here: the weight mapping itself (hf.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
from collections.abc import Sequence

from instructrl import checkpoint, cli, hf
from instructrl import tokenizer as tokenizer_lib
from instructrl.errors import InputError, InstructrlError
from instructrl.models.transformer import ModelConfig, Transformer


def convert(hf_dir: str, out: str, *, dtype: str = "float32") -> ModelConfig:
    """HF checkpoint directory -> instructrl export in `out`; returns the model config."""
    tokenizer = hf.load_tokenizer(hf_dir)  # a corrupt tokenizer fails before anything is written
    model, params = hf.from_pretrained(hf_dir, dtype=dtype)
    os.makedirs(out, exist_ok=True)
    if tokenizer is not None:
        for name, src in tokenizer_lib.tokenizer_files(hf_dir).items():
            shutil.copyfile(src, os.path.join(out, name))
    checkpoint.export_params(params, dataclasses.asdict(model.config), out)
    return model.config


def export_to_hf(
    export: str, out: str, *, tokenizer: str | None = None, dtype: str | None = None
) -> tuple[ModelConfig, str | None]:
    """An instructrl export (`export_params`'s folder) -> a transformers checkpoint in `out`;
    returns (model config, the tokenizer path used or None)."""
    if not os.path.exists(os.path.join(export, checkpoint.MODEL_CONFIG_FILE)):
        raise InputError(f"{export}: no {checkpoint.MODEL_CONFIG_FILE} (not an export folder)")
    if tokenizer is None and tokenizer_lib.tokenizer_files(export):
        tokenizer = export
    if tokenizer is not None:
        tokenizer_lib.load(tokenizer)  # a missing or corrupt tokenizer fails before any write
    params, model_dict = checkpoint.load_exported(export)
    model = Transformer(ModelConfig.from_dict(model_dict))
    hf.to_pretrained(model, params, out, dtype=dtype, tokenizer_path=tokenizer)
    return model.config, tokenizer


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m instructrl.convert", description=__doc__)
    parser.add_argument("--hf_dir", help="config.json + *.safetensors (HF -> export)")
    parser.add_argument("--to_hf", action="store_true", help="export -> HF checkpoint")
    parser.add_argument("--export", help="with --to_hf: an export folder (STAGE/export)")
    parser.add_argument("--tokenizer", help="with --to_hf: tokenizer to copy (default: export's)")
    parser.add_argument("--out", required=True, help="the folder to write")
    parser.add_argument("--dtype", default=None, help="dtype of the written params")
    parser.add_argument("--verbose", action="store_true", help="print a failure's traceback")
    args = parser.parse_args(argv)
    if args.to_hf == bool(args.hf_dir) or (args.to_hf and not args.export):
        parser.error("give --hf_dir=DIR, or --to_hf with --export=DIR")

    def to_hf() -> int:
        config, tok = export_to_hf(
            args.export, args.out, tokenizer=args.tokenizer, dtype=args.dtype
        )
        print(f"wrote {args.out} ({hf.family(config)}; tokenizer: {tok or 'none'})")
        return 0

    def body() -> int:
        try:
            config = convert(args.hf_dir, args.out, dtype=args.dtype or "float32")
        except ValueError as e:  # a checkpoint the readers reject (InputError is one too)
            if isinstance(e, InstructrlError):
                raise
            raise InputError(f"{args.hf_dir}: {e}") from e
        has = [n for n in hf.TOKENIZER_FILES if os.path.exists(os.path.join(args.out, n))]
        print(f"wrote {args.out} (tokenizer: {', '.join(has) or 'none'}): {config}")
        return 0

    return cli.run(to_hf if args.to_hf else body, argv, fallback_path=args.out)


if __name__ == "__main__":
    cli.command(main)
