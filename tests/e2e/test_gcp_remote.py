"""The remote scripts that gcp/setup.sh and gcp/launch.sh send to the workers actually work
when run locally by bash (fake HOME, fake uv/pip/python): setup is idempotent, launch starts
the command in the background with the right log, pid file and arguments, and stop.sh's
remote command ends it.

The sandbox (fake gcloud, HOME, env file) is in conftest.py here. Nothing here needs gcloud,
network or a TPU.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from tests.e2e.conftest import AWKWARD, remote_command

# ---------------------------------------------------------------------------------------
# The remote scripts work (run locally by bash, with fakes for the TPU VM's tools)


def _git(*args, cwd):
    subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@example.com", *args],
        cwd=cwd,
        check=True,
        capture_output=True,
    )


def test_setup_remote_is_idempotent(sandbox):
    origin = sandbox.path / "origin"
    origin.mkdir()
    _git("init", "--quiet", "--initial-branch=main", cwd=origin)
    (origin / "a.txt").write_text("1\n")
    _git("add", "a.txt", cwd=origin)
    _git("commit", "--quiet", "-m", "one", cwd=origin)

    calls = sandbox.path / "calls.txt"
    # Fakes for the worker's tools: `python3 -m pip install --user uv` installs a fake uv;
    # `uv venv DIR` makes a venv whose python3.12 runs and whose pip logs its arguments.
    fakes = sandbox.path / "fakes"
    fakes.mkdir()
    scripts = {
        "pip": f'#!/bin/sh\necho "pip $*" >> {calls}\n',
        "uv": (
            f'#!/bin/sh\necho "uv $*" >> {calls}\n'
            'for last; do :; done\nmkdir -p "$last/bin"\n'
            f'cp {fakes}/pip "$last/bin/pip"\n'
            "printf '#!/bin/sh\\nexit 0\\n' > \"$last/bin/python3.12\"\n"
            'chmod +x "$last/bin/python3.12"\n'
        ),
        "python3": (
            f'#!/bin/sh\necho "python3 $*" >> {calls}\n'
            f'mkdir -p "$HOME/.local/bin"\ncp {fakes}/uv "$HOME/.local/bin/uv"\n'
        ),
    }
    for name, text in scripts.items():
        (fakes / name).write_text(text)
        (fakes / name).chmod(0o755)
    shutil.copy(fakes / "python3", sandbox.bin / "python3")

    (line,) = sandbox.dry("setup.sh", env_file=sandbox.write_env(REPO_URL=str(origin)))
    script = remote_command(line)

    def run_remote():
        result = subprocess.run(
            ["bash", "-c", script], env=sandbox.env, capture_output=True, text=True, check=False
        )
        assert result.returncode == 0, result.stderr
        return result.stdout

    clone = sandbox.home / "instructrl"
    out = run_remote()
    assert "worker-x: instructrl" in out and "ready in" in out
    assert (clone / "a.txt").read_text() == "1\n"
    assert calls.read_text().splitlines() == [
        "python3 -m pip install --quiet --user uv",
        "uv venv --quiet --seed --python 3.12 .venv",
        "pip install --quiet -e .[tpu]",
    ]

    # A new commit upstream; the clone and the venv are kept, only fetch + pip run again.
    (clone / "untracked-marker").write_text("kept")
    (origin / "a.txt").write_text("2\n")
    _git("commit", "--quiet", "-am", "two", cwd=origin)
    run_remote()
    assert (clone / "a.txt").read_text() == "2\n"
    assert (clone / "untracked-marker").exists()
    assert calls.read_text().splitlines()[3:] == ["pip install --quiet -e .[tpu]"]


def _wait_for(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_launch_remote_runs_in_background(sandbox):
    repo = sandbox.home / "instructrl"
    (repo / ".venv" / "bin").mkdir(parents=True)
    python = repo / ".venv" / "bin" / "python"
    python.write_text(
        f"#!{sys.executable}\n"
        "import json, os, sys, time\n"
        'print(json.dumps({"argv": sys.argv[1:], "run": os.environ.get("RUN_NAME"),'
        ' "cwd": os.getcwd()}), flush=True)\n'
        'time.sleep(float(os.environ.get("FAKE_SLEEP", "0")))\n'
    )
    python.chmod(0o755)

    workdir = "--workdir=gs://b/runs/a b"
    (line,) = sandbox.dry("launch.sh", "--run-name", "r1", "--", *AWKWARD, workdir)
    script = remote_command(line)
    log_dir = sandbox.home / "instructrl-logs" / "r1"
    log = log_dir / "worker-worker-x.log"
    pid_file = log_dir / "worker-worker-x.pid"

    def launch(**extra):
        return subprocess.run(
            ["bash", "-c", script],
            env=dict(sandbox.env, **extra),
            capture_output=True,
            text=True,
            check=False,
            timeout=20,
        )

    first = launch()
    assert first.returncode == 0, first.stderr
    assert "worker-x: started run r1" in first.stdout
    assert _wait_for(lambda: log.exists() and '"argv"' in log.read_text())
    header, record = log.read_text().splitlines()[:2]
    assert header.startswith("=== ") and header.endswith(
        " worker-x launch: --distributed " + " ".join(AWKWARD) + " " + workdir
    )
    got = json.loads(record)
    assert got == {
        "argv": ["-m", "instructrl.main", "--distributed", *AWKWARD, workdir],
        "run": "r1",
        "cwd": str(repo),
    }
    first_pid = int(pid_file.read_text())
    assert _wait_for(lambda: not _alive(first_pid))

    # While a run is alive, a second launch is refused; stop.sh's remote command ends it.
    second = launch(FAKE_SLEEP="60")
    assert second.returncode == 0, second.stderr
    pid = int(pid_file.read_text())
    try:
        assert _wait_for(lambda: Path(f"/proc/{pid}/cmdline").exists())
        assert _wait_for(lambda: b"instructrl.main" in Path(f"/proc/{pid}/cmdline").read_bytes())
        third = launch()
        assert third.returncode != 0 and "still running" in third.stderr
        (stop_line,) = sandbox.dry("stop.sh", "--run", "r1")
        stopped = subprocess.run(
            ["bash", "-c", remote_command(stop_line)],
            env=sandbox.env,
            capture_output=True,
            text=True,
            check=True,
        )
        assert f"sent SIGTERM to run r1 (pid {pid})" in stopped.stdout
        assert _wait_for(lambda: not _alive(pid))
    finally:
        if _alive(pid):
            os.kill(pid, 9)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"
