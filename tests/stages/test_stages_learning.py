"""The stage drivers through the real command line: learning and scale-out.

The runs, the tiny config and the shared base run (fixture `env`) are in conftest.py here.

What each test shows (the stage "must show" list of the issue):
  SFT drives the loss down, exports loadable params     test_sft_loss_falls_and_export_loads
  RM reaches > 90% validation accuracy on a rule,       test_rm_learns_ranking_rule
    RewardModel.load().score(), demonstration mean 0;
    finished stages are skipped (DONE), untouched
  same loss trajectory (rtol 1e-4) on 1 device, on an   test_same_trajectory_across_meshes_and_processes
    8-device (2,2,2) mesh and in 2 processes (SFT, RM)
  checkpoint from 8 devices resumes on 1 device and     test_resume_on_other_meshes
    on a (data=4, tensor=2) mesh
The RM loss itself is checked against a naive loop in tests/unit/test_losses.py.
Kill, preempt, resume, errors and re-runs: test_stages_restarts.py.
"""

from __future__ import annotations

import json
import os
import shutil
import time

import numpy as np
import pytest

from tests.conftest import free_port, tree_digest
from tests.stages.conftest import (
    FILLER,
    WORD,
    assert_params_equal,
    exported_params,
    losses,
    metrics,
)


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
