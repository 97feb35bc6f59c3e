"""The main entry point (`python -m instructrl.main`): its one-line errors and a relative workdir."""

import os
import subprocess
import sys

from tests.conftest import REPO, subprocess_env


def _main(*args, cwd=REPO):
    return subprocess.run(
        [sys.executable, "-m", "instructrl.main", *args],
        cwd=cwd,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_main_rejects_unknown_key_with_one_line_and_status_2(tmp_path):
    proc = _main(
        "--config=experiments/tiny_instructgpt.py:smoke",
        f"--workdir={tmp_path}",
        "--config.model.d_modell=3",
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: config key 'model.d_modell' does not exist"
        + proc.stderr.strip().split("does not exist", 1)[1]
    ]
    assert "model.d_modell" in proc.stderr
    assert not os.path.exists(tmp_path / "config.json")


def test_main_rejects_missing_config_file_and_stray_flags(tmp_path):
    proc = _main("--config=experiments/nope.py", f"--workdir={tmp_path}")
    assert proc.returncode == 2 and "experiments/nope.py: config file not found" in proc.stderr
    proc = _main(
        "--config=experiments/tiny_instructgpt.py:smoke", f"--workdir={tmp_path}", "--lr=3"
    )
    assert proc.returncode == 2 and "unknown flag '--lr=3'" in proc.stderr


def test_relative_workdir_checkpoints_and_resumes(tmp_path):
    """`make demo` passes --workdir=runs/demo: a relative folder must hold orbax
    checkpoints (tensorstore wants absolute paths) and be found again on resume."""
    experiment = os.path.join(REPO, "experiments", "tiny_instructgpt.py:smoke")
    args = [
        sys.executable, "-m", "instructrl.main", f"--config={experiment}",
        "--workdir=runs/rel", "--config.stages=world,tokenizer,pretrain",
        "--config.pretrain.num_steps=6", "--config.pretrain.checkpoint_every=2",
    ]  # fmt: skip
    for _ in range(2):  # the second run finds the finished stages in the same folder
        proc = subprocess.run(
            args, cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=300
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
    steps = sorted(os.listdir(tmp_path / "runs" / "rel" / "pretrain" / "checkpoints"))
    assert steps and all(s.isdigit() for s in steps) and "6" in steps
    assert "stage pretrain: finished earlier, skipped" in proc.stderr


def _two_stage_config():
    import ml_collections

    return ml_collections.ConfigDict(
        dict(seed=0, stages=["one", "two"], one=dict(kind="a"), two=dict(kind="b"))
    )


def test_sigterm_between_stages_ends_with_143_once_the_stage_is_done(tmp_path, monkeypatch):
    """A SIGTERM that arrives while a stage finishes (here: in its last instruction) is never
    dropped: the stage completes (DONE), the next one does not start, status 143; the same
    command then runs the rest."""
    import signal

    import pytest

    from instructrl import main as main_lib
    from instructrl.errors import Preempted

    ran = []

    def runner(kind):
        def stage(config, name, workdir):
            ran.append(name)
            if name == "one" and len(ran) == 1:
                os.kill(os.getpid(), signal.SIGTERM)

        return stage

    monkeypatch.setattr(main_lib, "stage_runner", runner)
    workdir = str(tmp_path / "run")
    with pytest.raises(
        Preempted, match=r"^stage one finished; stopped by SIGTERM before stage two"
    ):
        main_lib.run(_two_stage_config(), workdir)
    assert ran == ["one"] and os.path.exists(os.path.join(workdir, "one", "DONE"))
    assert not os.path.exists(os.path.join(workdir, "two"))
    main_lib.run(_two_stage_config(), workdir)
    assert ran == ["one", "two"]

    def late(kind):  # after the last stage: still 143, nothing is left to run
        def stage(config, name, workdir):
            os.kill(os.getpid(), signal.SIGTERM)

        return stage

    monkeypatch.setattr(main_lib, "stage_runner", late)
    two = _two_stage_config()
    two.stages = ["one", "two", "three"]
    two.three = dict(kind="c")
    with pytest.raises(Preempted, match=r"^stage three finished; stopped by SIGTERM"):
        main_lib.run(two, workdir)
    assert os.path.exists(os.path.join(workdir, "three", "DONE"))
