"""Tests for instructrl/data/convert.py: each public schema, round trips, errors, the command."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys

import pytest

from instructrl.data.convert import (
    alpaca_record,
    convert,
    convert_records,
    hh_rlhf_record,
    main,
    tldr_record,
)
from instructrl.data.records import read_records
from instructrl.errors import InputError
from tests.conftest import REPO, subprocess_env

HH_SINGLE = {
    "chosen": "\n\nHuman: What is 2+2?\n\nAssistant: It is 4.",
    "rejected": "\n\nHuman: What is 2+2?\n\nAssistant: Probably 5.",
}
HH_MULTI = {
    "chosen": (
        "\n\nHuman: Hi, can you help me bake bread?\n\nAssistant: Sure! What kind?"
        "\n\nHuman: Sourdough, please — with a Dutch oven.\n\nAssistant: Start with an active "
        "starter.\n\nMix 500 g flour with 350 g water."
    ),
    "rejected": (
        "\n\nHuman: Hi, can you help me bake bread?\n\nAssistant: Sure! What kind?"
        "\n\nHuman: Sourdough, please — with a Dutch oven.\n\nAssistant: Buy bread instead."
    ),
}
TLDR_POST = {
    "info": {
        "id": "t3_abc",
        "post": "I adopted a cat and it keeps knocking things over. What do I do?",
        "title": "Cat chaos",
        "subreddit": "cats",
    },
    "split": "train",
    "summaries": [
        {"text": " new cat knocks things over, need advice", "policy": "sup2", "note": None},
        {"text": " cat", "policy": "ref", "note": None},
    ],
    "choice": 0,
    "worker": "w1",
    "batch": "batch3",
}
TLDR_ARTICLE = {
    "info": {"id": "cnn_1", "article": "The city opened a new park on Monday.", "title": None},
    "summaries": [{"text": " A park."}, {"text": " New park opened Monday."}],
    "choice": 1,
}
ALPACA = [
    {"instruction": "Give three tips for staying healthy.", "input": "", "output": "1. Eat well."},
    {"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour"},
]


def test_hh_rlhf_single_and_multi_turn_round_trip():
    for obj in (HH_SINGLE, HH_MULTI):
        r = hh_rlhf_record(obj)
        assert r["prompt"] + r["chosen"] == obj["chosen"]
        assert r["prompt"] + r["rejected"] == obj["rejected"]
        assert r["prompt"].endswith("\n\nAssistant:")
    multi = hh_rlhf_record(HH_MULTI)
    # The shared prompt holds every earlier turn, the response only the last assistant turn.
    assert multi["prompt"].count("\n\nHuman:") == 2 and multi["prompt"].count("\n\nAssistant:") == 2
    assert multi["chosen"] == " Start with an active starter.\n\nMix 500 g flour with 350 g water."
    assert multi["rejected"] == " Buy bread instead."


def test_tldr_post_and_article():
    r = tldr_record(TLDR_POST)
    assert r["prompt"] == (
        "SUBREDDIT: r/cats\nTITLE: Cat chaos\n"
        "POST: I adopted a cat and it keeps knocking things over. What do I do?\nTL;DR:"
    )
    assert r["responses"] == [" new cat knocks things over, need advice", " cat"]
    assert r["ranking"] == [0, 1]
    r = tldr_record(TLDR_ARTICLE)
    assert r["prompt"] == "ARTICLE: The city opened a new park on Monday.\nTL;DR:"
    assert r["ranking"] == [1, 0]


def test_alpaca_with_and_without_input():
    a, b = (alpaca_record(x) for x in ALPACA)
    assert a == {
        "prompt": "\n\nHuman: Give three tips for staying healthy.\n\nAssistant:",
        "completion": " 1. Eat well.",
    }
    assert b["prompt"] == "\n\nHuman: Translate to French.\n\nGood morning\n\nAssistant:"
    assert alpaca_record({"instruction": "Say hi.", "output": "Hi"})["completion"] == " Hi"


def test_files_convert_and_load_back(tmp_path):
    hh = tmp_path / "hh.jsonl.gz"
    hh.write_bytes(
        gzip.compress("".join(json.dumps(x) + "\n" for x in (HH_SINGLE, HH_MULTI)).encode())
    )
    tl = tmp_path / "batch1.json"
    tl.write_text("".join(json.dumps(x) + "\n" for x in (TLDR_POST, TLDR_ARTICLE)))
    al = tmp_path / "alpaca_data.json"
    al.write_text(json.dumps(ALPACA, indent=2, ensure_ascii=False))
    for fmt, src, kind, expected in [
        ("hh_rlhf", hh, "comparisons", [hh_rlhf_record(HH_SINGLE), hh_rlhf_record(HH_MULTI)]),
        (
            "tldr",
            str(tmp_path / "batch*.json"),
            "comparisons",
            [tldr_record(TLDR_POST), tldr_record(TLDR_ARTICLE)],
        ),
        ("alpaca", al, "demonstrations", [alpaca_record(x) for x in ALPACA]),
    ]:
        out = tmp_path / f"{fmt}.jsonl"
        stats = convert(fmt, str(src), str(out))
        assert stats.records == 2
        assert [json.loads(line) for line in out.read_text().splitlines()] == expected
        records, _ = read_records(kind, str(out))
        assert len(records) == 2


def test_bad_input_names_file_and_line_and_skip_invalid_counts(tmp_path):
    bad = dict(HH_SINGLE, rejected="no assistant turn here")
    src = tmp_path / "hh.jsonl"
    src.write_text(json.dumps(HH_SINGLE) + "\n" + json.dumps(bad) + "\n{oops\n")
    with pytest.raises(InputError, match=r"hh\.jsonl:2: rejected has no '\\n\\nAssistant:' turn$"):
        convert_records("hh_rlhf", str(src))
    records, stats = convert_records("hh_rlhf", str(src), skip_invalid=True)
    assert len(records) == 1
    assert stats.skipped == {"missing_field": 1, "invalid_json": 1}
    same = dict(HH_SINGLE, rejected=HH_SINGLE["chosen"])
    src.write_text(json.dumps(same) + "\n")
    with pytest.raises(InputError, match=r"hh\.jsonl:1: responses 0 and 1 are identical"):
        convert_records("hh_rlhf", str(src))
    src.write_text(json.dumps(dict(TLDR_POST, choice=2)) + "\n")
    with pytest.raises(InputError, match=r":1: choice 2 is not an index into the 2 summaries"):
        convert_records("tldr", str(src))
    arr = tmp_path / "a.json"
    arr.write_text(json.dumps([ALPACA[0], {"instruction": "x"}]))
    with pytest.raises(InputError, match=r"a\.json: item 1: missing field 'output'"):
        convert_records("alpaca", str(arr))
    out = tmp_path / "kept.jsonl"
    out.write_text("old\n")
    assert main(["--format=alpaca", f"--input={arr}", f"--out={out}"]) == 2
    assert out.read_text() == "old\n"  # a failed run leaves existing output alone


def test_command_line(tmp_path, capsys):
    src = tmp_path / "hh.jsonl"
    src.write_text(json.dumps(HH_MULTI) + "\n")
    out = tmp_path / "out" / "cmp.jsonl"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "instructrl.data.convert",
            "--format=hh_rlhf",
            f"--input={src}",
            f"--out={out}",
        ],
        cwd=REPO,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "wrote 1 comparisons" in proc.stdout
    assert json.loads(out.read_text()) == hh_rlhf_record(HH_MULTI)
    assert main(["--format=tldr", f"--input={src}", f"--out={out}"]) == 2
    assert capsys.readouterr().err.strip() == f"error: {src}:1: missing field 'info'"
