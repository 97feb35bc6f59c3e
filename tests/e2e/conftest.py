"""The sandbox of the gcp/ script tests (test_gcp_scripts.py, test_gcp_remote.py): a fake gcloud
and hostname first on PATH, a fake HOME, and an env file with test values (nothing here
needs gcloud, network or a TPU); and `smoke_full`, the one `smoke,full` experiment run that
test_experiment_full.py and test_experiment_algorithms.py share (xdist group "smoke_full").
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.conftest import REPO, made_once, subprocess_env

EXPERIMENT = os.path.join(REPO, "experiments", "tiny_instructgpt.py")

GCP = Path(REPO) / "gcp"
SCRIPTS = sorted(p.name for p in GCP.glob("*.sh"))
RUNNABLE = [s for s in SCRIPTS if s != "common.sh"]  # common.sh is sourced by the others

ENV = {
    "PROJECT": "test-project",
    "ZONE": "us-central2-b",
    "ACCELERATOR_TYPE": "v4-32",
    "RUNTIME_VERSION": "tpu-ubuntu2204-base",
    "TPU_NAME": "test-tpu",
    "BUCKET": "gs://test-bucket",
    "REPO_URL": "https://github.com/example/instructrl.git",
    "BRANCH": "main",
}

AWKWARD = ["--config=experiments/tiny_instructgpt.py:smoke", '--config.note=it\'s $HOME "q" ~ *']


# Fake programs. The fake gcloud appends its argv (as JSON) to $FAKE_GCLOUD_LOG.
FAKE_GCLOUD = f"""#!{sys.executable}
import json, os, sys
with open(os.environ["FAKE_GCLOUD_LOG"], "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
"""
FAKE_HOSTNAME = "#!/bin/sh\necho worker-x\n"


@pytest.fixture
def sandbox(tmp_path):
    """A fake bin/ (gcloud, hostname) first on PATH, a fake HOME, and a run() helper."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in {"gcloud": FAKE_GCLOUD, "hostname": FAKE_HOSTNAME}.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    home = tmp_path / "home"
    home.mkdir()
    log = tmp_path / "gcloud.log"

    class Sandbox:
        path = tmp_path

        def __init__(self):
            self.env = {
                "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
                "HOME": str(home),
                "FAKE_GCLOUD_LOG": str(log),
                "LC_ALL": "C",
            }
            self.home = home
            self.bin = bin_dir

        def write_env(self, name: str = "env", **changes: str | None) -> Path:
            values = {**ENV, **changes}
            lines = [f"{k}={shlex.quote(v)}" for k, v in values.items() if v is not None]
            path = tmp_path / name
            path.write_text("# test env\n" + "\n".join(lines) + "\n")
            return path

        def run(self, script, *args, env_file=None, stdin="", extra_env=None, gcp=GCP):
            env = dict(self.env, **(extra_env or {}))
            cmd = ["bash", str(gcp / script)]
            if env_file is not False:
                cmd += ["--env", str(env_file or self.write_env())]
            return subprocess.run(
                [*cmd, *args],
                input=stdin,
                capture_output=True,
                text=True,
                env=env,
                timeout=30,
                check=False,
            )

        def dry(self, script, *args, **kwargs) -> list[str]:
            result = self.run(script, "--dry-run", *args, **kwargs)
            assert result.returncode == 0, result.stderr
            assert self.gcloud_calls() == [], "--dry-run ran gcloud"
            return result.stdout.splitlines()

        def gcloud_calls(self) -> list[list[str]]:
            if not log.exists():
                return []
            calls = [json.loads(line) for line in log.read_text().splitlines()]
            log.unlink()
            return calls

        def paste(self, line: str) -> list[str]:
            """Runs a printed line in bash, as a user pasting it would; returns gcloud's argv."""
            result = subprocess.run(
                ["bash", "-c", line], env=self.env, capture_output=True, text=True, check=True
            )
            assert result.returncode == 0, result.stderr
            (call,) = self.gcloud_calls()
            return call

    return Sandbox()


def remote_command(line: str) -> str:
    """The --command=... value of a printed gcloud ssh line."""
    (value,) = [w for w in shlex.split(line) if w.startswith("--command=")]
    return value[len("--command=") :]


def run_experiment(arg: str, workdir: str, cache: str, timeout: float = 900) -> str:
    """experiments/tiny_instructgpt.py:`arg` through the CLI with a persistent XLA cache at
    `cache`; returns its output (fails the test on a non-zero exit)."""
    cli = [sys.executable, "-m", "instructrl.main", f"--config={EXPERIMENT}:{arg}"]
    proc = subprocess.run(
        [*cli, f"--workdir={workdir}"],
        env=subprocess_env(
            JAX_COMPILATION_CACHE_DIR=cache,
            JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
            JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1",
        ),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode != 0:
        pytest.fail(f"exit {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-8000:]}")
    return proc.stdout + proc.stderr


@pytest.fixture(scope="session")
def smoke_full(tmp_path_factory):
    """One `smoke,full` run (every stage, eval included) in `.workdir`, its XLA cache in
    `.cache`. Tests copy its folders and must not change them. Made once per session across
    xdist workers (tests/conftest.py `made_once`)."""

    def make(root: str) -> None:
        run_experiment("smoke,full", os.path.join(root, "first"), os.path.join(root, "xla_cache"))

    root = made_once(tmp_path_factory, "smoke_full", make)
    workdir, cache = os.path.join(root, "first"), os.path.join(root, "xla_cache")
    return SimpleNamespace(workdir=workdir, cache=cache, root=root)
