"""Converts a Hugging Face checkpoint (GPT-2, Llama, Qwen; hf.SUPPORTED) into a params export.

    python -m instructrl.convert --hf_dir=DIR --out=DIR [--dtype=float32]

Writes what `checkpoint.export_params` writes (OUT/params + OUT/model_config.json, the config
last), which a stage's `init_from` and `checkpoint.load_exported` read, plus a copy of the
checkpoint's tokenizer files when it has any: `tokenizer.model` (SentencePiece) and/or
`tokenizer.json` with tokenizer_config.json, special_tokens_map.json, generation_config.json
and chat_template.jinja (see `tokenizer.tokenizer_files`); `tokenizer_from=OUT` reads them.
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
from instructrl.models.transformer import ModelConfig


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


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m instructrl.convert", description=__doc__)
    parser.add_argument("--hf_dir", required=True, help="config.json + *.safetensors")
    parser.add_argument("--out", required=True, help="export folder (params + model_config.json)")
    parser.add_argument("--dtype", default="float32", help="dtype of the exported params")
    parser.add_argument("--verbose", action="store_true", help="print a failure's traceback")
    args = parser.parse_args(argv)

    def body() -> int:
        try:
            config = convert(args.hf_dir, args.out, dtype=args.dtype)
        except ValueError as e:  # a checkpoint the readers reject (InputError is one too)
            if isinstance(e, InstructrlError):
                raise
            raise InputError(f"{args.hf_dir}: {e}") from e
        has = [n for n in hf.TOKENIZER_FILES if os.path.exists(os.path.join(args.out, n))]
        print(f"wrote {args.out} (tokenizer: {', '.join(has) or 'none'}): {config}")
        return 0

    return cli.run(body, argv, fallback_path=args.out)


if __name__ == "__main__":
    cli.command(main)
