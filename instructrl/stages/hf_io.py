"""Stages that bring a Hugging Face checkpoint and public data in, and the policy back out.

  import_hf     `hf_dir` (config.json + *.safetensors + tokenizer files) -> DIR/<name>/export/
                (params + model_config.json, `python -m instructrl.convert --hf_dir`), the
                tokenizer files copied beside; `init_from="<name>"` and
                `tokenizer_from="<name>"` read them.
  convert_data  public-format files -> our JSONL records in DIR/<name>/ (`python -m
                instructrl.data.convert`): `demonstrations` (Alpaca) -> demonstrations.jsonl,
                `comparisons` (HH-RLHF) -> comparisons.jsonl; `prompts` (our {"prompt"} lines)
                is checked and copied to prompts.jsonl. `data.dir="@<name>"` reads them.
  export_hf     the export of `export_from` (e.g. the PPO-ptx policy) -> DIR/<name>/hf/, a
                transformers checkpoint (config.json, model.safetensors) with the tokenizer
                files of `tokenizer_from` (`python -m instructrl.convert --to_hf`). With a
                chat template (data.chat_template), generation_config.json lists the
                template's stop token first among eos_token_id, so transformers' `generate`
                ends a reply where our sampler does.

Each writes only DIR/<name>/; a bad input is one line naming the config key or the file.
"""

from __future__ import annotations

import json
import os

import jax
import ml_collections

from instructrl import chat_format, convert
from instructrl import tokenizer as tokenizer_lib
from instructrl.data import convert as data_convert
from instructrl.data import read_prompts
from instructrl.errors import ConfigError, InputError, InstructrlError
from instructrl.stages import driver, inputs

KINDS = ("import_hf", "convert_data", "export_hf")
GENERATION_CONFIG = "generation_config.json"


def default_config(kind: str = "import_hf") -> ml_collections.ConfigDict:
    if kind not in KINDS:
        raise ValueError(f"hf_io.default_config: kind={kind!r}, expected one of {KINDS}")
    c = ml_collections.ConfigDict()
    c.kind = kind
    if kind == "import_hf":
        c.hf_dir = ""  # the transformers checkpoint folder
        c.dtype = "float32"  # of the imported params
    elif kind == "convert_data":
        c.demonstrations = ""  # Alpaca JSON array or JSONL (.gz ok)
        c.comparisons = ""  # HH-RLHF JSONL {"chosen", "rejected"} (.gz ok)
        c.prompts = ""  # {"prompt": ...} lines (plain or HH turn layout)
        c.skip_invalid = False
    else:
        c.export_from = "ppo_ptx"  # the stage whose export is written
        c.tokenizer_from = "tokenizer"
        c.dtype = ""  # of the written weights; "" = the export's
    return c


def run(config: ml_collections.ConfigDict, name: str, workdir: str) -> None:
    kind = config[name].kind
    stage_dir = inputs.stage_dir(workdir, name)
    {"import_hf": _import_hf, "convert_data": _convert_data, "export_hf": _export_hf}[kind](
        config, name, workdir, stage_dir
    )


def _import_hf(config, name: str, workdir: str, stage_dir: str) -> None:
    c = config[name]
    if not c.hf_dir:
        raise ConfigError(f"config key '{name}.hf_dir' is empty: give a transformers checkpoint")
    if not os.path.isdir(c.hf_dir):
        raise ConfigError(f"config key '{name}.hf_dir': {c.hf_dir} is not a folder")
    try:
        tokenizer_lib.tokenizer_files(c.hf_dir)  # the stages need the checkpoint's tokenizer
    except FileNotFoundError:
        raise InputError(f"{c.hf_dir}: no tokenizer.model or tokenizer.json to import") from None
    out = os.path.join(stage_dir, inputs.EXPORT_DIR)
    try:
        model_config = convert.convert(c.hf_dir, out, dtype=c.dtype)
    except ValueError as e:  # a checkpoint the readers reject (InputError is one too)
        if isinstance(e, InstructrlError):
            raise
        raise InputError(f"{c.hf_dir}: {e}") from e
    print(f"{name}: imported {c.hf_dir}: {model_config}")


def _convert_data(config, name: str, workdir: str, stage_dir: str) -> None:
    c = config[name]
    jobs = [("demonstrations", "alpaca"), ("comparisons", "hh_rlhf")]
    if not any(c[key] for key, _ in jobs) and not c.prompts:
        raise ConfigError(f"config keys '{name}.demonstrations/comparisons/prompts' are all empty")
    if jax.process_index() != 0:
        return
    os.makedirs(stage_dir, exist_ok=True)
    for key, fmt in jobs:
        if c[key]:
            if not os.path.exists(c[key]):
                raise ConfigError(f"config key '{name}.{key}': {c[key]} not found")
            out = os.path.join(stage_dir, f"{key}.jsonl")
            stats = data_convert.convert(fmt, c[key], out, skip_invalid=c.skip_invalid)
            print(f"{name}: {stats.records} {key} from {c[key]} ({fmt})")
    if c.prompts:
        if not os.path.exists(c.prompts):
            raise ConfigError(f"config key '{name}.prompts': {c.prompts} not found")
        records, _ = read_prompts(c.prompts, skip_invalid=c.skip_invalid)  # checked here
        tmp = os.path.join(stage_dir, ".prompts.jsonl.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r.data, ensure_ascii=False) + "\n" for r in records)
        os.replace(tmp, os.path.join(stage_dir, "prompts.jsonl"))


def _export_hf(config, name: str, workdir: str, stage_dir: str) -> None:
    c = config[name]
    export = inputs.export_dir(config, name, "export_from", workdir)
    tokenizer_path = inputs.tokenizer_path(config, name, workdir)
    out = os.path.join(stage_dir, "hf")
    model_config, _ = convert.export_to_hf(
        export, out, tokenizer=tokenizer_path, dtype=c.dtype or None
    )
    if jax.process_index() != 0:
        return
    tok = tokenizer_lib.load(tokenizer_path)
    chat = chat_format.for_data(tok, driver.data_config(config, workdir, name))
    if not chat.plain:
        _stop_first(os.path.join(out, GENERATION_CONFIG), chat.stop_id, tok)
    print(f"{name}: wrote {out} ({convert.hf.family(model_config)}) from {export}")


def _stop_first(path: str, stop_id: int, tok) -> None:
    """generation_config.json with `stop_id` first among eos_token_id (the others kept)."""
    gen = {}
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            gen = json.load(f)
    old = gen.get("eos_token_id")
    old = old if isinstance(old, list) else [] if old is None else [old]
    ids = [i for i in dict.fromkeys([stop_id, *old, tok.eos_id]) if i >= 0]
    gen["eos_token_id"] = ids
    if tok.bos_id >= 0:
        gen.setdefault("bos_token_id", tok.bos_id)
    gen.setdefault("pad_token_id", tok.pad_id)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(gen, f, indent=2, sort_keys=True)
    os.replace(tmp, path)
