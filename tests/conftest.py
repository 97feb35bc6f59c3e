"""Shared pytest helpers.

Multi-device and multi-process tests run their body in a fresh Python subprocess, because
XLA_FLAGS (virtual device count) and jax.distributed must be set before jax is imported and
must never leak into the main pytest process.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The suite's programs are tiny and most of its time is XLA compiling them: the backend's
# optimisation passes roughly halve a learning test's wall time when skipped (18.5 -> 8.8 s
# for a GRPO learning run, same numbers). Set before any backend starts; subprocesses
# inherit it through subprocess_env. Benchmarks and real runs never see this flag.
_FAST_COMPILE = "--xla_backend_optimization_level=0"
if _FAST_COMPILE not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FAST_COMPILE}".strip()


def subprocess_env(num_devices: int = 1, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["JAX_PLATFORMS"] = "cpu"
    flags = env.get("XLA_FLAGS", "")
    flags = " ".join(f for f in flags.split() if "force_host_platform_device_count" not in f)
    if num_devices > 1:
        flags += f" --xla_force_host_platform_device_count={num_devices}"
    env["XLA_FLAGS"] = flags.strip()
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def run_in_subprocess(
    code: str, *, num_devices: int = 1, timeout: float = 600, env: dict[str, str] | None = None
) -> str:
    """Runs `code` in a fresh interpreter with `num_devices` virtual CPU devices; returns stdout.

    Fails the test with the subprocess's stderr when it exits non-zero.
    """
    full_env = subprocess_env(num_devices, **(env or {}))
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=full_env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode != 0:
        pytest.fail(
            f"subprocess failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
        )
    return proc.stdout


@contextlib.contextmanager
def persistent_compilation_cache(path: str) -> Iterator[None]:
    """This process's jit compilations read/write the persistent XLA cache at `path`, so a
    program whose HLO was compiled before (by an earlier test of the same worker) is loaded,
    not recompiled: the very executable, so no number changes. jax's settings are restored
    afterwards."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    settings = {
        "jax_compilation_cache_dir": path,
        "jax_persistent_cache_min_compile_time_secs": 0.0,
        "jax_persistent_cache_min_entry_size_bytes": -1,
    }
    old = {name: getattr(jax.config, name) for name in settings}
    for name, value in settings.items():
        jax.config.update(name, value)
    compilation_cache.reset_cache()  # re-read the settings at the next compile
    try:
        yield
    finally:
        for name, value in old.items():
            jax.config.update(name, value)
        compilation_cache.reset_cache()


def made_once(tmp_path_factory, name: str, make: Callable[[str], None]) -> str:
    """A folder that `make(folder)` fills once per test session, even across xdist workers.

    Each xdist worker runs its own session, so a session fixture used by tests on two workers
    would do its work twice (and `--dist loadgroup` did not keep such tests together). Here
    the folder is in the workers' common temp folder; the first worker makes it under a file
    lock, the others wait and reuse it. Without xdist it is a plain temp folder."""
    import fcntl
    import shutil

    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = tmp_path_factory.getbasetemp().parent / f"made_once_{name}"  # this session's
        root.mkdir(exist_ok=True)
    else:
        root = tmp_path_factory.mktemp(name)
    folder = str(root / "made")
    with open(root / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (root / "done").exists():
            shutil.rmtree(folder, ignore_errors=True)  # another worker's failed attempt
            os.makedirs(folder)
            make(folder)
            (root / "done").write_text("ok\n")
    return folder


# Fixtures that wrap made_once: the first test using one builds it; every later user waits
# on the lock if it starts meanwhile, and on the other xdist worker that wait is idle time.
SHARED_BUILDS = ("smoke_full", "notebook_env", "ppo_base")


def pytest_collection_modifyitems(config, items):
    """Keeps the first user of each SHARED_BUILDS fixture in place and moves its other users to
    the end of the run, by when the build is done (it made `make test` ~2 min longer when both
    workers started on the same build). Deterministic, so every xdist worker collects alike."""
    seen, first, later = set(), [], []
    for item in items:
        builds = [b for b in SHARED_BUILDS if b in getattr(item, "fixturenames", ())]
        if builds and all(b in seen for b in builds):
            later.append(item)
        else:
            seen.update(builds)
            first.append(item)
    items[:] = first + later


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_multiprocess(
    code: str, *, num_processes: int = 2, devices_per_process: int = 1, timeout: float = 600
) -> list[str]:
    """Runs `code` in `num_processes` processes joined by jax.distributed (gloo on 127.0.0.1).

    Before `code` runs, jax.distributed is initialised; `code` can read PROCESS_ID and
    NUM_PROCESSES. Returns each process's stdout.
    """
    port = free_port()
    prelude = textwrap.dedent(
        f"""
        import os, jax
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        PROCESS_ID = int(os.environ["INSTRUCTRL_TEST_PROCESS_ID"])
        NUM_PROCESSES = {num_processes}
        jax.distributed.initialize(
            coordinator_address="127.0.0.1:{port}",
            num_processes=NUM_PROCESSES,
            process_id=PROCESS_ID,
        )
        """
    )
    procs = []
    for pid in range(num_processes):
        env = subprocess_env(devices_per_process, INSTRUCTRL_TEST_PROCESS_ID=str(pid))
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", prelude + textwrap.dedent(code)],
                env=env,
                cwd=REPO,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    outs = []
    failed = []
    for pid, p in enumerate(procs):
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail(f"process {pid} timed out after {timeout}s")
        outs.append(out)
        if p.returncode != 0:
            failed.append(f"process {pid} exited {p.returncode}:\n{out[-3000:]}\n{err[-6000:]}")
    if failed:
        pytest.fail("\n".join(failed))
    return outs


def tree_digest(folder: str) -> dict[str, str]:
    """sha256 of every file under `folder` (relative path -> hex digest): "nothing was
    rewritten" checks compare it before and after a run."""
    out = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return out


def wait_for_logged_step(
    proc: subprocess.Popen,
    workdir: str,
    stage: str,
    step: int,
    *,
    timeout: float = 240,
    also: Callable[[], bool] = lambda: True,
) -> bool:
    """Polls DIR/<stage>/metrics.jsonl until it logs `step` (and `also()` holds); False if
    the run ended first or `timeout` seconds passed."""
    path = os.path.join(workdir, stage, "metrics.jsonl")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        if os.path.exists(path) and also():
            with open(path) as f:
                lines = [x for x in f.read().split("\n") if x.strip()]
            try:
                last = json.loads(lines[-1])["step"] if lines else 0
            except json.JSONDecodeError:  # a line being written
                last = 0
            if last >= step:
                return True
        time.sleep(0.002)
    return False
