"""Importers from public RLHF data sets into our JSONL formats (records.py).

    python -m instructrl.data.convert --format=hh_rlhf|tldr|alpaca --input=FILES --out=OUT.jsonl

  hh_rlhf  Anthropic HH-RLHF lines {"chosen": transcript, "rejected": transcript}. Both
           transcripts share everything up to their last "\\n\\nAssistant:"; that shared part
           (turn markers included) is the prompt, the rest of each is a response, so
           prompt + response == transcript. -> pairwise comparisons.
  tldr     OpenAI summarize-from-feedback comparisons {"info": {post|article, title,
           subreddit}, "summaries": [{"text"}, {"text"}], "choice": i}. The prompt is the
           post in the paper's "SUBREDDIT: ... TITLE: ... POST: ... TL;DR:" layout (articles:
           "ARTICLE: ... TL;DR:"). -> K = 2 rankings, the chosen summary first.
  alpaca   Alpaca {"instruction", "input", "output"} (JSON array or JSONL) -> demonstrations
           in the HH turn layout, prompt "\\n\\nHuman: {instruction}[\\n\\n{input}]\\n\\nAssistant:"
           and completion " {output}", so imported SFT and RM data share one format.

Inputs may be .gz. Each output record passes the same checks as our own files; a bad input
stops with "file:line: what is wrong" unless --skip_invalid, which skips and reports counts
per reason. The output is written to a temporary file and renamed, so a failed run leaves
nothing half-written.
"""

from __future__ import annotations

import argparse
import glob
import gzip
import json
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from etils import epath

from instructrl import cli
from instructrl.data.records import InvalidRecord, LoadStats, check_record
from instructrl.errors import InputError

ASSISTANT = "\n\nAssistant:"
HUMAN = "\n\nHuman:"


def _field(obj: Any, key: str, where: str = "") -> Any:
    if not isinstance(obj, dict):
        raise InvalidRecord("not_object", f"{where or 'record'} is not a JSON object")
    if key not in obj:
        raise InvalidRecord("missing_field", f"missing field '{where}{key}'")
    return obj[key]


def _text(obj: Any, key: str, where: str = "") -> str:
    v = _field(obj, key, where)
    if not isinstance(v, str):
        raise InvalidRecord("wrong_type", f"field '{where}{key}' must be a string")
    return v


def split_transcript(transcript: str, label: str = "transcript") -> tuple[str, str]:
    """(prompt up to and including the last "\\n\\nAssistant:", the final response)."""
    cut = transcript.rfind(ASSISTANT)
    if cut < 0:
        raise InvalidRecord("missing_field", f"{label} has no '\\n\\nAssistant:' turn")
    cut += len(ASSISTANT)
    return transcript[:cut], transcript[cut:]


def hh_rlhf_record(obj: Any) -> dict[str, Any]:
    """One HH-RLHF line -> {"prompt", "chosen", "rejected"}."""
    prompt, chosen = split_transcript(_text(obj, "chosen"), "chosen")
    other, rejected = split_transcript(_text(obj, "rejected"), "rejected")
    if other != prompt:
        raise InvalidRecord(
            "ambiguous_format", "chosen and rejected differ before their last '\\n\\nAssistant:'"
        )
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def tldr_prompt(info: dict[str, Any]) -> str:
    if "post" in info and info["post"] is not None:
        sub = _text(info, "subreddit", "info.")
        title = _text(info, "title", "info.")
        return f"SUBREDDIT: r/{sub}\nTITLE: {title}\nPOST: {_text(info, 'post', 'info.')}\nTL;DR:"
    return f"ARTICLE: {_text(info, 'article', 'info.')}\nTL;DR:"


def tldr_record(obj: Any) -> dict[str, Any]:
    """One summarize-from-feedback comparison -> {"prompt", "responses", "ranking"}."""
    prompt = tldr_prompt(_field(obj, "info"))
    summaries = _field(obj, "summaries")
    if not isinstance(summaries, list):
        raise InvalidRecord("wrong_type", "field 'summaries' must be a list")
    texts = [_text(s, "text", f"summaries[{i}].") for i, s in enumerate(summaries)]
    choice = _field(obj, "choice")
    if isinstance(choice, bool) or not isinstance(choice, int) or not 0 <= choice < len(texts):
        raise InvalidRecord(
            "bad_ranking", f"choice {choice!r} is not an index into the {len(texts)} summaries"
        )
    ranking = [choice] + [i for i in range(len(texts)) if i != choice]
    return {"prompt": prompt, "responses": texts, "ranking": ranking}


def alpaca_prompt(instruction: str, input_text: str = "") -> str:
    body = f"{instruction}\n\n{input_text}" if input_text.strip() else instruction
    return f"{HUMAN} {body}{ASSISTANT}"


def alpaca_record(obj: Any) -> dict[str, Any]:
    """One Alpaca item -> {"prompt", "completion"}."""
    input_text = _text(obj, "input") if isinstance(obj, dict) and "input" in obj else ""
    prompt = alpaca_prompt(_text(obj, "instruction"), input_text)
    return {"prompt": prompt, "completion": " " + _text(obj, "output")}


FORMATS: dict[str, tuple[str, Callable[[Any], dict[str, Any]]]] = {
    "hh_rlhf": ("comparisons", hh_rlhf_record),
    "tldr": ("comparisons", tldr_record),
    "alpaca": ("demonstrations", alpaca_record),
}


def _open_text(path: str) -> str:
    data = epath.Path(path).read_bytes()
    if path.endswith(".gz"):
        data = gzip.decompress(data)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not valid UTF-8 (byte {e.start + 1})") from None


def _items(path: str) -> Iterator[tuple[str, Any]]:
    """("path:line" or "path: item i", parsed value) for a JSONL file or a JSON array file."""
    text = _open_text(path)
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
        for i, item in enumerate(items):
            yield f"{path}: item {i}", item
        return
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            yield f"{path}:{lineno}", json.loads(line)
        except json.JSONDecodeError as e:
            yield (
                f"{path}:{lineno}",
                InvalidRecord(
                    "invalid_json",
                    f"not valid JSON ({e.msg.removesuffix(' at')} at column {e.colno})",
                ),
            )


def _expand(inputs: str | Sequence[str]) -> list[str]:
    specs = [s for s in inputs.split(",") if s] if isinstance(inputs, str) else list(inputs)
    paths: list[str] = []
    for spec in specs:
        matches = sorted(glob.glob(spec)) if any(c in spec for c in "*?[") else [spec]
        if not matches or not all(os.path.exists(m) for m in matches):
            raise InputError(f"{spec}: input file not found")
        paths.extend(matches)
    return paths


def convert_records(
    fmt: str, inputs: str | Sequence[str], *, skip_invalid: bool = False
) -> tuple[list[dict[str, Any]], LoadStats]:
    """Converts public-format files to our records (checked like our own files)."""
    if fmt not in FORMATS:
        raise InputError(f"--format={fmt}: expected one of {', '.join(FORMATS)}")
    kind, to_ours = FORMATS[fmt]
    stats = LoadStats(kind)
    out = []
    for path in _expand(inputs):
        for where, item in _items(path):
            try:
                if isinstance(item, InvalidRecord):
                    raise item
                record = to_ours(item)
                check_record(kind, record)
            except InvalidRecord as e:
                if not skip_invalid:
                    raise InputError(f"{where}: {e.message}") from None
                stats.skip(e.reason, f"{where}: {e.message}")
                continue
            out.append(record)
            stats.records += 1
    return out, stats


def convert(
    fmt: str, inputs: str | Sequence[str], out: str, *, skip_invalid: bool = False
) -> LoadStats:
    """Converts `inputs` and writes `out` (JSONL, UTF-8) atomically; returns the counts."""
    records, stats = convert_records(fmt, inputs, skip_invalid=skip_invalid)
    out_path = epath.Path(out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.parent / f".{out_path.name}.tmp"
    tmp.write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8"
    )
    tmp.replace(out_path)
    stats.log(out)
    return stats


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m instructrl.data.convert", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--format", required=True, choices=sorted(FORMATS))
    parser.add_argument("--input", required=True, help="comma-separated files or globs (.gz ok)")
    parser.add_argument("--out", required=True, help="output .jsonl")
    parser.add_argument(
        "--skip_invalid", action="store_true", help="skip bad records, report counts"
    )
    parser.add_argument("--verbose", action="store_true", help="print a failure's traceback")
    args = parser.parse_args(argv)

    def body() -> int:
        stats = convert(args.format, args.input, args.out, skip_invalid=args.skip_invalid)
        skipped = ", ".join(f"{r}={n}" for r, n in sorted(stats.skipped.items()))
        print(
            f"wrote {stats.records} {stats.kind} to {args.out}"
            + (f"; skipped {skipped}" if skipped else "")
        )
        return 0

    return cli.run(body, argv, fallback_path=args.out)


if __name__ == "__main__":
    cli.command(main)
