"""End-to-end tests of the stage drivers through the real command line.

Every run is `python -m instructrl.main --config=<tiny test config> --workdir=...` in a
subprocess (so kills, exit codes and virtual device counts are real), with a 1-layer,
d_model 32, seq-64 model on tiny data. One module fixture runs world + tokenizer + SFT once;
the other tests reuse its files. Runs share a persistent XLA compilation cache (a per-session
temporary folder), which roughly halves each run's wall time and changes no result: a cached
executable is the very program a fresh compile would produce.

What each test shows (the stage "must show" list of the issue):
  SFT drives the loss down, exports loadable params     test_sft_loss_falls_and_export_loads
  RM reaches > 90% validation accuracy on a rule,       test_rm_learns_ranking_rule
    RewardModel.load().score(), demonstration mean 0;
    finished stages are skipped (DONE), untouched
  same loss trajectory (rtol 1e-4) on 1 device, on an   test_same_trajectory_across_meshes_and_processes
    8-device (2,2,2) mesh and in 2 processes (SFT, RM)
  checkpoint from 8 devices resumes on 1 device and     test_resume_on_other_meshes
    on a (data=4, tensor=2) mesh
  SIGKILL at a random step, re-run -> bit-identical     test_sigkill_then_rerun_is_bit_identical
  SIGTERM -> exit 143 with a checkpoint, re-run ends    test_sigterm_exits_143_and_rerun_completes
  bad key / missing input stage -> one line, exit 2     test_bad_key_and_missing_input_stage_exit_2
  malformed data -> file:line, exit 2, finished         test_malformed_data_exits_2_and_damages_nothing
    stages untouched
  a finished experiment re-runs fast, skipping stages   test_rerun_of_finished_experiment_skips_stages
The RM loss itself is checked against a naive loop in tests/unit/test_losses.py. A kill in the middle
of an async save is forced deterministically in tests/unit/test_checkpoint.py; here the random kill
usually lands in one too (saves every 2 steps), and the re-run must resume from the last
committed step all the same.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.conftest import REPO, free_port, subprocess_env, tree_digest, wait_for_logged_step

CONFIG = '''
"""Tiny config for tests/stages/test_stages.py. `mode=learn` (default): world, tokenizer, SFT that
must learn, RM on a ranking rule. `mode=traj`: full-batch SFT + RM on 16 demonstrations and
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
    config.stages = "world,tokenizer,sft"
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
        config.stages = "sft"
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
    """Paths shared by the tests of this module."""

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


def _finish(proc, timeout=300) -> int:
    try:
        return proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()


def _finish_all(procs, timeout=400) -> list[int | None]:
    """Waits for every process; once one fails (or time runs out) the others are killed, since
    they would wait for it in a collective until jax.distributed gives up (minutes)."""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            codes = [p.poll() for p in procs]
            if all(c is not None for c in codes) or any(c not in (None, 0) for c in codes):
                break
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return codes


def _log_of(workdir) -> str:
    with open(os.path.join(workdir, "..", os.path.basename(workdir) + ".log")) as f:
        return f.read()


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


@pytest.fixture(scope="module")
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


@pytest.fixture(scope="module")
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


@pytest.fixture(scope="module")
def traj_one(env):
    """Reference full-batch run on 1 device: SFT 20 steps then RM 10 steps, log_every=1."""
    workdir = os.path.join(env.root, "traj_1")
    env.run(workdir, "--config.stages=sft,rm", mode="traj")
    return workdir


@pytest.fixture(scope="module")
def traj_eight(env):
    """The same run on 8 virtual devices, mesh data=2, fsdp=2, tensor=2."""
    workdir = os.path.join(env.root, "traj_8")
    env.run(workdir, "--config.stages=sft,rm", "--config.mesh.data=2", "--config.mesh.fsdp=2",
            "--config.mesh.tensor=2", mode="traj", num_devices=8)  # fmt: skip
    return workdir


# ------------------------------------------------------------------ learning


@pytest.mark.slow
def test_sft_loss_falls_and_export_loads(env):
    import jax

    from instructrl.models import ModelConfig, Transformer, positions_from_mask
    from instructrl.tokenizer import Tokenizer

    sft = os.path.join(env.base, "sft")
    logged = metrics(env.base)
    assert [m["step"] for m in logged] == list(range(1, 61))
    first = np.mean([m["loss"] for m in logged[:3]])
    last = np.mean([m["loss"] for m in logged[-5:]])
    assert last < 0.75 * first, (first, last)  # ~6.0 -> ~3.7 for this run
    assert np.isfinite(logged[-1]["val_loss"]) and logged[-1]["val_loss"] < 0.8 * first
    assert os.path.exists(os.path.join(sft, "DONE"))
    with open(os.path.join(sft, "selection.json")) as f:
        assert json.load(f)["exported_step"] == 60  # the only validation point

    from instructrl import checkpoint

    params, model_dict = checkpoint.load_exported(os.path.join(sft, "export"))
    model = Transformer(ModelConfig.from_dict(model_dict))
    tok = Tokenizer.load(os.path.join(env.base, "tokenizer", "tokenizer.model"))
    tokens, mask = tok.encode_batch(["Instruction: Reverse the words: cat dog\nAnswer:"],
                                    max_len=64, add_bos=True)  # fmt: skip
    logits = jax.jit(model.apply)({"params": params}, tokens, positions_from_mask(mask), mask)
    assert logits.shape == (1, 64, 384) and np.isfinite(np.asarray(logits)).all()
    # select_by="val_loss" exports the best validation params: here those of step 60.
    assert_params_equal(
        exported_params(os.path.join(sft, "export")),
        exported_params(os.path.join(sft, "best")),
        "export vs best",
    )


@pytest.mark.slow
def test_rm_learns_ranking_rule(env, tmp_path):
    from instructrl.models.reward import RewardModel
    from instructrl.tokenizer import Tokenizer

    workdir = str(tmp_path / "run")
    shutil.copytree(env.base, workdir)
    before = tree_digest(os.path.join(workdir, "sft"))
    proc = env.run(workdir, "--config.stages=world,tokenizer,sft,rm")
    # Finished stages are skipped (their DONE markers), not re-run.
    for stage in ("world", "tokenizer", "sft"):
        assert f"stage {stage}: finished earlier, skipped" in proc.stderr
    assert tree_digest(os.path.join(workdir, "sft")) == before

    with open(os.path.join(workdir, "rm", "results.json")) as f:
        results = json.load(f)
    assert results["val_accuracy"] > 0.9, results
    assert metrics(workdir, "rm")[-1]["val_accuracy"] == results["val_accuracy"]

    tok = Tokenizer.load(os.path.join(workdir, "tokenizer", "tokenizer.model"))
    rm = RewardModel.load(os.path.join(workdir, "rm", "export"), tok)
    prompt = "Instruction: Praise item 7-7\nAnswer:"
    responses = [" " + " ".join([WORD] * c + FILLER[: 8 - c]) for c in range(0, 9, 2)]
    scores = rm.score([prompt] * len(responses), responses)
    assert scores.shape == (5,) and scores.dtype == np.float32
    assert np.all(np.diff(scores) > 0), scores  # more WORD, higher score

    # "demonstrations" normalisation: the demonstrations it was fitted on score mean 0.
    norm = results["normalization"]
    assert norm["mode"] == "demonstrations" and norm["count"] == 64
    used = _fit_demonstrations(workdir, tok, 64)
    norm_scores = rm.score([d["prompt"] for d in used], [d["completion"] for d in used])
    raw = rm.score([d["prompt"] for d in used], [d["completion"] for d in used], raw=True)
    assert abs(float(np.mean(norm_scores))) < 1e-4 * max(1.0, abs(norm["raw_mean"]))
    np.testing.assert_allclose(np.mean(raw), norm["raw_mean"], rtol=1e-5, atol=1e-5)
    assert np.std(raw) > 1e-3  # not a constant model: the mean-0 claim means something


def _fit_demonstrations(workdir, tok, n) -> list[dict]:
    """The first n records of the built demonstrations train split (what the RM fitted on)."""
    import ml_collections

    from instructrl.data import build_dataset
    from instructrl.stages import inputs

    with open(os.path.join(workdir, "config.json")) as f:
        data = ml_collections.ConfigDict(json.load(f)["data"])
    data = inputs.resolve_data_paths(data, workdir)
    data.tfds_dir = os.path.join(workdir, "tfds")
    built = build_dataset("demonstrations", data, tok)
    source = built.sources["train"]
    return [json.loads(source[i]["record"]) for i in range(n)]


# ------------------------------------------------------------------ scale-out


def _assert_same_trajectory(ref: str, other: str, what: str) -> None:
    for stage, steps in (("sft", 20), ("rm", 10)):
        a, b = metrics(ref, stage), metrics(other, stage)
        assert [m["step"] for m in a] == [m["step"] for m in b] == list(range(1, steps + 1))
        la, lb = [m["loss"] for m in a], [m["loss"] for m in b]
        np.testing.assert_allclose(lb, la, rtol=1e-4, err_msg=f"{what}: {stage} loss")
        if stage == "sft":  # the same target tokens every step: the same rows were fed
            assert [m["weight"] for m in a] == [m["weight"] for m in b], what
    # The trajectories move: equal losses are not an artefact of a frozen model.
    assert losses(ref)[20] < 0.9 * losses(ref)[1]


@pytest.mark.slow
def test_same_trajectory_across_meshes_and_processes(env, traj_one, traj_eight, tmp_path):
    _assert_same_trajectory(traj_one, traj_eight, "8 devices (2,2,2)")

    # Two processes joined by jax.distributed (gloo on 127.0.0.1), 4 devices each, the same
    # (2,2,2) mesh; each process reads its own half of the rows (sharding.data_shard_info).
    workdir = str(tmp_path / "two")
    port = free_port()
    mesh = ("--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.tensor=2")
    procs = []
    for i in range(2):
        join = (f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}")
        procs.append(
            env.start(
                workdir,
                "--config.stages=sft,rm",
                *mesh,
                mode="traj",
                num_devices=4,
                log=str(tmp_path / f"p{i}.log"),
                extra=join,
            )
        )
    codes = _finish_all(procs)
    if codes != [0, 0]:
        logs = [(tmp_path / f"p{i}.log").read_text()[-5000:] for i in range(2)]
        pytest.fail(f"exit codes {codes}:\n" + "\n-----\n".join(logs))
    _assert_same_trajectory(traj_one, workdir, "2 processes")


def _copy_partial_run(src: str, dst: str, keep_step: int) -> None:
    """A copy of a finished SFT run as if it had stopped right after saving `keep_step`."""
    shutil.copytree(src, dst)
    sft = os.path.join(dst, "sft")
    ckpts = os.path.join(sft, "checkpoints")
    assert str(keep_step) in os.listdir(ckpts)
    for name in os.listdir(ckpts):
        if name.isdigit() and int(name) > keep_step:
            shutil.rmtree(os.path.join(ckpts, name))
    for name in ("DONE", "export", "selection.json"):
        path = os.path.join(sft, name)
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    shutil.rmtree(os.path.join(dst, "rm"))


@pytest.mark.slow
@pytest.mark.parametrize(
    "mesh, devices",
    [((1, 1, 1), 1), ((4, 1, 2), 8)],
    ids=["1-device", "data4-tensor2"],
)
def test_resume_on_other_meshes(env, traj_one, traj_eight, tmp_path, mesh, devices):
    """A checkpoint saved on the (2,2,2) 8-device mesh resumes on another mesh: the params
    and optimizer state restore onto the new shardings and the run ends on the same path."""
    workdir = str(tmp_path / "run")
    _copy_partial_run(traj_eight, workdir, keep_step=10)
    data, fsdp, tensor = mesh
    proc = env.run(workdir, "--config.stages=sft", f"--config.mesh.data={data}",
                   f"--config.mesh.fsdp={fsdp}", f"--config.mesh.tensor={tensor}",
                   mode="traj", num_devices=devices)  # fmt: skip
    assert "resumed from step 10" in proc.stderr
    assert os.path.exists(os.path.join(workdir, "sft", "DONE"))
    logged = metrics(workdir)
    assert [m["step"] for m in logged] == list(range(1, 21))  # steps 11.. logged once
    ref = losses(traj_one)
    np.testing.assert_allclose([m["loss"] for m in logged], [ref[s] for s in range(1, 21)],
                               rtol=1e-4)  # fmt: skip
    got = exported_params(os.path.join(workdir, "sft", "export"))
    want = exported_params(os.path.join(traj_one, "sft", "export"))
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-3, atol=1e-4, err_msg=k)


# ------------------------------------------------------------------ kill, preempt, resume


# SFT on the 16 demonstrations in batches of 4 (a new data position every step, so a resume
# that lost its place in the data would train on other rows), a checkpoint every 2 steps.
KILL_ARGS = ("--config.stages=sft", "--config.sft.batch_size=4", "--config.sft.checkpoint_every=2")


@pytest.fixture(scope="module")
def kill_ref(env):
    """The uninterrupted run of the command the kill tests interrupt."""
    workdir = os.path.join(env.root, "kill_ref")
    env.run(workdir, *KILL_ARGS, mode="traj")
    return workdir


def _committed_steps(workdir) -> list[int]:
    ckpts = os.path.join(workdir, "sft", "checkpoints")
    return sorted(int(n) for n in os.listdir(ckpts) if n.isdigit()) if os.path.isdir(ckpts) else []


def _interrupt(env, workdir, sig, at_step: int) -> int:
    """Starts the KILL_ARGS run and sends `sig` once it has logged `at_step`; returns the exit
    code."""
    proc = env.start(workdir, *KILL_ARGS, mode="traj")
    try:
        reached = wait_for_logged_step(proc, workdir, "sft", at_step)
        if reached:
            proc.send_signal(sig)
        code = _finish(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
    if not reached:
        pytest.fail(f"run ended (exit {code}) before step {at_step}:\n{_log_of(workdir)[-5000:]}")
    return code


def _assert_same_as_reference(workdir, ref, what: str) -> None:
    assert [m["step"] for m in metrics(workdir)] == list(range(1, 21)), what
    got, want = losses(workdir), losses(ref)
    moved = [s for s in want if got[s] != want[s]]
    assert not moved, f"{what}: loss differs at steps {moved}"
    assert_params_equal(
        exported_params(os.path.join(workdir, "sft", "export")),
        exported_params(os.path.join(ref, "sft", "export")),
        what,
    )


@pytest.mark.slow
def test_sigkill_then_rerun_is_bit_identical(env, kill_ref, tmp_path):
    workdir = str(tmp_path / "run")
    kill_at = random.Random().randint(1, 15)
    code = _interrupt(env, workdir, signal.SIGKILL, kill_at)
    assert code == -signal.SIGKILL
    assert not os.path.exists(os.path.join(workdir, "sft", "DONE"))
    saved = _committed_steps(workdir)
    ckpts = os.path.join(workdir, "sft", "checkpoints")
    cut = [n for n in os.listdir(ckpts) if "tmp" in n] if os.path.isdir(ckpts) else []
    what = f"killed after step {kill_at}, committed {saved}, cut short {cut}"
    proc = env.run(workdir, *KILL_ARGS, mode="traj")
    if saved:  # the latest committed step, whether or not a later save was cut short
        assert f"resumed from step {saved[-1]}" in proc.stderr, what
    else:
        assert "resumed from step" not in proc.stderr, what
    _assert_same_as_reference(workdir, kill_ref, what)
    leftovers = [n for n in os.listdir(os.path.join(workdir, "sft", "checkpoints")) if "tmp" in n]
    assert not leftovers


@pytest.mark.slow
def test_sigterm_exits_143_and_rerun_completes(env, kill_ref, tmp_path):
    workdir = str(tmp_path / "run")
    stop_at = random.Random().randint(1, 12)
    code = _interrupt(env, workdir, signal.SIGTERM, stop_at)
    log = _log_of(workdir)
    assert code == 143, log[-3000:]
    assert "preempted: stage sft: stopped by signal at step" in log
    stopped = int(log.split("stopped by signal at step ")[1].split(";")[0])
    assert stopped >= stop_at and _committed_steps(workdir)[-1] == stopped
    assert not os.path.exists(os.path.join(workdir, "sft", "DONE"))
    proc = env.run(workdir, *KILL_ARGS, mode="traj")
    assert f"resumed from step {stopped}" in proc.stderr
    assert os.path.exists(os.path.join(workdir, "sft", "DONE"))
    _assert_same_as_reference(workdir, kill_ref, f"SIGTERM at step {stopped}")


# ------------------------------------------------------------------ errors and re-runs


def _one_error_line(proc, starts: str) -> str:
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(starts), proc.stderr[-3000:]
    return errors[0]


def test_bad_key_and_missing_input_stage_exit_2(files, tmp_path):
    # Unknown key: rejected before anything runs or is written.
    workdir = str(tmp_path / "fresh")
    proc = files.run(workdir, "--config.sft.foo=1", expect=2)
    _one_error_line(proc, "error: config key 'sft.foo' does not exist")
    assert not os.path.exists(workdir)

    # An input stage that has not run.
    proc = files.run(workdir, "--config.sft.init_from=pretrain", mode="traj", expect=2)
    line = _one_error_line(
        proc, "error: config key 'sft.init_from': input stage 'pretrain' has not finished"
    )
    assert os.path.join(workdir, "pretrain") in line
    assert not os.path.exists(os.path.join(workdir, "sft"))


@pytest.mark.slow
def test_malformed_data_exits_2_and_damages_nothing(env, tmp_path):
    workdir = str(tmp_path / "run")
    shutil.copytree(env.base, workdir)
    before = {s: tree_digest(os.path.join(workdir, s)) for s in ("world", "tokenizer", "sft")}
    bad = str(tmp_path / "bad.jsonl")
    rows = rule_comparisons(4, seed=3)
    rows[2]["ranking"] = [0] * len(rows[2]["ranking"])  # line 3: not a permutation
    _write_jsonl(bad, rows)
    proc = env.run(workdir, "--config.stages=world,tokenizer,sft,rm",
                   f"--config.data.comparisons={bad}", expect=2)  # fmt: skip
    _one_error_line(proc, f"error: {bad}:3: ranking ")
    after = {s: tree_digest(os.path.join(workdir, s)) for s in ("world", "tokenizer", "sft")}
    assert after == before
    assert not os.path.exists(os.path.join(workdir, "rm", "DONE"))
    assert not os.path.exists(os.path.join(workdir, "rm", "export"))


@pytest.mark.slow
def test_diverging_run_stops_before_saving_between_logging_steps(env, tmp_path):
    """A checkpoint on a step that does not log still checks the step's metrics first. An RM
    at lr 1e30 has param_norm inf after its first Adam step (1e30 per weight overflows the
    squared norm), so with a checkpoint every step but logging every 100 it must stop at step
    1 with exit 3 and no checkpoint at all."""
    workdir = str(tmp_path / "run")
    shutil.copytree(env.base, workdir)
    proc = env.run(workdir, "--config.stages=rm", "--config.rm.optimizer.lr=1e30",
                   "--config.rm.checkpoint_every=1", "--config.rm.log_every=100",
                   "--config.rm.num_steps=8", expect=3)  # fmt: skip
    last = proc.stderr.strip().splitlines()[-1]
    assert re.match(r"error: step 1: \w+ is (nan|inf)", last), proc.stderr[-3000:]
    ckpts = os.path.join(workdir, "rm", "checkpoints")
    assert not os.path.isdir(ckpts) or not [n for n in os.listdir(ckpts) if n.isdigit()]
    for name in ("DONE", "export", "metrics.jsonl"):
        path = os.path.join(workdir, "rm", name)
        assert not os.path.exists(path) or os.path.getsize(path) == 0, name


@pytest.mark.slow
def test_rerun_of_finished_experiment_skips_stages(env, tmp_path):
    workdir = str(tmp_path / "run")
    shutil.copytree(env.base, workdir)
    before = tree_digest(workdir)
    start = time.monotonic()
    proc = env.run(workdir)  # the very command of the fixture's run
    elapsed = time.monotonic() - start
    for stage in ("world", "tokenizer", "sft"):
        assert f"stage {stage}: finished earlier, skipped" in proc.stderr
    assert "starting" not in proc.stderr
    assert tree_digest(workdir) == before  # nothing rewritten, not even config.json
    assert elapsed < 30, elapsed  # imports only (the first run took ~25 s of training)


@pytest.mark.slow
def test_each_stage_keeps_the_config_it_ran_with(env, tmp_path):
    workdir = str(tmp_path / "run")
    shutil.copytree(env.base, workdir)
    with open(os.path.join(workdir, "config.json")) as f:
        ran = f.read()
    for stage in ("world", "tokenizer", "sft"):
        with open(os.path.join(workdir, stage, "config.json")) as f:
            assert f.read() == ran, stage
    # A new stage under a changed config: it records that config; the finished stages keep
    # theirs; the workdir's config.json is the new one, the old one kept beside it.
    env.run(workdir, "--config.stages=world,tokenizer,sft,rm", "--config.rm.num_steps=2")
    with open(os.path.join(workdir, "rm", "config.json")) as f:
        now = json.load(f)
    assert now["rm"]["num_steps"] == 2 and json.loads(ran)["rm"]["num_steps"] == 30
    changed = {k for k in now if now[k] != json.loads(ran)[k]}
    assert changed == {"rm", "stages"}, changed
    with open(os.path.join(workdir, "sft", "config.json")) as f:
        assert f.read() == ran
    assert sorted(os.listdir(os.path.join(workdir, "sft"))) == sorted(os.listdir(
        os.path.join(env.base, "sft")))  # fmt: skip
    with open(os.path.join(workdir, "config.json")) as f:
        assert json.load(f) == now
    kept = [n for n in os.listdir(workdir) if n.startswith("config.") and n != "config.json"]
    assert len(kept) == 1
    with open(os.path.join(workdir, kept[0])) as f:
        assert f.read() == ran
