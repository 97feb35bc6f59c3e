"""Sampling text from a trained stage: a library function and a command.

    python -m instructrl.sample --workdir=DIR --stage=sft|ppo|... --prompts=FILE.jsonl \
        --num_samples=K --out=FILE.jsonl [--temperature=1.0] [--greedy] \
        [--chat_template=none|model|PATH.jinja] [--tokenizer=PATH]

Each output line is `{"prompt", "responses": [...K], "logprobs": [...K], "stopped": [...K]}`
plus the prompt record's extra fields; logprobs are summed over each response's tokens at
the sampling temperature. The model is the stage's export (`DIR/<stage>/export`, with
model_config.json). The tokenizer and chat template are the ones the stage trained with
(its `tokenizer_from` and `data.chat_template` in DIR/<stage>/config.json; without that
file DIR/tokenizer and "none"); the flags override them. With a chat template prompts are
rendered as the stage saw them (instructrl/chat_format.py), sampling stops at the
template's end-of-turn token and responses are written without the template's framing.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from instructrl import checkpoint as ckpt_lib
from instructrl import cli
from instructrl.chat_format import ChatFormat
from instructrl.errors import InputError
from instructrl.models import ModelConfig, Transformer
from instructrl.models.sampling import sample_jit


def generate(
    model: Transformer,
    params: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    max_prompt_len: int,
    seed: int = 0,
    temperature: float = 1.0,
    greedy: bool = False,
    batch_size: int = 64,
    with_ids: bool = False,
    chat: ChatFormat | None = None,
) -> tuple[list[str], list[bool], list[float]] | tuple[list[str], list[bool], list[float], list]:
    """One response per prompt: (texts, stopped, summed logprobs), and with `with_ids` the
    sampled token ids of each response (stop token excluded) as a fourth list: decoding and
    re-encoding need not give back the ids the policy sampled.

    Prompts are `chat.prompt_ids` (default: plain, `[BOS] prompt`), left-padded to
    `max_prompt_len` (a longer prompt is an error: drop it first); generation stops at
    `chat.stop_id` (plain: EOS) and texts are `chat.response_text` (a template's framing
    dropped). Batches are padded to `batch_size` rows so every call compiles once.
    """
    chat = chat if chat is not None else ChatFormat(tokenizer)
    texts, stopped, logps, ids = [], [], [], []
    rng = jax.random.key(seed)
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start : start + batch_size])
        n = len(chunk)
        chunk += [chunk[-1]] * (batch_size - n)
        tokens, mask = left_padded([chat.prompt_ids(p) for p in chunk], max_prompt_len, tokenizer)
        out = sample_jit(
            model,
            params,
            jnp.asarray(tokens),
            jnp.asarray(mask),
            jax.random.fold_in(rng, start),
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            greedy=greedy,
            stop_token=chat.stop_id,
            pad_id=tokenizer.pad_id,
        )
        out_tokens, out_mask, out_logp = (
            np.asarray(x) for x in (out.tokens, out.mask, out.logprobs)
        )
        for i in range(n):
            row = out_tokens[i][out_mask[i] > 0].tolist()
            stop = bool(row) and row[-1] == chat.stop_id
            row = row[:-1] if stop else row
            texts.append(chat.response_text(chunk[i], row))
            stopped.append(stop)
            logps.append(float(out_logp[i].sum()))
            ids.append(row)
    return (texts, stopped, logps, ids) if with_ids else (texts, stopped, logps)


def left_padded(rows: list[list[int]], max_len: int, tokenizer: Any) -> tuple[np.ndarray, ...]:
    """(tokens, mask) int32 [B, max_len] of id rows, left-padded with the pad id."""
    tokens = np.full((len(rows), max_len), tokenizer.pad_id, np.int32)
    mask = np.zeros((len(rows), max_len), np.int32)
    for i, row in enumerate(rows):
        if len(row) > max_len:
            raise ValueError(f"generate: a prompt of {len(row)} tokens exceeds {max_len}")
        if row:
            tokens[i, -len(row) :] = row
            mask[i, -len(row) :] = 1
    return tokens, mask


def decode_response(tokens: np.ndarray, mask: np.ndarray, tokenizer: Any) -> tuple[str, bool]:
    """(text, stopped) of one sampled response row: `mask` is 1 up to and including the stop
    token; a response whose last real token is not EOS never stopped (cut off)."""
    ids = np.asarray(tokens)[np.asarray(mask) > 0]
    return tokenizer.decode(ids), bool(len(ids)) and int(ids[-1]) == tokenizer.eos_id


def load_stage_model(workdir: str, stage: str) -> tuple[Transformer, Any]:
    """The LM exported by `stage` in `workdir` (replicated on the default device)."""
    export = os.path.join(workdir, stage, "export")
    config_path = os.path.join(export, ckpt_lib.MODEL_CONFIG_FILE)
    if not os.path.exists(config_path):
        raise InputError(f"{export}: no exported model (has stage '{stage}' finished?)")
    params, model_dict = ckpt_lib.load_exported(export)
    return Transformer(ModelConfig.from_dict(model_dict)), params


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m instructrl.sample", description=__doc__)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--stage", required=True)
    parser.add_argument("--prompts", required=True, help="JSONL with a 'prompt' field")
    parser.add_argument("--num_samples", type=int, default=1)
    parser.add_argument("--out", required=True)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--greedy", action="store_true")
    parser.add_argument("--max_new_tokens", type=int, default=0, help="0: up to the context")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch_size", type=int, default=64, help="prompts per sampler call")
    parser.add_argument(
        "--chat_template", default="", help="none|model|PATH.jinja; '': the stage's"
    )
    parser.add_argument("--tokenizer", default="", help="file or folder; '': the stage's")
    parser.add_argument("--verbose", action="store_true", help="print a failure's traceback")
    args = parser.parse_args(argv)
    return cli.run(lambda: _sample(args), argv, fallback_path=args.out)


def stage_settings(workdir: str, stage: str) -> tuple[str, str]:
    """(tokenizer path, chat template setting) stage `stage` trained with: its `tokenizer_from`
    and `data.chat_template` (the stage's own data section first) in DIR/<stage>/config.json;
    without that file DIR/tokenizer and "none"."""
    import ml_collections

    from instructrl.stages import inputs

    path = os.path.join(workdir, stage, "config.json")
    if not os.path.exists(path):
        return os.path.join(workdir, "tokenizer"), "none"
    with open(path, encoding="utf-8") as f:
        try:
            config = ml_collections.ConfigDict(json.load(f))
        except json.JSONDecodeError as e:
            raise InputError(f"{path}:{e.lineno}: not JSON ({e.msg})") from None
    own = config[stage].get("data", {}) if stage in config else {}
    setting = own.get("chat_template", config.get("data", {}).get("chat_template", "none"))
    if stage not in config:
        return os.path.join(workdir, "tokenizer"), setting
    return inputs.tokenizer_path(config, stage, workdir), setting


def _sample(args: argparse.Namespace) -> int:
    from instructrl import tokenizer as tokenizer_lib
    from instructrl.data import read_prompts

    model, params = load_stage_model(args.workdir, args.stage)
    tokenizer_path, setting = stage_settings(args.workdir, args.stage)
    tokenizer = tokenizer_lib.load(args.tokenizer or tokenizer_path)
    chat = ChatFormat(tokenizer, args.chat_template or setting, key="--chat_template")
    records = [r.data for r in read_prompts(args.prompts)[0]]
    max_len = model.config.max_len
    prompt_len = max(len(chat.prompt_ids(r["prompt"])) for r in records)
    if prompt_len >= max_len:
        raise InputError(f"{args.prompts}: a prompt of {prompt_len} tokens fills the context")
    new_tokens = args.max_new_tokens or max_len - prompt_len
    samples = [
        generate(
            model,
            params,
            tokenizer,
            [r["prompt"] for r in records],
            max_new_tokens=new_tokens,
            max_prompt_len=prompt_len,
            seed=args.seed + k,
            temperature=args.temperature,
            greedy=args.greedy,
            batch_size=args.batch_size,
            chat=chat,
        )
        for k in range(args.num_samples)
    ]
    tmp = args.out + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for i, record in enumerate(records):
            texts, stopped, logps = ([s[j][i] for s in samples] for j in range(3))
            line = {**record, "responses": texts, "logprobs": logps, "stopped": stopped}
            f.write(json.dumps(line, ensure_ascii=False) + "\n")
    os.replace(tmp, args.out)
    print(f"wrote {len(records)} prompts x {args.num_samples} samples to {args.out}")
    return 0


if __name__ == "__main__":
    cli.command(main)
