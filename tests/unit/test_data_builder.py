"""Tests for instructrl/data/builder.py: array_record datasets via TFDS without TensorFlow,
reuse, rebuild on change, splits, errors."""

from __future__ import annotations

import json
import os
import sys
import tempfile

import pytest

from instructrl.data import builder as builder_lib
from instructrl.data.builder import build_dataset, in_validation, resolve_files
from instructrl.data.config import default_data_config
from instructrl.data.pipeline import sft_pipeline
from instructrl.errors import ConfigError, InputError
from instructrl.world import synthetic


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return synthetic.train_tokenizer(str(tmp_path_factory.mktemp("tok")), lines=300)


def _config(tmp_path, **kw):
    c = default_data_config()
    c.dir = str(tmp_path / "data")
    c.tfds_dir = str(tmp_path / "tfds")
    c.seq_len, c.max_prompt_len, c.max_response_len = 256, 128, 128
    c.validation_fraction = 0.25
    c.update(kw)
    return c


def _records(source):
    return [json.loads(source[i]["record"]) for i in range(len(source))]


def test_build_reuse_and_rebuild_on_change(tmp_path, tok, monkeypatch):
    recs = synthetic.synthetic_records(
        "demonstrations", 40, prompt_words=(2, 6), response_words=(2, 8)
    )
    src = synthetic.write_jsonl(str(tmp_path / "data" / "demonstrations.jsonl"), recs)
    c = _config(tmp_path)
    first = build_dataset("demonstrations", c, tok)
    assert "tensorflow" not in sys.modules
    assert os.path.basename(os.path.dirname(first.path)).startswith("demonstrations-")
    files = sorted(f for f in os.listdir(first.path) if ".array_record" in f)
    assert files == [
        "instructrl_records-train.array_record-00000-of-00001",
        "instructrl_records-validation.array_record-00000-of-00001",
    ]
    train, val = _records(first.sources["train"]), _records(first.sources["validation"])
    assert first.stats.splits == {"train": len(train), "validation": len(val)}
    # File order is kept and the hash split is what in_validation says.
    assert [r for r in recs if not in_validation(r["prompt"], 0.25)] == train
    assert [r for r in recs if in_validation(r["prompt"], 0.25)] == val
    assert 0 < len(val) < 20

    mtime = os.path.getmtime(os.path.join(first.path, files[0]))

    def no_staging(*a, **k):
        raise AssertionError("dataset was rebuilt")

    monkeypatch.setattr(builder_lib, "_stage", no_staging)
    again = build_dataset("demonstrations", c, tok)
    assert again.path == first.path
    assert again.stats == first.stats
    assert os.path.getmtime(os.path.join(first.path, files[0])) == mtime
    monkeypatch.undo()

    synthetic.write_jsonl(src, [*recs, {"prompt": "a new prompt", "completion": " new"}])
    changed = build_dataset("demonstrations", c, tok)
    assert changed.path != first.path
    assert os.path.isdir(first.path)  # the old build is left alone
    assert sum(changed.stats.splits.values()) == 41
    # A changed option is a different dataset too.
    assert build_dataset("demonstrations", _config(tmp_path, seq_len=200), tok).path != changed.path


def test_validation_files_dir_layout_and_txt(tmp_path, tok):
    d = tmp_path / "data"
    synthetic.write_jsonl(
        str(d / "prompts.jsonl"), synthetic.synthetic_records("prompts", 6, prompt_words=(2, 6))
    )
    synthetic.write_jsonl(str(d / "prompts_validation.jsonl"), [{"prompt": "held out", "id": "v"}])
    (d / "pretrain").mkdir(parents=True)
    (d / "pretrain" / "a.txt").write_text("first document\nline two\n")
    synthetic.write_jsonl(str(d / "pretrain" / "b.jsonl"), [{"text": "second"}, {"text": "third"}])
    c = _config(tmp_path, validation_fraction=0.0)
    train, val = resolve_files("prompts", c)
    assert (train, val) == ([str(d / "prompts.jsonl")], [str(d / "prompts_validation.jsonl")])
    built = build_dataset("prompts", c, tok)
    assert _records(built.sources["validation"]) == [{"prompt": "held out", "id": "v"}]
    assert len(built.sources["train"]) == 6

    pre = build_dataset("pretrain", c)
    assert set(pre.sources) == {"train"}  # fraction 0 and no validation files: no split
    assert _records(pre.sources["train"]) == [
        {"text": "first document\nline two\n"},
        {"text": "second"},
        {"text": "third"},
    ]
    with pytest.raises(ConfigError, match=r"data.pretrain: no 'validation' split"):
        sft_pipeline(pre, tok, c, batch_size=2, split="validation")


def test_errors_name_the_file_line_or_key(tmp_path, tok):
    c = _config(tmp_path)
    with pytest.raises(ConfigError, match=r"config key 'data.comparisons': no files"):
        build_dataset("comparisons", c, tok)
    c.comparisons = str(tmp_path / "missing*.jsonl")
    with pytest.raises(
        ConfigError, match=r"config key 'data.comparisons': .*missing\*\.jsonl not found"
    ):
        build_dataset("comparisons", c, tok)
    path = tmp_path / "cmp.jsonl"
    good = {"prompt": "p", "responses": ["a", "b"], "ranking": [0, 1]}
    path.write_text(json.dumps(good) + "\n" + json.dumps(dict(good, ranking=[1, 1])) + "\n")
    c.comparisons = str(path)
    with pytest.raises(
        InputError, match=r"cmp\.jsonl:2: ranking \[1, 1\] is not a permutation of 0\.\.1$"
    ):
        build_dataset("comparisons", c, tok)
    prepared = [p for p in (tmp_path / "tfds").rglob("dataset_info.json")]
    assert prepared == []  # nothing half-built was left behind
    assert not [p for p in (tmp_path / "tfds").iterdir() if p.name.startswith(".staging")]

    c.skip_invalid = True
    c.validation_fraction = 0.0
    built = build_dataset("comparisons", c, tok)
    assert built.stats.skipped == {"bad_ranking": 1}
    assert build_dataset("comparisons", c, tok).stats.skipped == {"bad_ranking": 1}  # from metadata
    assert built.stats.max_responses == 2

    path.write_text(json.dumps(dict(good, ranking=[1, 1])) + "\n")
    with pytest.raises(InputError, match=r"no comparisons records left for training"):
        build_dataset("comparisons", c, tok)
    c.tfds_dir = ""
    with pytest.raises(ConfigError, match=r"data.tfds_dir"):
        build_dataset("comparisons", c, tok)


def test_length_policy_counts_are_stored(tmp_path, tok):
    long_prompt = " ".join(["word"] * 200)
    recs = [
        {"prompt": "short", "completion": " fine"},
        {"prompt": long_prompt, "completion": " dropped"},
        {"prompt": "short two", "completion": " " + " ".join(["long"] * 200)},
    ]
    synthetic.write_jsonl(str(tmp_path / "data" / "demonstrations.jsonl"), recs)
    c = _config(
        tmp_path, validation_fraction=0.0, max_prompt_len=64, max_response_len=32, seq_len=128
    )
    built = build_dataset("demonstrations", c, tok)
    assert built.stats.dropped_long_prompts == 1
    assert built.stats.truncated_responses == 1
    assert [r["prompt"] for r in _records(built.sources["train"])] == ["short", "short two"]


def test_build_leaves_nothing_in_the_temp_dir(tmp_path, tok, monkeypatch):
    # tfds's DatasetInfo.initialize_from_bucket makes an empty mkdtemp("tfds") folder for every
    # builder of an unprepared dataset and never removes it: two per build, thousands per week.
    temp = tmp_path / "temp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    recs = synthetic.synthetic_records("prompts", 12, prompt_words=(2, 6))
    synthetic.write_jsonl(str(tmp_path / "data" / "prompts.jsonl"), recs)
    built = build_dataset("prompts", _config(tmp_path), tok)
    assert sum(built.stats.splits.values()) == 12
    assert build_dataset("prompts", _config(tmp_path), tok).path == built.path  # reused
    assert sorted(os.listdir(temp)) == []


def test_build_logs_one_line_per_dataset_and_no_tfds_chatter(tmp_path, tok, caplog, capfd):
    """A build and a reuse each log one line naming the dataset (and "reused" the second
    time); tfds's custom-config / variant-folder warnings, its progress bars and banner do
    not reach the log or the terminal."""
    recs = synthetic.synthetic_records("demonstrations", 40, prompt_words=(2, 6))
    synthetic.write_jsonl(str(tmp_path / "data" / "demonstrations.jsonl"), recs)
    config = _config(tmp_path)
    with caplog.at_level("INFO"):
        first = build_dataset("demonstrations", config, tok)
        second = build_dataset("demonstrations", config, tok)
    lines = [r.getMessage() for r in caplog.records]
    kept = [m for m in lines if "demonstrations records kept" in m]
    assert len(kept) == 2 and first.path == second.path
    assert "reused" not in kept[0] and kept[1].startswith(f"demonstrations ({first.path}, reused)")
    noise = ("Using custom data configuration", "Variant folder", "Downloading and preparing")
    assert not [m for m in lines if m.startswith(noise)], lines
    out, err = capfd.readouterr()
    assert out == "" and "examples/s" not in err and "Generating" not in err, (out, err)
