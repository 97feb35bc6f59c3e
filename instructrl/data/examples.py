"""Records -> token arrays, one example at a time (pure numpy; the grain maps of pipeline.py).

Layouts (model conventions of models/transformer.py: `mask` 0 = pad, > 0 = segment id):

  SFT        sequence [BOS] prompt completion [EOS] (<= seq_len tokens); tokens = seq[:-1],
             targets = seq[1:], loss_mask = 1 exactly where the target is a completion token
             or the EOS.
  pretrain   [BOS] text [EOS], split into rows later; loss_mask = 1 on every target.
  RM         K rows [BOS] prompt response_k [EOS], right-padded to [K_max, T];
             response_mask [K_max], pair_mask [K_max, K_max] (1 iff i ranked above j, ties
             and padding excluded; losses.pairs_from_ranking).
  prompts    [BOS] prompt, LEFT-padded to [P] (pads first), as sampling expects.

"[BOS] prompt" is the prompt's ids and EOS the stop token of the data's ChatFormat
(instructrl/chat_format.py, `LengthLimits.chat`): with a chat template, the rendered user
turn + generation prompt and the template's end-of-turn token (<|im_end|>, <|eot_id|>).
A response longer than its room (LengthLimits.response_room) is cut and gets no EOS: a
model must not learn to stop where the cut happened. Prompts are never cut here; the
builder already dropped those over max_prompt_len.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from instructrl.chat_format import ChatFormat
from instructrl.data.records import LengthLimits, tokenizer_fingerprint
from instructrl.losses import pairs_from_ranking

Example = dict[str, np.ndarray]


def _decode(element: dict[str, Any] | bytes) -> dict[str, Any]:
    raw = element["record"] if isinstance(element, dict) else element
    return json.loads(raw)


def _response(ids: list[int], room: int, eos: int, stopped: bool = True) -> list[int]:
    """The response's tokens within `room`: + EOS when it stopped and fits, else cut."""
    if not stopped:
        return list(ids[:room])
    return [*ids, eos] if len(ids) <= room else ids[:room]


def sft_example(
    prompt: list[int], completion_ids: list[int], limits: LengthLimits, eos: int
) -> Example:
    """Unpadded tokens/targets/loss_mask int32 [n], n <= seq_len - 1; `prompt` holds its
    BOS (or the rendered turn), `eos` is the stop token."""
    seq = prompt + _response(completion_ids, limits.response_room(len(prompt)), eos)
    loss_mask = np.zeros(len(seq) - 1, np.int32)
    loss_mask[len(prompt) - 1 :] = 1  # targets from the first completion token on
    return {
        "tokens": np.asarray(seq[:-1], np.int32),
        "targets": np.asarray(seq[1:], np.int32),
        "loss_mask": loss_mask,
    }


def lm_example(text_ids: list[int], bos: int, eos: int) -> Example:
    """Pretraining document: unpadded tokens/targets/loss_mask int32 [len(text) + 1] (no BOS
    when bos < 0: a tokenizer without one, e.g. Qwen's)."""
    seq = [bos, *text_ids, eos] if bos >= 0 else [*text_ids, eos]
    n = len(seq) - 1
    return {
        "tokens": np.asarray(seq[:-1], np.int32),
        "targets": np.asarray(seq[1:], np.int32),
        "loss_mask": np.ones(n, np.int32),
    }


def pad_lm(example: Example, seq_len: int, pad_id: int) -> Example:
    """Right-pads an unpadded LM example to [seq_len]; adds mask (1 = real) and positions."""
    n = len(example["tokens"])
    out = {}
    for key, value in example.items():
        fill = pad_id if key in ("tokens", "targets") else 0
        out[key] = np.full(seq_len, fill, np.int32)
        out[key][:n] = value
    out["mask"] = (np.arange(seq_len) < n).astype(np.int32)
    out["positions"] = np.where(out["mask"] > 0, np.arange(seq_len), 0).astype(np.int32)
    return out


def chunk_lm(example: Example, seq_len: int) -> list[Example]:
    """Splits an LM example longer than seq_len into consecutive rows of <= seq_len."""
    n = len(example["tokens"])
    return [{k: v[s : s + seq_len] for k, v in example.items()} for s in range(0, n, seq_len)]


class FromPacked:
    """grain packing output -> model keys: mask = segment ids, positions restart per segment;
    padding gets pad_id (grain's concat-then-split packer pads with 0)."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, packed: Example) -> Example:
        mask = packed["tokens_segment_ids"].astype(np.int32)
        real = mask > 0
        return {
            "tokens": np.where(real, packed["tokens"], self.pad_id).astype(np.int32),
            "targets": np.where(real, packed["targets"], self.pad_id).astype(np.int32),
            "loss_mask": np.where(real, packed["loss_mask"], 0).astype(np.int32),
            "mask": mask,
            "positions": np.where(real, packed["tokens_positions"], 0).astype(np.int32),
        }


def rm_example(
    prompt: list[int],
    responses_ids: list[list[int]],
    ranking: list[int],
    ties: list[list[int]],
    limits: LengthLimits,
    k_max: int,
    eos: int,
    pad_id: int,
    stopped: list[bool] | None = None,
) -> Example:
    """tokens/mask/positions int32 [K_max, seq_len], response_mask int32 [K_max],
    pair_mask float32 [K_max, K_max], prompt_len int32 [] (the first response token's
    index). stopped [K]: whether each response ended with the stop token (None: all did);
    one that did not gets no EOS, as the policy's cut-off samples in PPO have none, so the RM
    reads it at its last token there and here alike. `prompt` holds its BOS (or the rendered
    turn); `eos` is the stop token."""
    k, t = len(responses_ids), limits.seq_len
    if k > k_max:
        raise ValueError(f"comparison has {k} responses but K_max={k_max} (data.max_responses)")
    room = limits.response_room(len(prompt))
    tokens = np.full((k_max, t), pad_id, np.int32)
    mask = np.zeros((k_max, t), np.int32)
    stopped = [True] * k if stopped is None else stopped
    for i, ids in enumerate(responses_ids):
        seq = prompt + _response(ids, room, eos, stopped[i])
        tokens[i, : len(seq)] = seq
        mask[i, : len(seq)] = 1
    positions = np.where(mask > 0, np.arange(t)[None, :], 0).astype(np.int32)
    return {
        "tokens": tokens,
        "mask": mask,
        "positions": positions,
        "response_mask": (np.arange(k_max) < k).astype(np.int32),
        "pair_mask": pairs_from_ranking(ranking, k, k_max, ties),
        "prompt_len": np.int32(len(prompt)),  # [BOS] + prompt; responses start here (DPO)
    }


def pack_responses(batch: Example, row_multiple: int, len_multiple: int) -> Example:
    """An RM batch (rm_example rows stacked: tokens/mask/positions [B, K_max, T]) with only
    its real responses, as rows: tokens/mask/positions [R, T'] and response_row int32
    [B, K_max], the row of each response (0 for padded ones, which pair_mask leaves out);
    the other keys as they were. R is the number of real responses rounded up to
    `row_multiple` (extra rows all 0, mask 0), T' the longest row's length rounded up to
    `len_multiple` (at most T). Rows are right-padded and attention is causal, so every
    response is read on the same tokens; only padding is skipped (in the tiny experiment
    K is 6 of K_max 9 on average and rows 36 of 64 tokens long)."""
    b, k, t = batch["tokens"].shape
    real = np.flatnonzero(batch["response_mask"].reshape(b * k) > 0)
    rows = max(-(-len(real) // row_multiple), 1) * row_multiple
    used = np.flatnonzero(batch["mask"].any(axis=(0, 1)))
    longest = int(used[-1]) + 1 if len(used) else 1
    length = min(t, -(-longest // len_multiple) * len_multiple)
    out = {key: v for key, v in batch.items() if key not in ("tokens", "mask", "positions")}
    for key in ("tokens", "mask", "positions"):
        packed = np.zeros((rows, length), batch[key].dtype)
        packed[: len(real)] = batch[key].reshape(b * k, t)[real, :length]
        out[key] = packed
    row = np.zeros(b * k, np.int32)
    row[real] = np.arange(len(real), dtype=np.int32)
    out["response_row"] = row.reshape(b, k)
    return out


def prompt_example(seq: list[int], prompt_len: int, pad_id: int, index: int) -> Example:
    """prompt_tokens/prompt_mask int32 [prompt_len] left-padded; index int64 [] (source row).
    `seq` holds the prompt's BOS (or is the rendered turn)."""
    if len(seq) > prompt_len:
        raise ValueError(
            f"prompt of {len(seq)} tokens > max_prompt_len={prompt_len}; rebuild the dataset"
        )
    tokens = np.full(prompt_len, pad_id, np.int32)
    mask = np.zeros(prompt_len, np.int32)
    tokens[prompt_len - len(seq) :] = seq
    mask[prompt_len - len(seq) :] = 1
    return {"prompt_tokens": tokens, "prompt_mask": mask, "index": np.asarray(index, np.int64)}


# ----------------------------------------------------------------------------- grain maps
# Picklable callables (grain may run them in worker processes).


class _Tokenizing:
    def __init__(self, tokenizer: Any, limits: LengthLimits | None = None):
        self.tok = tokenizer
        self.limits = limits
        chat = limits.chat if limits is not None else None
        self.chat = chat if chat is not None else ChatFormat(tokenizer)


class SFTMap(_Tokenizing):
    def __call__(self, element: dict[str, Any]) -> Example:
        r = _decode(element)
        chat = self.chat
        return sft_example(
            chat.prompt_ids(r["prompt"]),
            chat.response_ids(r["prompt"], r["completion"]),
            self.limits,
            chat.stop_id,
        )


class LMMap(_Tokenizing):
    def __call__(self, element: dict[str, Any]) -> Example:
        return lm_example(
            self.tok.encode(_decode(element)["text"]), self.tok.bos_id, self.tok.eos_id
        )


class RMMap(_Tokenizing):
    """Comparison records -> rm_example. Responses that carry the ids they were sampled as,
    for this very tokenizer (same fingerprint), use those ids; others are encoded."""

    def __init__(self, tokenizer: Any, limits: LengthLimits, k_max: int):
        super().__init__(tokenizer, limits)
        self.k_max = k_max
        self.fingerprint = tokenizer_fingerprint(tokenizer, self.chat)

    def __call__(self, element: dict[str, Any]) -> Example:
        r = _decode(element)
        chat = self.chat
        if "response_ids" in r and r.get("tokenizer") == self.fingerprint:
            responses = r["response_ids"]
        else:
            responses = [chat.response_ids(r["prompt"], x) for x in r["responses"]]
        return rm_example(
            chat.prompt_ids(r["prompt"]),
            responses,
            r["ranking"],
            r.get("ties", []),
            self.limits,
            self.k_max,
            chat.stop_id,
            self.tok.pad_id,
            r.get("stopped"),
        )


class PromptMap(_Tokenizing):
    def __call__(self, indexed: tuple[int, dict[str, Any]]) -> Example:
        index, element = indexed
        ids = self.chat.prompt_ids(_decode(element)["prompt"])
        return prompt_example(ids, self.limits.max_prompt_len, self.tok.pad_id, index)


class WithIndex:
    """(row of the source, element). grain hands later epochs indices past the end, hence %."""

    def __init__(self, num_records: int):
        self.n = num_records

    def __call__(self, index: int, element: Any) -> tuple[int, Any]:
        return index % self.n, element
