"""Bring your own data: the built-in experiment on plain JSONL files named on the command line.

experiments/tiny_instructgpt.py says: "drop `world` from `config.stages` and point
`--config.data.<kind>=FILE` (pretrain, demonstrations, comparisons, prompts) and
`--config.tokenizer.input` at files". These tests do exactly that, through the real CLI in a
subprocess, with the `smoke` argument.

The user's files are made once per module: the library writes the synthetic world (smoke
sizes) into a scratch folder, the test copies each record's standard fields only (no
`family`/`params`) into `mydata/` under names that are not the world's, adds a comparisons
file in the standard format (per RM prompt: the gold answer and slipped / off-task answers,
ranked by the gold scorer, equal scores as `ties`; every 10th record in the pairwise
`chosen`/`rejected` form), and deletes the scratch folder, so nothing of the world is left
to be read by accident.

What each test shows:
  tokenizer..ppo_ptx run end to end on the user's files      test_pipeline_runs_on_user_files
    (exit 0, DONE + export of every stage, finite metrics,
    no world/collect/eval folder); every dataset was built
    from exactly the user's file (path and sha256 in its
    tfds metadata, record counts = lines written, logged
    counts, tie pairs), the tokenizer's pieces are those of
    one trained on the user's files, PPO logs no gold score
    (the user's prompts carry no task family)
  every `@world`/`@collect` reference the run stages can      test_overrides_cover_every_world_reference
    reach is one of the documented overrides
  a demonstration without `completion` at line 3: exit 2,    test_malformed_user_file_exits_2_and_damages_nothing
    one line naming the file and line 3, tokenizer,
    pretrain and the tfds folder byte-identical afterwards
"""

from __future__ import annotations

import glob
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import REPO, subprocess_env, tree_digest

EXPERIMENT = os.path.join(REPO, "experiments", "tiny_instructgpt.py")
STAGES = ("tokenizer", "pretrain", "sft", "rm", "ppo", "ppo_ptx")
# The user's files: kind -> a name the world never writes.
FILES = {
    "pretrain": "my_pretrain.jsonl",
    "demonstrations": "my_demos.jsonl",
    "comparisons": "my_rankings.jsonl",
    "prompts": "my_prompts.jsonl",
}
WORLD_REFERENCE = re.compile(r"@(world|collect)/")


def _read_jsonl(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _write_jsonl(path: str, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def ranked_comparisons(prompt_records: list[dict], seed: int) -> list[dict]:
    """Comparisons in the standard format for the world's prompt records: the gold answer,
    one and two labeler slips and another prompt's answer, ranked by the gold scorer (best
    first; equal scores are `ties`). Every 10th record is pairwise (gold vs. a slip)."""
    from instructrl import world

    rng = np.random.default_rng(seed)
    rows = []
    for i, record in enumerate(prompt_records):
        gold = world.gold_answer(record, rng)
        slipped = world.slip(record, gold, rng)
        if i % 10 == 0:
            rows.append({"prompt": record["prompt"], "chosen": world.format_completion(gold),
                         "rejected": world.format_completion(slipped)})  # fmt: skip
            continue
        other = world.gold_answer(world.make_prompt(rng), rng)
        candidates = [gold, slipped, world.slip(record, slipped, rng), other]
        responses = list(dict.fromkeys(world.format_completion(c) for c in candidates))
        scores = [round(world.score(record, r), 9) for r in responses]
        ranking = sorted(range(len(responses)), key=lambda j: -scores[j])
        ties = [
            group
            for s in sorted(set(scores), reverse=True)
            if len(group := [j for j in ranking if scores[j] == s]) > 1
        ]
        row = {"prompt": record["prompt"], "responses": responses, "ranking": ranking}
        if ties:
            row["ties"] = ties
        rows.append(row)
    return rows


def tie_pairs(rows: list[dict]) -> int:
    return sum(len(g) * (len(g) - 1) // 2 for row in rows for g in row.get("ties", ()))


class UserData:
    """The user's folder of files, the module's XLA cache, and how to run the CLI on them."""

    def __init__(self, root: str):
        self.root = root
        self.folder = os.path.join(root, "mydata")
        self.cache = os.path.join(root, "xla_cache")
        self.paths = {kind: os.path.join(self.folder, name) for kind, name in FILES.items()}
        self.lines: dict[str, int] = {}
        self.tie_pairs = 0

    def overrides(self, **paths: str) -> dict[str, str]:
        """The documented bring-your-own-data overrides (config key -> value); `paths`
        (kind -> file) replaces some of the `config.data` files."""
        keys = {f"data.{kind}": paths.get(kind, path) for kind, path in self.paths.items()}
        keys["tokenizer.input"] = f"{self.paths['pretrain']},{self.paths['demonstrations']}"
        return keys

    def run(self, workdir: str, stages, expect: int = 0, timeout: int = 600, **paths: str):
        command = [
            sys.executable, "-m", "instructrl.main", f"--config={EXPERIMENT}:smoke,rounds=1",
            f"--workdir={workdir}", f"--config.stages={','.join(stages)}",
            *(f"--config.{k}={v}" for k, v in self.overrides(**paths).items()),
        ]  # fmt: skip
        env = subprocess_env(
            1,
            JAX_COMPILATION_CACHE_DIR=self.cache,
            JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
            JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1",
        )
        proc = subprocess.run(
            command, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout
        )
        if proc.returncode != expect:
            pytest.fail(
                f"exit {proc.returncode} (expected {expect}):\n{proc.stdout[-3000:]}\n"
                f"{proc.stderr[-8000:]}"
            )
        return proc


@pytest.fixture(scope="module")
def smoke_config():
    from instructrl import config as config_lib

    return config_lib.load_config(f"{EXPERIMENT}:smoke,rounds=1")


@pytest.fixture(scope="module")
def data(tmp_path_factory, smoke_config) -> UserData:
    """The user's own files, made from the world at the experiment's smoke sizes."""
    from instructrl import world

    d = UserData(str(tmp_path_factory.mktemp("byod")))
    scratch = os.path.join(d.root, "scratch")
    w = smoke_config.world
    world = world.write_world(
        scratch, seed=w.seed, **{k: v for k, v in w.items() if k not in ("kind", "seed")}
    )
    os.makedirs(d.folder)
    rows = {
        "pretrain": [{"text": r["text"]} for r in _read_jsonl(world["pretrain"])],
        "demonstrations": [
            {"prompt": r["prompt"], "completion": r["completion"]}
            for r in _read_jsonl(world["demonstrations"])
        ],
        "comparisons": ranked_comparisons(_read_jsonl(world["prompts_rm"]), seed=w.seed),
        "prompts": [{"prompt": r["prompt"]} for r in _read_jsonl(world["prompts_ppo"])],
    }
    for kind, records in rows.items():
        _write_jsonl(d.paths[kind], records)
        d.lines[kind] = len(records)
    d.tie_pairs = tie_pairs(rows["comparisons"])
    shutil.rmtree(scratch)  # nothing of the world is left to be read
    assert sorted(os.listdir(d.folder)) == sorted(FILES.values())
    return d


# ------------------------------------------------------------------ checks of a finished run


def built_datasets(workdir: str) -> dict[str, list[dict]]:
    """kind -> the tfds metadata ({"stats", "inputs"}) of every dataset built in workdir."""
    out: dict[str, list[dict]] = {}
    pattern = os.path.join(workdir, "tfds", "instructrl_records", "*", "*", "metadata.json")
    for path in sorted(glob.glob(pattern)):
        with open(path) as f:
            meta = json.load(f)
        out.setdefault(meta["inputs"]["kind"], []).append(meta)
    return out


def check_metrics(path: str) -> list[dict]:
    rows = _read_jsonl(path)
    assert rows, f"{path} is empty"
    for row in rows:
        for key, value in row.items():
            assert math.isfinite(value), f"{path}: step {row['step']}: {key}={value}"
    return rows


def tokenizer_pieces(path: str) -> list[str]:
    from instructrl.tokenizer import Tokenizer

    tok = Tokenizer.load(path)
    return [tok.id_to_piece(i) for i in range(tok.vocab_size)]


# ------------------------------------------------------------------ tests


def test_overrides_cover_every_world_reference(data, smoke_config):
    """Every `@world/` or `@collect/` path the stages of this run can read is a key the
    bring-your-own-data recipe overrides (a new reference in the experiment fails here)."""
    found = set()

    def walk(tree: dict, prefix: str) -> None:
        for key, value in tree.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            elif isinstance(value, str) and WORLD_REFERENCE.search(value):
                found.add(prefix + key)

    walk({s: smoke_config[s].to_dict() for s in ("data", *STAGES)}, "")
    assert found == set(data.overrides()), found


@pytest.mark.slow
def test_pipeline_runs_on_user_files(data, smoke_config, tmp_path):
    workdir = str(tmp_path / "run")
    proc = data.run(workdir, STAGES)

    # -- every stage finished and exported; no synthetic-world stage ran
    for stage in STAGES:
        assert os.path.exists(os.path.join(workdir, stage, "DONE")), stage
        assert f"stage {stage}: done in" in proc.stderr, stage
    for stage in ("world", "collect", "eval"):
        assert not os.path.exists(os.path.join(workdir, stage)), stage
    assert os.path.isfile(os.path.join(workdir, "tokenizer", "tokenizer.model"))
    for stage in STAGES[1:]:
        assert os.path.isfile(os.path.join(workdir, stage, "export", "model_config.json")), stage
    assert os.path.isfile(os.path.join(workdir, "rm", "export", "reward_normalization.json"))
    metrics = {s: check_metrics(os.path.join(workdir, s, "metrics.jsonl")) for s in STAGES[1:]}
    assert any("val_accuracy" in row for row in metrics["rm"])
    for stage in ("ppo", "ppo_ptx"):
        assert metrics[stage][-1]["step"] == 3  # smoke: 3 iterations
        # Plain prompt records carry no task family: no gold score (the world's would).
        assert not any("gold_score" in row for row in metrics[stage])
    assert all(row["ptx_loss"] > 0 for row in metrics["ppo_ptx"])  # pretraining text used

    # -- each dataset was built from exactly the user's file, every line accounted for
    built = built_datasets(workdir)
    assert sorted(built) == sorted(FILES)
    for kind, metas in built.items():
        assert len(metas) == 1, f"{kind}: {len(metas)} datasets"
        inputs, stats = metas[0]["inputs"], metas[0]["stats"]
        path = data.paths[kind]
        assert inputs["train"] == [[path, _sha256(path)]], kind
        assert inputs["validation"] == []
        assert stats["skipped"] == {}, kind
        accounted = stats["records"] + stats["dropped_long_prompts"] + stats["dropped_all_tied"]
        assert accounted == data.lines[kind], (kind, stats)
        assert stats["records"] >= 0.9 * data.lines[kind], (kind, stats)
        logged = re.findall(
            rf"^.* INFO {kind} \(.*\): (\d+) {kind} records kept", proc.stderr, re.M
        )
        assert logged and {int(n) for n in logged} == {stats["records"]}, (kind, logged)
    cmp_stats = built["comparisons"][0]["stats"]
    assert cmp_stats["tied_pairs_dropped"] == data.tie_pairs > 0
    assert cmp_stats["max_responses"] == 4

    # -- the tokenizer learned its pieces from the user's text (the same training, here)
    from instructrl.tokenizer import Tokenizer

    t = smoke_config.tokenizer
    files = [data.paths["pretrain"], data.paths["demonstrations"]]
    ref = Tokenizer.train(
        files,
        t.vocab_size,
        str(tmp_path / "ref"),
        model_type=t.model_type,
        split_digits=t.split_digits,
    )
    got = os.path.join(workdir, "tokenizer", "tokenizer.model")
    assert tokenizer_pieces(got) == tokenizer_pieces(ref)

    # -- the recorded config names the user's files and no other stage's output
    with open(os.path.join(workdir, "config.json")) as f:
        config = json.load(f)
    for key, value in data.overrides().items():
        section, name = key.split(".")
        assert config[section][name] == value, key
    for section in ("data", *STAGES):
        assert not WORLD_REFERENCE.search(json.dumps(config[section])), section


def test_malformed_user_file_exits_2_and_damages_nothing(data, tmp_path):
    workdir = str(tmp_path / "run")
    data.run(workdir, ("tokenizer", "pretrain"))
    keep = ("tokenizer", "pretrain", "tfds")
    before = {s: tree_digest(os.path.join(workdir, s)) for s in keep}
    assert before["pretrain"] and before["tfds"]

    bad = str(tmp_path / "my_demos_bad.jsonl")
    rows = _read_jsonl(data.paths["demonstrations"])
    del rows[2]["completion"]  # line 3
    _write_jsonl(bad, rows)
    proc = data.run(workdir, ("tokenizer", "pretrain", "sft"), expect=2, demonstrations=bad)

    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    assert errors == [f"error: {bad}:3: missing field 'completion'"], proc.stderr[-3000:]
    assert proc.stderr.rstrip("\n").splitlines()[-1] == errors[0]
    assert "stage tokenizer: finished earlier, skipped" in proc.stderr
    assert "stage pretrain: finished earlier, skipped" in proc.stderr
    assert {s: tree_digest(os.path.join(workdir, s)) for s in keep} == before
    assert not os.path.exists(os.path.join(workdir, "sft", "DONE"))
    assert not os.path.exists(os.path.join(workdir, "sft", "export"))
