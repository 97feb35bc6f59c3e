"""Hugging Face `tokenizer.json` tokenizers (GPT-2, Llama-3, Qwen, ...) behind `TokenizerBase`.

    tok = HFTokenizer.load("checkpoints/qwen")       # a folder holding tokenizer.json
    tok.encode("Hi 🤖"), tok.stop_id, tok.chat_template

The `tokenizers` library does the work (pre-tokenizer, BPE, byte-level decoding); this module
only reads the files around tokenizer.json the way transformers does:

    tokenizer_config.json     bos_token / eos_token / pad_token / unk_token, chat_template
    special_tokens_map.json   the same tokens, when tokenizer_config.json lacks them
    generation_config.json    bos/eos/pad_token_id (eos_token_id may be a list), stop ids
    chat_template.jinja       the chat template (newer checkpoints; wins over the config's)

`encode` adds no special tokens (tokenizer.json's post-processor, e.g. Llama-3's BOS, is not
applied); `add_bos`/`add_eos` add them as for SentencePiece. Special tokens written in the
text ("<|im_end|>") are recognised as such, as transformers does: a rendered chat template
tokenises to its control tokens.

stop_id is the token that ends an assistant turn: the special token the chat template writes
right after an assistant message (<|im_end|> for Qwen, <|eot_id|> for Llama-3), else eos.
Without a pad token, pad_id falls back to unk, then bos, then eos (has_pad False).

Not here: the SentencePiece backend and `load`, which picks the backend (tokenizer.py);
rendering chat templates (chat_template.py).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import jinja2
import tokenizers
from etils import epath

from instructrl import chat_template
from instructrl.errors import InputError
from instructrl.tokenizer import TokenizerBase

TOKENIZER_JSON = "tokenizer.json"
CONFIG_FILES = (
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template.jinja",
)
FILES = (TOKENIZER_JSON, *CONFIG_FILES)
_SPECIALS = ("bos", "eos", "pad", "unk")
_PROBE = "\x00instructrl-probe\x00"


def read_files(path: str | os.PathLike) -> tuple[str, dict[str, str]]:
    """(folder, {file name: text}) of the tokenizer at `path`: a tokenizer.json file (its
    folder holds the config files) or a folder holding one. tokenizer.json must exist."""
    p = epath.Path(path)
    if p.is_dir():
        p = p / TOKENIZER_JSON
    if not p.exists():
        raise FileNotFoundError(f"{p}: tokenizer file not found")
    folder = p.parent
    files = {TOKENIZER_JSON: p.read_text(encoding="utf-8")}
    for name in CONFIG_FILES:
        if (folder / name).exists():
            files[name] = (folder / name).read_text(encoding="utf-8")
    return os.fspath(folder), files


def _json(folder: str, name: str, text: str) -> dict[str, Any]:
    where = os.path.join(folder, name)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(f"{where}:{e.lineno}: invalid JSON ({e.msg})") from None
    if not isinstance(data, dict):
        raise InputError(f"{where}: expected a JSON object, got {type(data).__name__}")
    return data


def _token_text(value: Any) -> str | None:
    """A token as tokenizer_config.json spells it: a string, {"content": ...} or null."""
    if isinstance(value, Mapping):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _ids(value: Any) -> list[int]:
    """generation_config.json's *_token_id: an int, a list of ints or null."""
    if isinstance(value, int) and not isinstance(value, bool):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


def _model_template(folder: str, files: Mapping[str, str], config: Mapping[str, Any]) -> str | None:
    if "chat_template.jinja" in files:
        return files["chat_template.jinja"]
    value = config.get("chat_template")
    if isinstance(value, list):  # [{"name": "default", "template": ...}, {"name": "tool_use"...}]
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, Mapping)}
        value = named.get("default")
    if value is not None and not isinstance(value, str):
        where = os.path.join(folder, "tokenizer_config.json")
        raise InputError(f"{where}: chat_template is not a string or a list of named templates")
    return value


class HFTokenizer(TokenizerBase):
    """A `tokenizers.Tokenizer` with the special tokens of its config files. Picklable: pickles
    the files' texts and rebuilds on unpickle.

    Attributes: see TokenizerBase; also chat_template (str or None) and special_tokens
    ({"bos_token": "<|begin_of_text|>", ...}, the variables a chat template sees).
    """

    def __init__(
        self, files: Mapping[str, str], *, source: str = "<files>", pad_id: int | None = None
    ):
        self._files = dict(files)
        self._source = source
        self._pad_override = pad_id
        where = os.path.join(source, TOKENIZER_JSON)
        _json(source, TOKENIZER_JSON, files[TOKENIZER_JSON])  # bad JSON: the line number
        try:
            self._tok = tokenizers.Tokenizer.from_str(files[TOKENIZER_JSON])
        except Exception as e:  # tokenizers raises a plain Exception for every parse error
            reason = " ".join(str(e).split())
            raise InputError(f"{where}: not a valid Hugging Face tokenizer ({reason})") from None
        configs = {
            name: _json(source, name, files[name]) if name in files else {}
            for name in CONFIG_FILES
            if name.endswith(".json")
        }
        config, special_map = configs["tokenizer_config.json"], configs["special_tokens_map.json"]
        generation = configs["generation_config.json"]
        self.vocab_size: int = self._tok.get_vocab_size(with_added_tokens=True)

        ids: dict[str, int] = {}
        self.special_tokens: dict[str, str] = {}
        for name in _SPECIALS:
            key = f"{name}_token"
            for file, cfg in (
                ("tokenizer_config.json", config),
                ("special_tokens_map.json", special_map),
            ):
                text = _token_text(cfg.get(key))
                if text is None:
                    continue
                i = self._tok.token_to_id(text)
                if i is None:
                    where_cfg = os.path.join(source, file)
                    raise InputError(f"{where_cfg}: {key} {text!r} is not in the vocabulary")
                ids[name], self.special_tokens[key] = i, text
                break
            else:
                from_generation = _ids(generation.get(f"{key}_id"))
                if from_generation:  # not a chat template variable: transformers ignores it
                    ids[name] = from_generation[0]
        if "unk" not in ids and getattr(self._tok.model, "unk_token", None):
            unk = self._tok.token_to_id(self._tok.model.unk_token)
            if unk is not None:
                ids["unk"] = unk
        self.bos_id: int = ids.get("bos", -1)
        self.eos_id: int = ids.get("eos", -1)
        self.unk_id: int = ids.get("unk", -1)
        self.has_pad: bool = "pad" in ids
        if pad_id is not None:
            if not 0 <= pad_id < self.vocab_size:
                raise ValueError(f"{source}: pad_id={pad_id} outside [0, {self.vocab_size})")
            self.pad_id: int = pad_id
        else:
            fallback = [ids[n] for n in ("pad", "unk", "bos", "eos") if n in ids]
            if not fallback:
                raise InputError(
                    f"{source}: no pad, unk, bos or eos token in tokenizer_config.json, "
                    "special_tokens_map.json or generation_config.json (pass pad_id)"
                )
            self.pad_id = fallback[0]

        self.chat_template: str | None = _model_template(source, files, config)
        self.stop_id: int = self._turn_end()
        stops = [self.stop_id, self.eos_id, *_ids(generation.get("eos_token_id"))]
        self.stop_ids: tuple[int, ...] = tuple(dict.fromkeys(i for i in stops if i >= 0))

    def _turn_end(self) -> int:
        """The special token the chat template writes after an assistant message, else eos."""
        if self.chat_template is None:
            return self.eos_id
        return self.turn_end(self.chat_template, f"{self._source}/tokenizer_config.json")

    def turn_end(self, template: str, where: str) -> int:
        """The special token `template` writes right after an assistant message's content,
        else eos; `where` names the template in the error when it cannot render one
        user/assistant turn."""
        messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _PROBE}]
        try:
            text = chat_template.render(template, messages, **self.special_tokens)
        except jinja2.TemplateError as e:  # a template that cannot render one user/assistant turn
            raise InputError(
                f"{where}: chat_template fails on a one-turn conversation ({e}); fix it or "
                "remove the key"
            ) from e
        after = text[text.find(_PROBE) + len(_PROBE) :].lstrip() if _PROBE in text else ""
        specials = sorted(
            self._tok.get_added_tokens_decoder().items(), key=lambda t: -len(t[1].content)
        )
        for i, token in specials:
            if token.special and after.startswith(token.content):
                return i
        return self.eos_id

    @classmethod
    def load(cls, path: str | os.PathLike, *, pad_id: int | None = None) -> HFTokenizer:
        """Loads a tokenizer.json file or a folder holding one (local or any etils.epath)."""
        folder, files = read_files(path)
        return cls(files, source=folder, pad_id=pad_id)

    def __getstate__(self) -> dict[str, Any]:
        return {"files": self._files, "source": self._source, "pad_id": self._pad_override}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["files"], source=state["source"], pad_id=state["pad_id"])

    def __repr__(self) -> str:
        return (
            f"HFTokenizer({self._source!r}, vocab_size={self.vocab_size}, pad={self.pad_id}, "
            f"bos={self.bos_id}, eos={self.eos_id}, unk={self.unk_id}, stop={self.stop_id})"
        )

    # ---- encode / decode ------------------------------------------------------------------

    def _encode_many(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def _decode_ids(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=False)

    def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        return self._wrap(ids, add_bos, add_eos)

    def id_to_piece(self, i: int) -> str:
        return self._tok.id_to_token(int(i)) or ""

    def apply_chat_template(
        self,
        messages: list[Mapping[str, str]],
        *,
        add_generation_prompt: bool = False,
        template: str | None = None,
    ) -> str:
        """Renders `messages` through `template` (default: the checkpoint's chat template)."""
        template = template if template is not None else self.chat_template
        if template is None:
            raise InputError(f"{self._source}: the tokenizer has no chat template")
        return chat_template.render(
            template, messages, add_generation_prompt=add_generation_prompt, **self.special_tokens
        )
