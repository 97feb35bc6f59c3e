"""Tests for instructrl/tokenizer.py: round trips, specials, padding, errors, pickling, CLI.

The `tokenizer` stage's split_digits option: tests/stages/test_tokenizer.py.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import subprocess
import sys

import numpy as np
import pytest

from instructrl.errors import InputError
from instructrl.tokenizer import Tokenizer
from tests.conftest import REPO

_WORDS = (
    "the quick brown fox jumps over lazy dog add two numbers answer question please reverse "
    "string sort list café naïve résumé Ünïcödé 東京 日本語 中文 😀 🤖 = + -"
)
WORDS = _WORDS.split()

UNICODE_CASES = [
    "hello world",
    "Ünïcödé café naïve",
    "東京 中文 日本語 unseen: 한국어 ελληνικά",
    "emoji 😀🤖👍🏽 and unseen 🦜",
    "line one\nline two\n\n  indented\ttab\r\n",
    "digits 12345 + 678 = 13023",
    "  leading and trailing spaces  ",
    "",
    "\x00\x7f control",
]


def _corpus_lines(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [
        " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 10))) + f" {rng.randint(0, 9999)}"
        for _ in range(n)
    ]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    txt = d / "a.txt"
    txt.write_text("\n".join(_corpus_lines(600)) + "\n", encoding="utf-8")
    jsonl = d / "b.jsonl"
    with open(jsonl, "w", encoding="utf-8") as f:
        for i, line in enumerate(_corpus_lines(300, seed=1)):
            rec = {"text": line} if i % 2 else {"prompt": line, "completion": " answer\n" + line}
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    return str(txt), str(jsonl)


@pytest.fixture(scope="module")
def tok(corpus, tmp_path_factory):
    prefix = str(tmp_path_factory.mktemp("tok") / "tok")
    return Tokenizer.load(Tokenizer.train(list(corpus), 400, prefix))


def test_special_ids(tok):
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2, 3)
    assert tok.has_pad
    assert 260 < tok.vocab_size <= 400
    assert tok.id_to_piece(4) == "<0x00>"  # byte pieces follow the 4 specials


@pytest.mark.parametrize("text", UNICODE_CASES)
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.unk_id not in ids  # byte fallback covers every character
    assert tok.decode(ids) == text


def test_concatenation_round_trips(tok):
    # No dummy prefix: prompt and completion tokens concatenate to the concatenated text.
    a, b = "add 12 + 3 =", " 15\nok"
    assert tok.decode(tok.encode(a) + tok.encode(b)) == a + b


def test_split_digits(tok):
    pieces = [tok.id_to_piece(i) for i in tok.encode("12345")]
    assert pieces == list("12345")


def test_trained_vocab_uses_corpus(tok):
    # A frequent corpus word should be far shorter than its byte count.
    assert len(tok.encode("question")) <= 2


def test_add_bos_eos_and_decode_stops_at_eos(tok):
    ids = tok.encode("quick fox", add_bos=True, add_eos=True)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert tok.decode(ids) == "quick fox"
    garbage = tok.encode(" never shown")
    assert tok.decode([tok.pad_id, tok.pad_id, *ids, *garbage]) == "quick fox"
    assert tok.decode(np.array([tok.eos_id, *garbage], np.int32)) == ""


def test_encode_batch_padding_sides(tok):
    texts = ["quick brown fox", "dog", ""]
    lens = [len(tok.encode(t, add_eos=True)) for t in texts]
    t_right, m_right = tok.encode_batch(texts, max_len=12, padding="right", add_eos=True)
    t_left, m_left = tok.encode_batch(texts, max_len=12, padding="left", add_eos=True)
    for arr in (t_right, m_right, t_left, m_left):
        assert arr.dtype == np.int32 and arr.shape == (3, 12)
    for b, text in enumerate(texts):
        n = lens[b]
        ids = tok.encode(text, add_eos=True)
        np.testing.assert_array_equal(m_right[b], [1] * n + [0] * (12 - n))
        np.testing.assert_array_equal(m_left[b], [0] * (12 - n) + [1] * n)
        np.testing.assert_array_equal(t_right[b, :n], ids)
        np.testing.assert_array_equal(t_left[b, 12 - n :], ids)
        assert (t_right[b, n:] == tok.pad_id).all() and (t_left[b, : 12 - n] == tok.pad_id).all()
    assert tok.decode_batch(t_left) == texts
    assert tok.decode_batch(t_right, m_right) == texts


def test_encode_batch_truncation(tok):
    text = "1234567890"  # split_digits: exactly 10 tokens
    ids = tok.encode(text, add_bos=True)
    right, m = tok.encode_batch([text], max_len=4, add_bos=True, truncate="right")
    left, _ = tok.encode_batch([text], max_len=4, add_bos=True, truncate="left")
    np.testing.assert_array_equal(right[0], ids[:4])
    np.testing.assert_array_equal(left[0], ids[-4:])
    assert m.sum() == 4
    with pytest.raises(ValueError, match="text 0: 11 tokens > max_len=4"):
        tok.encode_batch([text], max_len=4, add_bos=True, truncate="error")
    with pytest.raises(ValueError, match="padding"):
        tok.encode_batch([text], max_len=4, padding="middle")


def test_pickle_round_trip(tok):
    tok2 = pickle.loads(pickle.dumps(tok))
    assert repr(tok2) == repr(tok)
    for text in UNICODE_CASES:
        assert tok2.encode(text) == tok.encode(text)


def test_missing_and_corrupt_model(tmp_path):
    missing = tmp_path / "nope.model"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        Tokenizer.load(missing)
    for name, content in [("garbage.model", b"\x00garbage\xff" * 20), ("empty.model", b"")]:
        bad = tmp_path / name
        bad.write_bytes(content)
        with pytest.raises(
            InputError, match=re.escape(f"{bad}: not a valid SentencePiece model")
        ) as e:
            Tokenizer.load(bad)
        assert "\n" not in str(e.value) and ".cc(" not in str(e.value)


def test_bad_training_input(tmp_path):
    """Read by the data record readers: the first bad line is "path:line: what", with none
    of SentencePiece's own words (its C++ stack), and no model is left behind."""
    bad = tmp_path / "bad.jsonl"
    cases = [
        ('{"text": "ok"}\n{"label": 1}\n', r"bad.jsonl:2: no text field"),
        ('{"text": "ok"}\n\n{not json\n', r"bad.jsonl:3: not valid JSON"),
        ('{"text": "ok"}\n{"text": "cut sh', r"bad.jsonl:2: not valid JSON \(Unterminated string"),
        ('{"text": "ok"}\n["an", "array"]\n', r"bad.jsonl:2: expected a JSON object, got array"),
        (b'{"text": "ok"}\n{"text": "caf\xe9"}\n', r"bad.jsonl:2: not valid UTF-8 \(byte 14 of"),
    ]
    for content, message in cases:
        if isinstance(content, bytes):
            bad.write_bytes(content)
        else:
            bad.write_text(content)
        with pytest.raises(InputError, match=message) as e:
            Tokenizer.train([str(bad)], 300, str(tmp_path / "t"))
        assert "INTERNAL" not in str(e.value) and "\n" not in str(e.value)
        assert sorted(os.listdir(tmp_path)) == ["bad.jsonl"]
    with pytest.raises(FileNotFoundError, match=r"missing\.txt"):
        Tokenizer.train([str(tmp_path / "missing.txt")], 300, str(tmp_path / "t"))


def test_training_text_with_bom_crlf_and_blank_lines_is_fine(corpus, tmp_path):
    """The README's own-data files may have a byte-order mark, Windows line ends and blank
    lines (docs/design.md): the tokenizer learns exactly what it learns from the clean file."""
    with open(corpus[1], encoding="utf-8") as f:
        lines = f.read().splitlines()
    messy = tmp_path / "messy.jsonl"
    messy.write_bytes(b"\xef\xbb\xbf" + "\r\n\r\n".join(lines).encode() + b"\r\n\n")
    clean = Tokenizer.load(Tokenizer.train([corpus[1]], 400, str(tmp_path / "clean")))
    got = Tokenizer.load(Tokenizer.train([str(messy)], 400, str(tmp_path / "messy")))
    pieces = [got.id_to_piece(i) for i in range(got.vocab_size)]
    assert pieces == [clean.id_to_piece(i) for i in range(clean.vocab_size)]


def test_vocab_too_small_is_clear(corpus, tmp_path):
    with pytest.raises(ValueError, match=r"vocab_size=50\).*smaller than required"):
        Tokenizer.train(list(corpus), 50, str(tmp_path / "t"))


def test_llama_style_model(corpus, tmp_path):
    path = Tokenizer.train(
        list(corpus), 400, str(tmp_path / "llama"), pad_id=-1, unk_id=0, bos_id=1, eos_id=2
    )
    tok = Tokenizer.load(path)
    assert (tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    assert not tok.has_pad and tok.pad_id == tok.unk_id == 0  # documented fallback
    assert Tokenizer.load(path, pad_id=2).pad_id == 2
    tokens, mask = tok.encode_batch(["fox"], max_len=6, padding="left", add_bos=True)
    assert tokens[0, 0] == 0 and mask[0, 0] == 0
    assert tok.decode(tokens[0]) == "fox"
    with pytest.raises(ValueError, match="pad_id=999"):
        Tokenizer.load(path, pad_id=999)


def test_gemma_style_model(corpus, tmp_path):
    path = Tokenizer.train(
        list(corpus), 400, str(tmp_path / "gemma"), pad_id=0, eos_id=1, bos_id=2, unk_id=3
    )
    tok = Tokenizer.load(path)
    assert (tok.pad_id, tok.eos_id, tok.bos_id, tok.unk_id) == (0, 1, 2, 3)
    assert tok.has_pad
    ids = tok.encode("dog", add_bos=True, add_eos=True)
    assert ids[0] == 2 and ids[-1] == 1 and tok.decode(ids) == "dog"


def test_model_without_bos(corpus, tmp_path):
    tok = Tokenizer.load(Tokenizer.train(list(corpus), 400, str(tmp_path / "nb"), bos_id=-1))
    assert tok.bos_id == -1
    with pytest.raises(ValueError, match="no bos token"):
        tok.encode("x", add_bos=True)


def test_cli_train(corpus, tmp_path):
    out = tmp_path / "cli" / "tok"
    env = dict(os.environ, PYTHONPATH=REPO)
    cmd = [sys.executable, "-m", "instructrl.tokenizer", "train", f"--input={','.join(corpus)}"]
    proc = subprocess.run(
        [*cmd, "--vocab_size=320", f"--out={out}"], env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    tok = Tokenizer.load(f"{out}.model")
    assert tok.vocab_size <= 320 and tok.decode(tok.encode("東京 🤖\n")) == "東京 🤖\n"
    proc = subprocess.run(
        [*cmd[:-1], f"--input={tmp_path}/missing.txt", "--vocab_size=320", f"--out={out}"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: {tmp_path}/missing.txt: tokenizer training input not found"
    ]
