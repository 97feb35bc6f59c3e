"""Readers and validation of the four JSONL record kinds (docs/design.md, "Data formats").

    demonstrations  {"prompt": str, "completion": str}
    comparisons     {"prompt": str, "responses": [str, ...K], "ranking": [int, ...K]}
                    (ranking: response indices, best first; optional "ties": [[i, j, ...], ...],
                    groups of responses the labeler could not separate; optional "stopped":
                    [bool, ...K], whether each response ended with the stop token (default
                    all true); optional "response_ids": [[int, ...], ...K] with "tokenizer":
                    the ids each response was sampled as and the fingerprint of their
                    tokenizer (tokenizer_fingerprint below)) or the pairwise
                    {"prompt": str, "chosen": str, "rejected": str} (a K = 2 ranking)
    prompts         {"prompt": str, ...extra fields passed through}
    pretrain        {"text": str} lines, or plain .txt files (one document per file)

Every record is checked; the first bad one stops the load with one line naming file, line
and fault (`data/cmp.jsonl:17: ranking [0, 0, 2] is not a permutation of 0..2`). With
`skip_invalid` bad records are skipped instead and counted per reason (`REASONS`); the
counts are logged at the end of the load and kept in `LoadStats`. Tied pairs are dropped as
in the paper; a comparison left without any untied pair is dropped and counted.

With `LengthLimits` (a tokenizer and the lengths of config.data) the token lengths are
checked too: prompts longer than `max_prompt_len` are dropped and counted, a prompt that
leaves no room for `min_response_len` response tokens and EOS within `seq_len` is an error,
and responses longer than the room they get are counted as truncated (the pipelines cut
them). Files are read as bytes split on "\\n" only, so a byte-order mark, Windows line ends,
blank lines and any UTF-8 text are fine.

Not here: file discovery and splits (builder.py), tokenised batches (pipeline.py).
"""

from __future__ import annotations

import codecs
import dataclasses
import hashlib
import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from absl import logging
from etils import epath

from instructrl.data.config import KINDS
from instructrl.errors import InputError

# Why a record was rejected; the keys of LoadStats.skipped.
REASONS = (
    "invalid_utf8",
    "invalid_json",
    "not_object",
    "missing_field",
    "wrong_type",
    "empty_string",
    "ambiguous_format",
    "too_few_responses",
    "too_many_responses",
    "duplicate_responses",
    "bad_ranking",
    "bad_ties",
    "no_room_for_response",
)

# A .txt document is stored in pieces of at most this many characters (split at line ends)
# so that no single record holds a whole corpus; each piece is packed as its own document.
TXT_PIECE_CHARS = 100_000


@dataclasses.dataclass(frozen=True)
class Record:
    where: str  # "path:line" of the record's first line
    data: dict[str, Any]  # the normalised record (see the module docstring)


@dataclasses.dataclass(frozen=True)
class LengthLimits:
    """Token-length policy shared by the readers and the pipelines (see config.py)."""

    tokenizer: Any  # instructrl.tokenizer.Tokenizer (or anything with encode(str) -> list[int])
    max_prompt_len: int  # BOS + prompt tokens; longer prompts are dropped
    max_response_len: int  # response tokens (without EOS); longer ones are truncated
    seq_len: int  # [BOS] prompt response [EOS] fits in this many tokens
    min_response_len: int = 1
    # A chat_format.ChatFormat: the prompt's and responses' ids (a chat template's rendered
    # prompt, its stop token for EOS). None: [BOS] + encode(prompt), encode(response).
    chat: Any = None

    def prompt_len(self, prompt: str) -> int:
        if self.chat is None:
            return 1 + len(self.tokenizer.encode(prompt))
        return len(self.chat.prompt_ids(prompt))

    def response_len(self, prompt: str, response: str) -> int:
        if self.chat is None:
            return len(self.tokenizer.encode(response))
        return len(self.chat.response_ids(prompt, response))

    def response_room(self, prompt_len: int) -> int:
        """Response tokens a prompt of `prompt_len` tokens (with BOS) leaves, before EOS."""
        return min(self.max_response_len, self.seq_len - prompt_len - 1)


@dataclasses.dataclass
class LoadStats:
    """What a load kept, skipped, dropped and truncated; logged and stored with the dataset."""

    kind: str
    records: int = 0
    skipped: dict[str, int] = dataclasses.field(default_factory=dict)
    first_error: dict[str, str] = dataclasses.field(default_factory=dict)
    dropped_long_prompts: int = 0
    truncated_responses: int = 0
    tied_pairs_dropped: int = 0
    dropped_all_tied: int = 0
    max_responses: int = 0  # largest K among kept comparisons
    splits: dict[str, int] = dataclasses.field(default_factory=dict)

    def skip(self, reason: str, message: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        self.first_error.setdefault(reason, message)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LoadStats:
        return cls(**d)

    def log(self, name: str) -> None:
        logging.info("%s: %d %s records kept %s", name, self.records, self.kind, self.splits or "")
        if self.skipped:
            counts = ", ".join(f"{r}={n}" for r, n in sorted(self.skipped.items()))
            logging.warning(
                "%s: skipped %d invalid records (%s); first of each: %s",
                name,
                sum(self.skipped.values()),
                counts,
                " | ".join(self.first_error[r] for r in sorted(self.first_error)),
            )
        if self.dropped_long_prompts:
            logging.warning(
                "%s: dropped %d prompts over max_prompt_len", name, self.dropped_long_prompts
            )
        if self.truncated_responses:
            logging.warning("%s: %d responses will be truncated", name, self.truncated_responses)
        if self.tied_pairs_dropped or self.dropped_all_tied:
            logging.info(
                "%s: dropped %d tied pairs and %d comparisons with only ties",
                name,
                self.tied_pairs_dropped,
                self.dropped_all_tied,
            )


class InvalidRecord(Exception):
    """One record's fault; readers turn it into "path:line: message" or a count by reason."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason
        self.message = message


# ----------------------------------------------------------------------------- field checks


def _json_type(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, (int, float)):
        return "number"
    return {str: "string", list: "array", dict: "object"}.get(type(v), type(v).__name__)


def _string(obj: dict[str, Any], key: str, label: str | None = None, allow_empty=False) -> str:
    label = label or key
    if key not in obj:
        raise InvalidRecord("missing_field", f"missing field '{label}'")
    return _check_string(obj[key], label, allow_empty)


def _check_string(v: Any, label: str, allow_empty: bool = False) -> str:
    """A string field; `allow_empty` for ranked responses: an answer that is nothing but the
    stop token is something a policy does say, and a labeler ranks it (the RM must learn
    what it is worth, or PPO finds it)."""
    if not isinstance(v, str):
        raise InvalidRecord("wrong_type", f"field '{label}' must be a string, got {_json_type(v)}")
    if not allow_empty and not v.strip():
        raise InvalidRecord("empty_string", f"field '{label}' is empty")
    return v


def _int_list(v: Any, label: str) -> list[int]:
    if not isinstance(v, list) or any(isinstance(i, bool) or not isinstance(i, int) for i in v):
        raise InvalidRecord(
            "wrong_type", f"field '{label}' must be a list of integers, got {json.dumps(v)}"
        )
    return v


def _ties(v: Any, ranking: list[int], k: int) -> list[list[int]]:
    """Validates tie groups: lists of >= 2 distinct response indices, disjoint, each group
    contiguous in the ranking (a tie that straddles a third response contradicts the ranking)."""
    if v is None:
        return []
    if not isinstance(v, list):
        raise InvalidRecord(
            "wrong_type", f"field 'ties' must be a list of index lists, got {_json_type(v)}"
        )
    seen: set[int] = set()
    where = {r: pos for pos, r in enumerate(ranking)}
    groups = []
    for g in v:
        g = _int_list(g, "ties[]")
        if len(set(g)) < 2 or len(set(g)) != len(g):
            raise InvalidRecord("bad_ties", f"tie group {g} needs at least 2 distinct indices")
        if any(not 0 <= i < k for i in g):
            raise InvalidRecord("bad_ties", f"tie group {g} has an index outside 0..{k - 1}")
        if seen & set(g):
            raise InvalidRecord("bad_ties", f"response {min(seen & set(g))} is in two tie groups")
        seen |= set(g)
        pos = sorted(where[i] for i in g)
        if pos[-1] - pos[0] != len(g) - 1:
            raise InvalidRecord("bad_ties", f"tie group {g} is not contiguous in ranking {ranking}")
        groups.append(g)
    return groups


# ----------------------------------------------------------------------------- per-kind checks


def _demonstration(obj: dict[str, Any], max_responses: int) -> dict[str, Any]:
    return {"prompt": _string(obj, "prompt"), "completion": _string(obj, "completion")}


def _comparison(obj: dict[str, Any], max_responses: int) -> dict[str, Any]:
    prompt = _string(obj, "prompt")
    listwise = "responses" in obj or "ranking" in obj
    pairwise = "chosen" in obj or "rejected" in obj
    if listwise and pairwise:
        raise InvalidRecord(
            "ambiguous_format", "has both 'responses'/'ranking' and 'chosen'/'rejected'"
        )
    if pairwise:
        responses = [_string(obj, k, allow_empty=True) for k in ("chosen", "rejected")]
        ranking = [0, 1]
    else:
        if "responses" not in obj:
            raise InvalidRecord(
                "missing_field", "missing field 'responses' (or 'chosen'/'rejected')"
            )
        raw = obj["responses"]
        if not isinstance(raw, list):
            raise InvalidRecord(
                "wrong_type", f"field 'responses' must be a list, got {_json_type(raw)}"
            )
        responses = [_check_string(r, f"responses[{i}]", True) for i, r in enumerate(raw)]
        if "ranking" not in obj:
            raise InvalidRecord("missing_field", "missing field 'ranking'")
        ranking = _int_list(obj["ranking"], "ranking")
    k = len(responses)
    if k < 2:
        raise InvalidRecord("too_few_responses", f"needs at least 2 responses, got {k}")
    stopped = _bool_list(obj["stopped"], "stopped", k) if "stopped" in obj else [True] * k
    first: dict[tuple[str, bool], int] = {}
    for i, key in enumerate(zip(responses, stopped, strict=True)):
        if key in first:  # the same text, one stopped and one cut off, are two responses
            raise InvalidRecord(
                "duplicate_responses", f"responses {first[key]} and {i} are identical"
            )
        first[key] = i
    if max_responses and k > max_responses:
        raise InvalidRecord(
            "too_many_responses", f"has {k} responses; data.max_responses={max_responses}"
        )
    if sorted(ranking) != list(range(k)):
        raise InvalidRecord("bad_ranking", f"ranking {ranking} is not a permutation of 0..{k - 1}")
    out = {
        "prompt": prompt,
        "responses": responses,
        "ranking": ranking,
        "ties": _ties(obj.get("ties"), ranking, k),
    }
    if "stopped" in obj:
        out["stopped"] = stopped
    if "response_ids" in obj:
        ids = obj["response_ids"]
        if not isinstance(ids, list) or len(ids) != k:
            raise InvalidRecord(
                "wrong_type", f"field 'response_ids' must be a list of {k} id lists"
            )
        out["response_ids"] = [_int_list(x, f"response_ids[{i}]") for i, x in enumerate(ids)]
        out["tokenizer"] = _string(obj, "tokenizer")
    return out


def _bool_list(v: Any, name: str, k: int) -> list[bool]:
    if not isinstance(v, list) or len(v) != k or not all(isinstance(x, bool) for x in v):
        raise InvalidRecord("wrong_type", f"field '{name}' must be a list of {k} booleans")
    return list(v)


def _prompt(obj: dict[str, Any], max_responses: int) -> dict[str, Any]:
    _string(obj, "prompt")
    return dict(obj)  # extra fields are passed through to outputs


def _pretrain(obj: dict[str, Any], max_responses: int) -> dict[str, Any]:
    return {"text": _string(obj, "text")}


_CHECKS: dict[str, Callable[[dict[str, Any], int], dict[str, Any]]] = {
    "demonstrations": _demonstration,
    "comparisons": _comparison,
    "prompts": _prompt,
    "pretrain": _pretrain,
}


def check_record(kind: str, obj: Any, max_responses: int = 0) -> dict[str, Any]:
    """The normalised record of one parsed JSON value; raises InvalidRecord."""
    if not isinstance(obj, dict):
        raise InvalidRecord("not_object", f"expected a JSON object, got {_json_type(obj)}")
    return _CHECKS[kind](obj, max_responses)


def _apply_limits(
    kind: str, data: dict[str, Any], limits: LengthLimits | None, stats: LoadStats
) -> bool:
    """Length policy and tie bookkeeping; False = drop the record (counted in stats)."""
    if kind == "comparisons":
        ties = data["ties"]
        k = len(data["responses"])
        tied = sum(len(g) * (len(g) - 1) // 2 for g in ties)
        if tied == k * (k - 1) // 2:
            stats.dropped_all_tied += 1
            return False
        stats.tied_pairs_dropped += tied
    if limits is None or kind == "pretrain":
        return True
    prompt_len = limits.prompt_len(data["prompt"])
    if prompt_len > limits.max_prompt_len:
        stats.dropped_long_prompts += 1
        return False
    if prompt_len + limits.min_response_len + 1 > limits.seq_len:
        raise InvalidRecord(
            "no_room_for_response",
            f"prompt has {prompt_len} tokens with BOS; with at least {limits.min_response_len} "
            f"response token(s) and EOS it does not fit seq_len={limits.seq_len}",
        )
    responses = {"demonstrations": [data.get("completion")], "comparisons": data.get("responses")}
    room = limits.response_room(prompt_len)
    for r in responses.get(kind) or ():
        if limits.response_len(data["prompt"], r) > room:
            stats.truncated_responses += 1
    return True


# ----------------------------------------------------------------------------- file readers


def _jsonl_lines(path: str) -> Iterator[tuple[int, bytes]]:
    """(line number, raw line) of non-blank lines; split on b"\\n" only, BOM and \\r removed."""
    with epath.Path(path).open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if lineno == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8) :]
            raw = raw.rstrip(b"\r\n")
            if raw.strip():
                yield lineno, raw


def _parse(raw: bytes) -> dict[str, Any]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidRecord(
            "invalid_utf8", f"not valid UTF-8 (byte {e.start + 1} of the line)"
        ) from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise InvalidRecord(
            "invalid_json", f"not valid JSON ({e.msg.removesuffix(' at')} at column {e.colno})"
        ) from None
    if not isinstance(obj, dict):
        raise InvalidRecord("not_object", f"expected a JSON object, got {_json_type(obj)}")
    return obj


def _txt_pieces(path: str) -> Iterator[tuple[int, dict[str, Any] | InvalidRecord]]:
    try:
        text = epath.Path(path).read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        yield 1, InvalidRecord("invalid_utf8", f"not valid UTF-8 (byte {e.start + 1} of the file)")
        return
    text = text.replace("\r\n", "\n")
    if not text.strip():
        yield 1, InvalidRecord("empty_string", "text file is empty")
        return
    lineno, piece, size = 1, [], 0
    for line in text.splitlines(keepends=True):
        if size + len(line) > TXT_PIECE_CHARS and piece:
            yield lineno, {"text": "".join(piece)}
            lineno += sum(p.count("\n") for p in piece)
            piece, size = [], 0
        piece.append(line)
        size += len(line)
    if "".join(piece).strip():
        yield lineno, {"text": "".join(piece)}


# Fields of the four kinds that hold text (what a tokenizer trains on).
TEXT_FIELDS = ("text", "prompt", "completion", "chosen", "rejected", "responses")


def _texts(obj: dict[str, Any]) -> list[str]:
    texts = []
    for field in TEXT_FIELDS:
        value = obj.get(field)
        texts.extend(
            v for v in (value if isinstance(value, list) else [value]) if isinstance(v, str)
        )
    if not texts:
        raise InvalidRecord(
            "missing_field", f"no text field (expected one of {', '.join(TEXT_FIELDS)})"
        )
    return texts


def iter_texts(paths: Iterable[str]) -> Iterator[str]:
    """The texts of `paths` for tokenizer training: every text field (TEXT_FIELDS) of each
    record of a JSONL file of any kind, and plain .txt files, read as the record readers
    read them (byte-order mark, CRLF, blank lines and UTF-8 checks alike). Raises
    InputError "path:line: what is wrong" at the first line without text."""
    for path in paths:
        if not epath.Path(path).exists():
            raise InputError(f"{path}: file not found")
        items = _txt_pieces(path) if path.endswith(".txt") else _jsonl_lines(path)
        for lineno, item in items:
            try:
                if isinstance(item, InvalidRecord):
                    raise item
                texts = _texts(item if isinstance(item, dict) else _parse(item))
            except InvalidRecord as e:
                raise InputError(f"{path}:{lineno}: {e.message}") from None
            yield from texts


def iter_records(
    kind: str,
    paths: Iterable[str],
    *,
    skip_invalid: bool = False,
    limits: LengthLimits | None = None,
    max_responses: int = 0,
    stats: LoadStats | None = None,
) -> Iterator[Record]:
    """Streams the validated, normalised records of `paths`; counts go into `stats`.

    Raises InputError ("path:line: what is wrong") on the first bad record unless
    `skip_invalid`. Does not log; callers log `stats` once the stream is consumed.
    """
    if kind not in _CHECKS:
        raise ValueError(f"unknown record kind {kind!r}; expected one of {', '.join(KINDS)}")
    stats = stats if stats is not None else LoadStats(kind)
    check = _CHECKS[kind]
    for path in paths:
        if not epath.Path(path).exists():
            raise InputError(f"{path}: file not found")
        if kind == "pretrain" and path.endswith(".txt"):
            items: Iterator[tuple[int, Any]] = _txt_pieces(path)
        else:
            items = _jsonl_lines(path)
        for lineno, item in items:
            where = f"{path}:{lineno}"
            try:
                if isinstance(item, InvalidRecord):
                    raise item
                data = check(item if isinstance(item, dict) else _parse(item), max_responses)
                keep = _apply_limits(kind, data, limits, stats)
            except InvalidRecord as e:
                if not skip_invalid:
                    raise InputError(f"{where}: {e.message}") from None
                stats.skip(e.reason, f"{where}: {e.message}")
                continue
            if keep:
                stats.records += 1
                if kind == "comparisons":
                    stats.max_responses = max(stats.max_responses, len(data["responses"]))
                yield Record(where, data)


def read_records(
    kind: str,
    paths: str | Sequence[str],
    *,
    skip_invalid: bool = False,
    limits: LengthLimits | None = None,
    max_responses: int = 0,
) -> tuple[list[Record], LoadStats]:
    """Loads all records of `paths` (one path or a list) and logs what was skipped or dropped."""
    paths = [paths] if isinstance(paths, str) else list(paths)
    stats = LoadStats(kind)
    records = list(
        iter_records(
            kind,
            paths,
            skip_invalid=skip_invalid,
            limits=limits,
            max_responses=max_responses,
            stats=stats,
        )
    )
    stats.log(", ".join(paths))
    return records, stats


def read_demonstrations(paths: str | Sequence[str], **kw: Any) -> tuple[list[Record], LoadStats]:
    return read_records("demonstrations", paths, **kw)


def read_comparisons(paths: str | Sequence[str], **kw: Any) -> tuple[list[Record], LoadStats]:
    return read_records("comparisons", paths, **kw)


def read_prompts(paths: str | Sequence[str], **kw: Any) -> tuple[list[Record], LoadStats]:
    return read_records("prompts", paths, **kw)


def read_pretrain(paths: str | Sequence[str], **kw: Any) -> tuple[list[Record], LoadStats]:
    return read_records("pretrain", paths, **kw)


def tokenizer_fingerprint(tokenizer: Any, chat: Any = None) -> str:
    """Hash of a tokenizer's behaviour through its public API: special ids, every piece,
    and the encoding of a probe text (catches normaliser differences). With a chat template
    (`chat`, a chat_format.ChatFormat that is not plain) its fingerprint too: sampled
    response ids hold the template's framing."""
    h = hashlib.sha256()
    if chat is not None and not chat.plain:
        h.update(json.dumps(chat.fingerprint(), sort_keys=True).encode())
    ids = (tokenizer.vocab_size, tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id)
    h.update(repr(ids).encode())
    for i in range(tokenizer.vocab_size):
        h.update(tokenizer.id_to_piece(i).encode("utf-8", "surrogatepass") + b"\0")
    probe = "  Hello,\tWORLD! ｆｕｌｌ-width 123 café 東京 🤖\n\nAssistant:"
    h.update(repr(tokenizer.encode(probe)).encode())
    return h.hexdigest()
