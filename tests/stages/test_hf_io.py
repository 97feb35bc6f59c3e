"""The import_hf / convert_data / export_hf stages (instructrl/stages/hf_io.py) on their own:
what convert_data writes, and one-line errors naming the config key or file. The whole
round trip through a checkpoint is tests/e2e/test_hf_model.py."""

import json

import ml_collections
import pytest

from instructrl.errors import ConfigError, InputError
from instructrl.stages import hf_io


def _config(**sections) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict({"stages": list(sections)})
    for name, (kind, values) in sections.items():
        config[name] = hf_io.default_config(kind)
        config[name].update(values)
    return config


def test_convert_data_writes_our_records(tmp_path):
    alpaca = [{"instruction": "Say hi.", "input": "", "output": "Hi!"}]
    hh = {"chosen": "\n\nHuman: a?\n\nAssistant: yes", "rejected": "\n\nHuman: a?\n\nAssistant: no"}
    (tmp_path / "alpaca.json").write_text(json.dumps(alpaca))
    (tmp_path / "hh.jsonl").write_text(json.dumps(hh) + "\n")
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "Tell me.", "id": 7}\n')
    config = _config(
        data=("convert_data", dict(demonstrations=str(tmp_path / "alpaca.json"),
                                   comparisons=str(tmp_path / "hh.jsonl"),
                                   prompts=str(tmp_path / "prompts.jsonl"))),
    )  # fmt: skip
    hf_io.run(config, "data", str(tmp_path / "run"))
    out = tmp_path / "run" / "data"
    read = lambda name: [json.loads(x) for x in (out / name).read_text().splitlines()]  # noqa: E731
    assert read("demonstrations.jsonl") == [
        {"prompt": "\n\nHuman: Say hi.\n\nAssistant:", "completion": " Hi!"}
    ]
    assert read("comparisons.jsonl") == [
        {"prompt": "\n\nHuman: a?\n\nAssistant:", "chosen": " yes", "rejected": " no"}
    ]
    assert read("prompts.jsonl") == [{"prompt": "Tell me.", "id": 7}]


def test_errors_name_the_key_or_file(tmp_path):
    workdir = str(tmp_path / "run")
    with pytest.raises(ConfigError, match=r"'imp\.hf_dir' is empty"):
        hf_io.run(_config(imp=("import_hf", {})), "imp", workdir)
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text('{"model_type": "qwen3"}')
    with pytest.raises(InputError, match=r"ckpt: no tokenizer\.model or tokenizer\.json"):
        hf_io.run(_config(imp=("import_hf", dict(hf_dir=str(tmp_path / "ckpt")))), "imp", workdir)
    missing = str(tmp_path / "nope.json")
    with pytest.raises(ConfigError, match=r"'data\.demonstrations': .*nope\.json not found"):
        hf_io.run(_config(data=("convert_data", dict(demonstrations=missing))), "data", workdir)
    config = _config(out=("export_hf", dict(export_from="ppo_ptx")))
    config.ppo_ptx = ml_collections.ConfigDict({"kind": "ppo"})
    with pytest.raises(InputError, match=r"'out\.export_from': input stage 'ppo_ptx' has not"):
        hf_io.run(config, "out", workdir)
    with pytest.raises(ValueError, match="kind='nope'"):
        hf_io.default_config("nope")
