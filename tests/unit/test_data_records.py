"""Tests for instructrl/data/records.py: every validation rule, skip_invalid, encodings, lengths."""

from __future__ import annotations

import codecs
import json
import logging

import pytest

from instructrl.data import records as rec
from instructrl.data.records import LengthLimits, iter_records, read_records
from instructrl.errors import InputError

GOOD = {
    "demonstrations": {"prompt": "p", "completion": "c"},
    "comparisons": {"prompt": "p", "responses": ["a", "b"], "ranking": [1, 0]},
    "prompts": {"prompt": "p"},
    "pretrain": {"text": "t"},
}

# (kind, bad line, reason, message after "path:3: ")
CASES = [
    ("demonstrations", '{"prompt": "a", ', "invalid_json", "not valid JSON (Expecting property name enclosed in double quotes at column 17)"),
    ("demonstrations", "[1, 2]", "not_object", "expected a JSON object, got array"),
    ("demonstrations", '{"prompt": "a"}', "missing_field", "missing field 'completion'"),
    ("demonstrations", '{"prompt": 3, "completion": "b"}', "wrong_type", "field 'prompt' must be a string, got number"),
    ("demonstrations", '{"prompt": " \\n ", "completion": "b"}', "empty_string", "field 'prompt' is empty"),
    ("pretrain", '{"text": ""}', "empty_string", "field 'text' is empty"),
    ("comparisons", '{"prompt": " ", "responses": ["", "b"], "ranking": [1, 0]}', "empty_string", "field 'prompt' is empty"),
    ("prompts", '{"id": 1}', "missing_field", "missing field 'prompt'"),
    ("comparisons", '{"prompt": "p", "responses": ["a"], "ranking": [0]}', "too_few_responses", "needs at least 2 responses, got 1"),
    ("comparisons", '{"prompt": "p", "responses": ["a", "b", "a"], "ranking": [0, 1, 2]}', "duplicate_responses", "responses 0 and 2 are identical"),
    ("comparisons", '{"prompt": "p", "chosen": "a", "rejected": "a"}', "duplicate_responses", "responses 0 and 1 are identical"),
    ("comparisons", '{"prompt": "p", "responses": ["a", "b", "c"], "ranking": [0, 0, 2]}', "bad_ranking", "ranking [0, 0, 2] is not a permutation of 0..2"),
    ("comparisons", '{"prompt": "p", "responses": ["a", "b", "c"], "ranking": [0, 1]}', "bad_ranking", "ranking [0, 1] is not a permutation of 0..2"),
    ("comparisons", '{"prompt": "p", "responses": ["a", "b"], "ranking": [0, true]}', "wrong_type", "field 'ranking' must be a list of integers, got [0, true]"),
    ("comparisons", '{"prompt": "p", "responses": ["a", 2], "ranking": [0, 1]}', "wrong_type", "field 'responses[1]' must be a string, got number"),
    ("comparisons", '{"prompt": "p", "responses": ["a", "b"]}', "missing_field", "missing field 'ranking'"),
    ("comparisons", '{"prompt": "p", "chosen": "a"}', "missing_field", "missing field 'rejected'"),
    ("comparisons", '{"prompt": "p", "chosen": "a", "rejected": "b", "ranking": [0, 1]}', "ambiguous_format", "has both 'responses'/'ranking' and 'chosen'/'rejected'"),
    ("comparisons", '{"prompt": "p", "responses": ["a", "b", "c"], "ranking": [0, 1, 2], "ties": [[0, 2]]}', "bad_ties", "tie group [0, 2] is not contiguous in ranking [0, 1, 2]"),
    ("comparisons", '{"prompt": "p", "responses": ["a", "b", "c"], "ranking": [0, 1, 2], "ties": [[1, 5]]}', "bad_ties", "tie group [1, 5] has an index outside 0..2"),
    ("comparisons", '{"prompt": "p", "responses": ["a", "b", "c"], "ranking": [0, 1, 2], "ties": [[1]]}', "bad_ties", "tie group [1] needs at least 2 distinct indices"),
    ("comparisons", '{"prompt": "p", "responses": ["a", "b", "c"], "ranking": [0, 1, 2], "ties": [[0, 1], [1, 2]]}', "bad_ties", "response 1 is in two tie groups"),
]  # fmt: skip


def _write(path, lines, *, kind):
    text = json.dumps(GOOD[kind]) + "\n\n" + "\n".join(lines) + "\n"
    path.write_text(text, encoding="utf-8")
    return str(path)


@pytest.mark.parametrize("kind,line,reason,message", CASES)
def test_each_rule_stops_with_file_and_line(tmp_path, kind, line, reason, message):
    path = _write(tmp_path / "data.jsonl", [line], kind=kind)
    with pytest.raises(InputError) as e:
        read_records(kind, path)
    assert str(e.value) == f"{path}:3: {message}"
    assert "\n" not in str(e.value)
    assert reason in rec.REASONS


@pytest.mark.parametrize("kind,line,reason,message", CASES)
def test_skip_invalid_counts_the_reason(tmp_path, kind, line, reason, message):
    path = _write(tmp_path / "data.jsonl", [line], kind=kind)
    records, stats = read_records(kind, path, skip_invalid=True)
    assert len(records) == 1 and records[0].where == f"{path}:1"
    assert stats.skipped == {reason: 1}
    assert stats.first_error[reason] == f"{path}:3: {message}"


def test_issue_example_message(tmp_path):
    lines = [json.dumps(GOOD["comparisons"])] * 16
    lines.append('{"prompt": "p", "responses": ["a", "b", "c"], "ranking": [0, 0, 2]}')
    path = tmp_path / "cmp.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(
        InputError, match=r"cmp\.jsonl:17: ranking \[0, 0, 2\] is not a permutation of 0\.\.2$"
    ):
        read_records("comparisons", str(path))


def test_invalid_utf8_and_too_many_responses(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"prompt": "\xff\xfe", "completion": "x"}\n')
    with pytest.raises(InputError, match=r"bad\.jsonl:1: not valid UTF-8 \(byte 13 of the line\)"):
        read_records("demonstrations", str(path))
    path.write_text(
        json.dumps({"prompt": "p", "responses": ["a", "b", "c"], "ranking": [0, 1, 2]}) + "\n"
    )
    with pytest.raises(InputError, match=r":1: has 3 responses; data.max_responses=2"):
        read_records("comparisons", str(path), max_responses=2)


def test_skip_invalid_counts_by_reason_and_logs_them(tmp_path, caplog):
    bad = [c for c in CASES if c[0] == "comparisons"]
    lines = (
        [json.dumps(GOOD["comparisons"])] + [c[1] for c in bad] + [json.dumps(GOOD["comparisons"])]
    )
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with caplog.at_level(logging.WARNING):
        records, stats = read_records("comparisons", str(path), skip_invalid=True)
    expected: dict[str, int] = {}
    for c in bad:
        expected[c[2]] = expected.get(c[2], 0) + 1
    assert stats.skipped == expected
    assert len(records) == stats.records == 2
    logged = caplog.text
    assert f"skipped {len(bad)} invalid records" in logged
    for reason, n in expected.items():
        assert f"{reason}={n}" in logged


def test_bom_crlf_blank_lines_and_non_ascii(tmp_path):
    recs = [
        {"prompt": "Grüße aus Köln — 東京 😀", "completion": "naïve café\r\nzweite Zeile"},
        {"prompt": "second", "completion": "ünïcödé ✓"},
    ]
    body = "\r\n".join(json.dumps(r, ensure_ascii=False) for r in recs[:1])
    body += "\r\n\r\n   \r\n" + json.dumps(recs[1], ensure_ascii=False) + "\r\n\r\n"
    path = tmp_path / "win.jsonl"
    path.write_bytes(codecs.BOM_UTF8 + body.encode("utf-8"))
    records, stats = read_records("demonstrations", str(path))
    assert [r.data for r in records] == recs
    assert [r.where for r in records] == [f"{path}:1", f"{path}:4"]
    assert stats.skipped == {}

    txt = tmp_path / "doc.txt"
    txt.write_bytes(codecs.BOM_UTF8 + "Erste Zeile\r\nzweite — 東京\r\n".encode())
    docs, _ = read_records("pretrain", str(txt))
    assert [d.data for d in docs] == [{"text": "Erste Zeile\nzweite — 東京\n"}]


def test_txt_pieces_and_empty_txt(tmp_path, monkeypatch):
    monkeypatch.setattr(rec, "TXT_PIECE_CHARS", 20)
    txt = tmp_path / "long.txt"
    lines = [f"line number {i:03d}\n" for i in range(5)]
    txt.write_text("".join(lines))
    docs, _ = read_records("pretrain", str(txt))
    assert "".join(d.data["text"] for d in docs) == "".join(lines)
    assert [d.where for d in docs] == [f"{txt}:{i}" for i in range(1, 6)]
    (tmp_path / "empty.txt").write_text(" \n")
    with pytest.raises(InputError, match=r"empty\.txt:1: text file is empty"):
        read_records("pretrain", str(tmp_path / "empty.txt"))


def test_pairwise_becomes_k2_ranking_and_extra_prompt_fields_pass_through(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"prompt": "p", "chosen": "good", "rejected": "bad"}) + "\n")
    (r,), _ = read_records("comparisons", str(path))
    assert r.data == {"prompt": "p", "responses": ["good", "bad"], "ranking": [0, 1], "ties": []}
    # An empty answer (the policy stopped at once) is a response to rank; an empty prompt
    # is not a prompt.
    path.write_text(json.dumps({"prompt": "p", "responses": ["", "a"], "ranking": [1, 0]}) + "\n")
    (r,), _ = read_records("comparisons", str(path))
    assert r.data["responses"] == ["", "a"]
    path.write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": ""}) + "\n")
    (r,), _ = read_records("comparisons", str(path))
    assert r.data["responses"] == ["a", ""]
    path.write_text(json.dumps({"prompt": "p", "id": 7, "meta": {"a": [1]}}) + "\n")
    (r,), _ = read_records("prompts", str(path))
    assert r.data == {"prompt": "p", "id": 7, "meta": {"a": [1]}}


def test_ties_drop_pairs_and_all_tied_records(tmp_path):
    lines = [
        {
            "prompt": "p1",
            "responses": ["a", "b", "c", "d"],
            "ranking": [3, 1, 0, 2],
            "ties": [[1, 0]],
        },
        {"prompt": "p2", "responses": ["a", "b"], "ranking": [0, 1], "ties": [[0, 1]]},
        {"prompt": "p3", "responses": ["a", "b", "c"], "ranking": [2, 0, 1], "ties": [[2, 0, 1]]},
    ]
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    records, stats = read_records("comparisons", str(path))
    assert [r.data["prompt"] for r in records] == ["p1"]
    assert stats.dropped_all_tied == 2
    assert stats.tied_pairs_dropped == 1


class CharTokenizer:
    """One token per character; enough for length checks."""

    def encode(self, text):
        return [ord(c) % 100 + 4 for c in text]


def test_length_limits_drop_truncate_and_no_room(tmp_path):
    limits = LengthLimits(CharTokenizer(), max_prompt_len=10, max_response_len=6, seq_len=16)
    lines = [
        {"prompt": "x" * 9, "completion": "y" * 6},  # kept: 10 + 6 + EOS = 17 > 16 -> truncated
        {"prompt": "x" * 10, "completion": "y"},  # 11 > max_prompt_len -> dropped
        {"prompt": "x" * 3, "completion": "y" * 7},  # > max_response_len -> truncated
        {"prompt": "x" * 3, "completion": "y" * 6},  # fits
    ]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    records, stats = read_records("demonstrations", str(path), limits=limits)
    assert len(records) == 3
    assert stats.dropped_long_prompts == 1
    assert stats.truncated_responses == 2

    tight = LengthLimits(
        CharTokenizer(), max_prompt_len=20, max_response_len=6, seq_len=12, min_response_len=2
    )
    path.write_text(json.dumps({"prompt": "x" * 9, "completion": "y"}) + "\n")
    with pytest.raises(InputError) as e:
        read_records("demonstrations", str(path), limits=tight)
    assert str(e.value) == (
        f"{path}:1: prompt has 10 tokens with BOS; with at least 2 response token(s) and EOS "
        "it does not fit seq_len=12"
    )
    _, stats = read_records("demonstrations", str(path), limits=tight, skip_invalid=True)
    assert stats.skipped == {"no_room_for_response": 1}


def test_missing_file_and_streaming_stats(tmp_path):
    with pytest.raises(InputError, match=r"nope\.jsonl: file not found"):
        list(iter_records("prompts", [str(tmp_path / "nope.jsonl")]))
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a"}\n{"prompt": "b"}\n')
    stats = rec.LoadStats("prompts")
    assert len(list(iter_records("prompts", [str(path)], stats=stats))) == 2
    assert stats.records == 2
    assert rec.LoadStats.from_dict(stats.to_dict()) == stats
