"""Tokenizers: a SentencePiece wrapper (train, load, encode/decode, pad into batches) and
`load`, which picks the backend for a path:

    load("DIR/tokenizer.model")       # SentencePiece (`Tokenizer`)
    load("DIR/tokenizer.json")        # Hugging Face tokenizers (`hf_tokenizer.HFTokenizer`)
    load("DIR")                       # whichever DIR holds (tokenizer.model wins if both)

Both backends share `TokenizerBase` (encode, decode, encode_batch, decode_batch, special ids,
pickling).

Any SentencePiece `.model` loads (our own, Llama-style, Gemma-style). Models trained here use

    pad = 0, unk = 1, bos = 2, eos = 3, byte pieces <0x00>..<0xFF> = 4..259,

identity normalisation, no dummy prefix and byte fallback, so `decode(encode(x)) == x` for any
Unicode string and `encode(a) + encode(b)` decodes to `a + b` (prompt + completion concatenate
cleanly). Byte fallback needs `vocab_size >= 260 + #characters that get their own piece`.

Models without a pad id (Llama: pad = -1) pad with `unk_id` instead; `has_pad` says which.
The unk id is chosen over eos because left-padded prompts would otherwise look like they end
immediately; real unk tokens are rare and `decode` drops pad ids either way.

Not here: the tokenizer.json backend (hf_tokenizer.py), chat templates (chat_template.py),
data formats (instructrl/data/).

    python -m instructrl.tokenizer train --input=a.txt,b.jsonl --vocab_size=512 --out=DIR/tok
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from etils import epath

from instructrl import cli
from instructrl.errors import InputError

if TYPE_CHECKING:
    import sentencepiece as spm

DEFAULT_TRAIN_OPTIONS: dict[str, Any] = {
    "model_type": "bpe",
    "pad_id": 0,
    "unk_id": 1,
    "bos_id": 2,
    "eos_id": 3,
    "byte_fallback": True,
    "split_digits": True,
    # Round-trippable text: no NFKC, keep whitespace exactly, no "▁" prepended to each text.
    "normalization_rule_name": "identity",
    "remove_extra_whitespaces": False,
    "add_dummy_prefix": False,
    "allow_whitespace_only_pieces": True,
    "character_coverage": 0.9995,
    # Tiny corpora cannot always fill the requested vocabulary; the real size is `vocab_size`.
    "hard_vocab_limit": False,
    "input_sentence_size": 2_000_000,
    "shuffle_input_sentence": True,
    "minloglevel": 2,
}


def _read_bytes(path: str) -> bytes:
    p = epath.Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{path}: tokenizer model not found")
    return p.read_bytes()


def _processor(proto: bytes, source: str) -> spm.SentencePieceProcessor:
    import sentencepiece as spm  # here, not at import: the benchmarks run without it

    try:
        sp = spm.SentencePieceProcessor(model_proto=proto)
    except RuntimeError as e:
        # SentencePiece's words start with a C++ source location: keep the reason only.
        msg = re.sub(r"^\w+: \S+\.cc\(\d+\) ", "", " ".join(str(e).split()))
        if "ParseFromArray" in msg:
            msg = "the bytes do not parse as a model"
        raise InputError(f"{source}: not a valid SentencePiece model ({msg})") from None
    if sp.vocab_size() <= 0:
        raise InputError(f"{source}: not a valid SentencePiece model (empty vocabulary)")
    return sp


class TokenizerBase:
    """What every backend shares: ids of the special tokens, bos/eos wrapping, padding into
    batches and decoding up to EOS. A backend sets the attributes in its __init__ and
    implements `_encode_many`, `_decode_ids`, `encode` and `id_to_piece`.

    Attributes: vocab_size, pad_id, bos_id, eos_id, unk_id (bos/eos/unk may be -1 when the
    model has none), has_pad (False when pad_id is a fallback), stop_id (the token that ends
    an assistant turn: eos for SentencePiece models, e.g. <|im_end|> or <|eot_id|> for chat
    checkpoints), stop_ids (every id that ends generation, stop_id first).
    """

    vocab_size: int
    pad_id: int
    bos_id: int
    eos_id: int
    unk_id: int
    has_pad: bool
    stop_id: int
    stop_ids: tuple[int, ...]
    _source: str

    def _encode_many(self, texts: list[str]) -> list[list[int]]:
        raise NotImplementedError

    def _decode_ids(self, ids: list[int]) -> str:
        raise NotImplementedError

    def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        raise NotImplementedError

    def id_to_piece(self, i: int) -> str:
        raise NotImplementedError

    def _special(self, name: str) -> int:
        i = getattr(self, f"{name}_id")
        if i < 0:
            raise ValueError(f"{self._source}: model has no {name} token (add_{name}=True)")
        return i

    def _wrap(self, ids: list[int], add_bos: bool, add_eos: bool) -> list[int]:
        if add_bos:
            ids = [self._special("bos"), *ids]
        if add_eos:
            ids = [*ids, self._special("eos")]
        return ids

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Decodes up to (not including) the first EOS; pad and bos ids are dropped."""
        out = []
        for i in np.asarray(ids, dtype=np.int64).reshape(-1).tolist():
            if i == self.eos_id:
                break
            if i in (self.pad_id, self.bos_id):
                continue
            out.append(i)
        return self._decode_ids(out)

    def decode_batch(self, tokens: np.ndarray, mask: np.ndarray | None = None) -> list[str]:
        """tokens [B, T] -> B strings; with `mask`, only positions where mask > 0 are kept."""
        tokens = np.asarray(tokens)
        if mask is None:
            return [self.decode(row) for row in tokens]
        mask = np.asarray(mask)
        return [self.decode(row[m > 0]) for row, m in zip(tokens, mask, strict=True)]

    def encode_batch(
        self,
        texts: Sequence[str],
        *,
        max_len: int,
        padding: str = "right",
        add_bos: bool = False,
        add_eos: bool = False,
        truncate: str = "right",
    ) -> tuple[np.ndarray, np.ndarray]:
        """Encodes and pads to tokens int32 [B, max_len], mask int32 [B, max_len] (1 = real).

        padding: "right" (targets) or "left" (prompts, pads first).
        truncate: which end loses tokens when a text is longer than max_len ("right" keeps the
        start, "left" keeps the end) or "error" to raise. Truncation happens after bos/eos
        are added, so a right-truncated row has no eos.
        """
        if padding not in ("left", "right"):
            raise ValueError(f"padding={padding!r}: expected 'left' or 'right'")
        if truncate not in ("left", "right", "error"):
            raise ValueError(f"truncate={truncate!r}: expected 'left', 'right' or 'error'")
        if max_len <= 0:
            raise ValueError(f"max_len={max_len}: must be positive")
        tokens = np.full((len(texts), max_len), self.pad_id, dtype=np.int32)
        mask = np.zeros((len(texts), max_len), dtype=np.int32)
        encoded = self._encode_many(list(texts)) if texts else []
        for b, ids in enumerate(encoded):
            ids = self._wrap(ids, add_bos, add_eos)
            if len(ids) > max_len:
                if truncate == "error":
                    raise ValueError(f"text {b}: {len(ids)} tokens > max_len={max_len}")
                ids = ids[:max_len] if truncate == "right" else ids[len(ids) - max_len :]
            n = len(ids)
            sl = slice(0, n) if padding == "right" else slice(max_len - n, max_len)
            tokens[b, sl] = ids
            mask[b, sl] = 1
        return tokens, mask


class Tokenizer(TokenizerBase):
    """SentencePiece tokenizer. Picklable: pickles the model proto and rebuilds on unpickle.

    Attributes: see TokenizerBase; stop_id is eos_id.
    """

    def __init__(self, proto: bytes, *, source: str = "<proto>", pad_id: int | None = None):
        self._proto = proto
        self._source = source
        self._pad_override = pad_id
        self._sp = _processor(proto, source)
        sp = self._sp
        self.vocab_size: int = sp.vocab_size()
        self.bos_id: int = sp.bos_id()
        self.eos_id: int = sp.eos_id()
        self.unk_id: int = sp.unk_id()
        self.stop_id: int = self.eos_id
        self.stop_ids: tuple[int, ...] = (self.eos_id,) if self.eos_id >= 0 else ()
        self.has_pad: bool = sp.pad_id() >= 0
        if pad_id is not None:
            if not 0 <= pad_id < self.vocab_size:
                raise ValueError(f"{source}: pad_id={pad_id} outside [0, {self.vocab_size})")
            self.pad_id: int = pad_id
        else:
            self.pad_id = sp.pad_id() if self.has_pad else self.unk_id

    @classmethod
    def load(cls, path: str | os.PathLike, *, pad_id: int | None = None) -> Tokenizer:
        """Loads a `.model` file (local or any etils.epath path, e.g. gs://)."""
        path = os.fspath(path)
        return cls(_read_bytes(path), source=path, pad_id=pad_id)

    def __getstate__(self) -> dict[str, Any]:
        return {"proto": self._proto, "source": self._source, "pad_id": self._pad_override}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["proto"], source=state["source"], pad_id=state["pad_id"])

    def __repr__(self) -> str:
        return (
            f"Tokenizer({self._source!r}, vocab_size={self.vocab_size}, pad={self.pad_id}, "
            f"bos={self.bos_id}, eos={self.eos_id}, unk={self.unk_id})"
        )

    # ---- encode / decode ------------------------------------------------------------------

    def _encode_many(self, texts: list[str]) -> list[list[int]]:
        return self._sp.encode(texts, out_type=int)

    def _decode_ids(self, ids: list[int]) -> str:
        return self._sp.decode(ids)

    def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        return self._wrap(self._sp.encode(text, out_type=int), add_bos, add_eos)

    def id_to_piece(self, i: int) -> str:
        return self._sp.id_to_piece(int(i))

    # ---- training -------------------------------------------------------------------------

    @staticmethod
    def train(input_files: Sequence[str] | str, vocab_size: int, out_prefix: str, **kw: Any) -> str:
        """Trains a model on .txt and .jsonl files; returns `out_prefix.model`.

        Files are read by the data record readers (`records.iter_texts`): each JSONL record's
        text fields, .txt files whole; newlines inside texts are split off (they become byte
        pieces). A bad line is an InputError "path:line: ..." and nothing is written.
        `kw` overrides DEFAULT_TRAIN_OPTIONS (any SentencePieceTrainer flag, e.g. pad_id=-1).
        """
        if isinstance(input_files, str):
            input_files = [f for f in input_files.split(",") if f]
        if not input_files:
            raise InputError("tokenizer.train: no input files")
        for f in input_files:
            if not epath.Path(f).exists():
                raise FileNotFoundError(f"{f}: tokenizer training input not found")
        options = {**DEFAULT_TRAIN_OPTIONS, "num_threads": min(16, os.cpu_count() or 1), **kw}
        out_dir = os.path.dirname(out_prefix)
        if out_dir:
            os.makedirs(out_dir, exist_ok=True)
        # SentencePiece wraps an error raised by the iterator into its own message (with a
        # C++ stack); the iterator keeps it and ends instead, and it is raised as it was.
        failed: list[BaseException] = []

        def lines() -> Iterator[str]:
            try:
                yield from _training_lines(input_files)
            except Exception as e:
                failed.append(e)

        outputs = [out_prefix + ext for ext in (".model", ".vocab")]
        existed = {p: os.path.exists(p) for p in outputs}
        import sentencepiece as spm

        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=lines(),
                model_prefix=out_prefix,
                vocab_size=vocab_size,
                **options,
            )
        except RuntimeError as e:
            if not failed:
                # SentencePiece prefixes its message with a C++ source location; keep the reason.
                reason = " ".join(str(e).split()).rsplit("] ", 1)[-1]
                raise InputError(f"tokenizer.train(vocab_size={vocab_size}): {reason}") from None
        if failed:
            for p in outputs:  # a model of part of the input: not the one asked for
                if not existed[p] and os.path.exists(p):
                    os.remove(p)
            raise failed[0]
        return out_prefix + ".model"


def _training_lines(input_files: Sequence[str]) -> Iterator[str]:
    """Yields the non-empty lines of every text (a text's newlines become piece boundaries)."""
    from instructrl.data.records import iter_texts  # the data package imports grain, tfds

    for text in iter_texts(input_files):
        yield from (s for s in text.split("\n") if s)


SP_FILE = "tokenizer.model"


def _resolve(path: str) -> tuple[str, str]:
    """("sp" | "hf", file) for a tokenizer path (see `load`)."""
    p = epath.Path(path)
    if p.is_dir():
        for backend, name in (("sp", SP_FILE), ("hf", "tokenizer.json")):
            if (p / name).exists():
                return backend, os.fspath(p / name)
        raise FileNotFoundError(f"{path}: no {SP_FILE} or tokenizer.json in this folder")
    return ("hf" if path.endswith(".json") else "sp"), path


def load(path: str | os.PathLike, *, pad_id: int | None = None) -> TokenizerBase:
    """The tokenizer at `path`: a SentencePiece `.model` file, a Hugging Face `tokenizer.json`
    (its folder's tokenizer_config.json etc. give the special tokens) or a folder holding
    either (tokenizer.model first). Missing files: FileNotFoundError; corrupt: InputError,
    one line naming the file."""
    backend, path = _resolve(os.fspath(path))
    if backend == "sp":
        return Tokenizer.load(path, pad_id=pad_id)
    from instructrl.hf_tokenizer import HFTokenizer

    return HFTokenizer.load(path, pad_id=pad_id)


def tokenizer_files(path: str | os.PathLike) -> dict[str, str]:
    """{file name in a checkpoint folder: source path} of the tokenizer at `path` (see `load`):
    a `.model` file becomes "tokenizer.model"; a tokenizer.json comes with the config files
    next to it. A folder holding both backends' files gives all of them."""
    from instructrl.hf_tokenizer import CONFIG_FILES, FILES

    path = os.fspath(path)
    p = epath.Path(path)
    if not p.is_dir():
        if _resolve(path)[0] == "sp":
            return {SP_FILE: path}
        files = {"tokenizer.json": path}
        for name in CONFIG_FILES:
            if (p.parent / name).exists():
                files[name] = os.fspath(p.parent / name)
        return files
    _resolve(path)  # a folder without a tokenizer: FileNotFoundError
    return {n: os.path.join(path, n) for n in (SP_FILE, *FILES) if (p / n).exists()}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m instructrl.tokenizer")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train a SentencePiece model")
    train.add_argument("--input", required=True, help="comma-separated .txt/.jsonl files")
    train.add_argument("--vocab_size", type=int, required=True)
    train.add_argument("--out", required=True, help="output prefix; writes PREFIX.model")
    train.add_argument("--model_type", default="bpe", choices=["bpe", "unigram"])
    train.add_argument("--character_coverage", type=float, default=0.9995)
    train.add_argument(
        "--split_digits",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="one piece per digit (default); --no-split_digits lets BPE merge numbers",
    )
    train.add_argument("--verbose", action="store_true", help="print a failure's traceback")
    args = parser.parse_args(argv)

    def body() -> int:
        path = Tokenizer.train(
            args.input,
            args.vocab_size,
            args.out,
            model_type=args.model_type,
            character_coverage=args.character_coverage,
            split_digits=args.split_digits,
        )
        print(f"wrote {path}: {Tokenizer.load(path)!r}")
        return 0

    return cli.run(body, argv)


if __name__ == "__main__":
    cli.command(main)
