"""The stage drivers through the real command line: kill, preempt, resume; errors and re-runs.

The runs, the tiny config and the shared base run (fixture `env`) are in conftest.py here.

What each test shows (the stage "must show" list of the issue):
  SIGKILL at a random step, re-run -> bit-identical     test_sigkill_then_rerun_is_bit_identical
  SIGTERM -> exit 143 with a checkpoint, re-run ends    test_sigterm_exits_143_and_rerun_completes
  SIGKILL, newest checkpoint damaged, re-run ->         test_sigkill_then_corrupt_newest_checkpoint_resumes_from_the_older_bit_identically
    resumes from the older one, bit-identical
  bad key / missing input stage -> one line, exit 2     test_bad_key_and_missing_input_stage_exit_2
  malformed data -> file:line, exit 2, finished         test_malformed_data_exits_2_and_damages_nothing
    stages untouched
  a finished experiment re-runs fast, skipping stages   test_rerun_of_finished_experiment_skips_stages
A kill in the middle of an async save is forced deterministically in
tests/stages/test_checkpoint_resume.py; here the random kill usually lands in one too (saves
every 2 steps), and the re-run must resume from the last committed step all the same.
Learning and scale-out: test_stages_learning.py.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import time

import pytest

from tests.conftest import tree_digest, wait_for_logged_step
from tests.stages.conftest import (
    _write_jsonl,
    assert_params_equal,
    exported_params,
    losses,
    metrics,
    rule_comparisons,
)
from tests.stages.test_faults import _corrupt


def _finish(proc, timeout=300) -> int:
    try:
        return proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()


def _log_of(workdir) -> str:
    with open(os.path.join(workdir, "..", os.path.basename(workdir) + ".log")) as f:
        return f.read()


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


@pytest.mark.slow
@pytest.mark.parametrize("how", ["truncated", "metadata"])
def test_sigkill_then_corrupt_newest_checkpoint_resumes_from_the_older_bit_identically(
    env, kill_ref, tmp_path, how
):
    """A SIGKILL once two checkpoints are committed, then the newest one damaged (its array
    files cut short, or its _METADATA garbled): the re-run names the step it skips and why,
    resumes from the older one, and ends bit-identical to the uninterrupted run."""
    workdir = str(tmp_path / "run")
    kill_at = random.Random().randint(4, 15)
    proc = env.start(workdir, *KILL_ARGS, mode="traj")
    try:
        reached = wait_for_logged_step(
            proc, workdir, "sft", kill_at, also=lambda: len(_committed_steps(workdir)) >= 2
        )
        if reached:
            proc.send_signal(signal.SIGKILL)
        code = _finish(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
    if not reached:
        pytest.fail(f"run ended (exit {code}) before step {kill_at}:\n{_log_of(workdir)[-5000:]}")
    assert code == -signal.SIGKILL
    *_, older, newest = _committed_steps(workdir)
    ckpts = os.path.join(workdir, "sft", "checkpoints")
    _corrupt(os.path.join(ckpts, str(newest)), how)
    kept = tree_digest(os.path.join(ckpts, str(newest)))
    proc = env.run(workdir, *KILL_ARGS, mode="traj")
    what = f"killed after step {kill_at}, step {newest} {how}, step {older} intact"
    assert f"{ckpts}/{newest}: cannot be read (" in proc.stderr, what
    assert f"resumed from step {older}" in proc.stderr, what
    assert tree_digest(os.path.join(workdir, "sft", "unreadable_checkpoints", str(newest))) == kept
    _assert_same_as_reference(workdir, kill_ref, what)


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
