"""Shared by the stage-driver tests through the real command line (test_stages_learning.py,
test_stages_restarts.py).

Every run is `python -m instructrl.main --config=<tiny test config> --workdir=...` in a
subprocess (so kills, exit codes and virtual device counts are real), with a 1-layer,
d_model 32, seq-64 model on tiny data. One fixture (`env`) runs world + tokenizer + SFT once;
the tests reuse its files. Runs share a persistent XLA compilation cache (a per-session
temporary folder), which roughly halves each run's wall time and changes no result: a cached
executable is the very program a fresh compile would produce. `files` and `env` are
session-scoped so that the two test modules share the one base run.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import REPO, subprocess_env

CONFIG = '''
"""Tiny config for tests/stages/test_stages_*.py. `mode=learn` (default): world, tokenizer, SFT
that must learn, RM on a ranking rule. `mode=traj`: full-batch SFT + RM on 16 demonstrations and
8 comparisons, unpacked, so every step sees the same rows on any mesh or process count."""

import ml_collections

from instructrl import config as config_lib
from instructrl.data import default_data_config
from instructrl.stages import pretrain, reward, sft, tokenizer, world

DATA = {data!r}
BASE = {base!r}


def get_config(arg=None):
    arg = config_lib.parse_arg(arg, mode="learn")
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.stages = ["world", "tokenizer", "sft"]
    config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    # GPT-2 style; heads, d_ff and vocab divide by tensor=2.
    config.model = ml_collections.ConfigDict(dict(
        vocab_size=384, max_len=64, num_layers=1, d_model=32, num_heads=2, d_ff=128,
        position="learned", norm="layernorm", mlp="gelu", dropout=0.0, remat=False))
    config.data = default_data_config()
    config.data.update(
        pretrain="@world/pretrain.jsonl", demonstrations="@world/demonstrations.jsonl",
        comparisons=DATA + "/cmp.jsonl", comparisons_validation=DATA + "/cmp_val.jsonl",
        seq_len=64, max_prompt_len=32, max_response_len=30, num_threads=1)
    config.world = world.default_config()
    config.world.update(num_pretrain=100, num_pretrain_heldout=10, num_demonstrations=500,
                        num_rm=10, num_ppo=10, num_eval=10, num_public=40)
    config.tokenizer = tokenizer.default_config()
    # byte_fallback needs ~320 pieces for bytes and characters: 384 is the smallest round size.
    config.tokenizer.update(vocab_size=384, input="@world/demonstrations.jsonl")
    config.pretrain = pretrain.default_config()  # not run: the missing-input test names it
    config.sft = sft.default_config()
    config.sft.update(init_from="", batch_size=8, num_steps=60, dropout=0.0,
                      select_by="val_loss", log_every=1, checkpoint_every=30)
    config.sft.optimizer.update(lr=3e-3)
    config.rm = reward.default_config()
    config.rm.update(init_from="sft", batch_size=16, num_steps=30, log_every=5,
                     normalize_num=64)
    config.rm.optimizer.update(lr=1e-3)
    if arg.mode == "traj":
        tok = BASE + "/tokenizer/tokenizer.model"
        config.stages = ["sft"]
        config.data.update(demonstrations=DATA + "/demos16.jsonl", comparisons=DATA + "/cmp8.jsonl",
                           comparisons_validation="", validation_fraction=0.0, pack=False)
        config.sft.update(tokenizer_from=tok, batch_size=16, num_steps=20, select_by="last",
                          checkpoint_every=10, max_to_keep=2)
        config.rm.update(tokenizer_from=tok, batch_size=8, num_steps=10, log_every=1,
                         normalize_num=16)
    return config
'''

FILLER = ["cat", "dog", "sun", "red", "cow", "map", "pig", "bell", "cake", "frog"]
WORD = "good"  # the ranking rule: more occurrences of WORD rank higher


def rule_comparisons(n: int, seed: int, length: int = 8) -> list[dict]:
    """Comparisons ranked by the number of WORD among `length` words; K in 2..9, no ties."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        k = rng.randint(2, 9)
        counts = rng.sample(range(length + 1), k)
        responses = []
        for c in counts:
            words = [WORD] * c + [rng.choice(FILLER) for _ in range(length - c)]
            rng.shuffle(words)
            responses.append(" " + " ".join(words))
        ranking = sorted(range(k), key=lambda j: -counts[j])
        out.append({"prompt": f"Instruction: Praise item {seed}-{i}\nAnswer:",
                    "responses": responses, "ranking": ranking})  # fmt: skip
    return out


def _write_jsonl(path, rows) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def _read_jsonl(path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# ------------------------------------------------------------------ running the CLI


class Env:
    """Paths shared by the tests of test_stages_learning.py and test_stages_restarts.py."""

    def __init__(self, root):
        self.root = str(root)
        self.data = os.path.join(self.root, "data")
        self.base = os.path.join(self.root, "base")
        self.config = os.path.join(self.root, "test_config.py")
        self.cache = os.path.join(self.root, "xla_cache")

    def env(self, num_devices: int = 1) -> dict[str, str]:
        return subprocess_env(
            num_devices,
            JAX_COMPILATION_CACHE_DIR=self.cache,
            JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
            JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1",
        )

    def command(self, workdir, *overrides, mode: str = "learn") -> list[str]:
        return [sys.executable, "-m", "instructrl.main", f"--config={self.config}:mode={mode}",
                f"--workdir={workdir}", *overrides]  # fmt: skip

    def run(self, workdir, *overrides, mode="learn", num_devices=1, expect=0, timeout=300):
        proc = subprocess.run(
            self.command(workdir, *overrides, mode=mode),
            env=self.env(num_devices),
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if proc.returncode != expect:
            pytest.fail(
                f"exit {proc.returncode} (expected {expect}):\n{proc.stdout[-3000:]}\n"
                f"{proc.stderr[-8000:]}"
            )
        return proc

    def start(self, workdir, *overrides, mode="learn", num_devices=1, log=None, extra=()):
        os.makedirs(workdir, exist_ok=True)
        log = open(log or os.path.join(workdir, "..", os.path.basename(workdir) + ".log"), "w")  # noqa: SIM115
        return subprocess.Popen(
            [*self.command(workdir, *overrides, mode=mode), *extra],
            env=self.env(num_devices),
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def metrics(workdir, stage: str = "sft") -> list[dict]:
    return _read_jsonl(os.path.join(workdir, stage, "metrics.jsonl"))


def losses(workdir, stage: str = "sft") -> dict[int, float]:
    return {m["step"]: m["loss"] for m in metrics(workdir, stage) if "loss" in m}


def exported_params(export_dir) -> dict[str, np.ndarray]:
    """Exported params as numpy arrays keyed by their path (CPU, one device)."""
    import jax

    from instructrl import checkpoint

    params, _ = checkpoint.load_exported(export_dir)
    flat = jax.tree_util.tree_flatten_with_path(jax.device_get(params))[0]
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in flat}


def assert_params_equal(a, b, what: str) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype == np.float32, k
        assert np.array_equal(a[k], b[k]), f"{what}: {k} differs"


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="session")
def files(tmp_path_factory):
    """The config file and the comparison files (no run yet)."""
    e = Env(tmp_path_factory.mktemp("stages"))
    os.makedirs(e.data)
    _write_jsonl(os.path.join(e.data, "cmp.jsonl"), rule_comparisons(400, seed=0))
    _write_jsonl(os.path.join(e.data, "cmp_val.jsonl"), rule_comparisons(60, seed=1))
    _write_jsonl(os.path.join(e.data, "cmp8.jsonl"), rule_comparisons(8, seed=2))
    with open(e.config, "w") as f:
        f.write(CONFIG.format(data=e.data, base=e.base))
    return e


@pytest.fixture(scope="session")
def env(files):
    """`files` plus the shared world + tokenizer + SFT run in `env.base`, and demos16.jsonl."""
    e = files
    e.run(e.base)  # world, tokenizer, sft (60 steps)
    # 16 demonstrations that the data builder keeps (prompt within max_prompt_len).
    from instructrl.tokenizer import Tokenizer

    tok = Tokenizer.load(os.path.join(e.base, "tokenizer", "tokenizer.model"))
    demos = _read_jsonl(os.path.join(e.base, "world", "demonstrations.jsonl"))
    short = [d for d in demos if len(tok.encode(d["prompt"])) + 1 <= 32][:16]
    assert len(short) == 16
    _write_jsonl(os.path.join(e.data, "demos16.jsonl"), short)
    return e


@pytest.fixture(scope="session")
def ppo_base(tmp_path_factory):
    """test_ppo.py's config and pre-PPO stages (world ... rm), run once per session for
    test_ppo.py and test_algorithms.py (made_once: shared across xdist workers)."""
    from tests.stages.test_ppo import make_env

    return make_env(tmp_path_factory)
