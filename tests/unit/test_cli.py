"""Tests for instructrl/cli.py, the error boundary of every command: which failure gets which
status and which one line, --verbose, and library tracebacks cut to one line.

Every fault of the issue's table through `python -m instructrl.main`: tests/stages/test_faults.py.
"""

from __future__ import annotations

import errno
import logging
import re

import pytest

from instructrl import cli
from instructrl.errors import ConfigError, InputError, Preempted, StorageError, storage_error
from instructrl.stages.common import NonFiniteError


def _raise(exc):
    def body():
        raise exc

    return body


@pytest.mark.parametrize(
    "exc, status, line",
    [
        (InputError("data/x.jsonl:3: missing field 'prompt'"), 2,
         "error: data/x.jsonl:3: missing field 'prompt'"),
        (ConfigError("config key 'a.b' = 0: must be >= 1"), 2,
         "error: config key 'a.b' = 0: must be >= 1"),
        (StorageError("DIR/ckpt/4: no space left on device while ..."), 2,
         "error: DIR/ckpt/4: no space left on device while ..."),
        (OSError(errno.EROFS, "Read-only file system", "/ro/run"), 2,
         "error: /ro/run: read-only file system"),
        (FileExistsError(errno.EEXIST, "File exists", "/x/run"), 2, "error: /x/run: file exists"),
        (OSError(errno.EACCES, "Permission denied", "/x", None, "/y"), 2,
         "error: /x -> /y: permission denied"),
        (FileNotFoundError("x.model: tokenizer model not found"), 2,
         "error: x.model: tokenizer model not found"),
        (NonFiniteError("step 4: loss is nan"), 3,
         "error: step 4: loss is nan; the run stopped, its last checkpoint is intact"),
        (Preempted("stage sft: stopped by signal at step 3; checkpoint saved"), 143,
         "preempted: stage sft: stopped by signal at step 3; checkpoint saved; run the same "
         "command again to resume"),
    ],
)  # fmt: skip
def test_expected_failures_end_in_one_line_and_their_status(exc, status, line, capsys):
    assert cli.run(_raise(exc), []) == status
    err = capsys.readouterr().err
    assert err.splitlines() == [line]


def test_a_full_disk_names_the_free_space(tmp_path, capsys):
    exc = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "metrics.jsonl"))
    assert cli.run(_raise(exc), []) == 2
    line = capsys.readouterr().err.strip()
    assert re.fullmatch(
        rf"error: {tmp_path}/metrics.jsonl: no space left on device \([\d.]+ [KMGT]?B free\)", line
    ), line
    # An OSError without a path (a write to an open file) names the command's fallback.
    exc = OSError(errno.ENOSPC, "No space left on device")
    assert cli.run(_raise(exc), [], fallback_path=str(tmp_path)) == 2
    assert capsys.readouterr().err.startswith(f"error: {tmp_path}: no space left on device (")


def test_tensorstore_words_for_a_full_disk_become_a_storage_error(tmp_path):
    """Orbax's array writes fail in tensorstore, whose errors are ValueErrors in words."""
    exc = ValueError(
        'RESOURCE_EXHAUSTED: Error writing "opt_state.0" in OCDBT database at local file '
        f'"{tmp_path}/c/4.orbax-checkpoint-tmp/": Failed writing: "{tmp_path}/c/4.orbax-'
        'checkpoint-tmp/d/ab": Failed to write 10 bytes to file 19: No space left on device'
    )
    err = storage_error(exc, f"{tmp_path}/c/4", "saving the checkpoint of step 4")
    assert isinstance(err, StorageError)
    assert re.fullmatch(
        rf"{tmp_path}/c/4: no space left on device while saving the checkpoint of step 4 "
        r"\([\d.]+ [KMGT]?B free\)",
        str(err),
    )
    assert storage_error(ValueError("shapes differ"), "x", "saving") is None  # a bug: re-raised


def test_a_bug_keeps_its_traceback_and_verbose_adds_one(capsys):
    with pytest.raises(KeyError):
        cli.run(_raise(KeyError("our bug")), [])
    assert capsys.readouterr().err == ""
    assert cli.run(_raise(InputError("x.jsonl:1: bad")), ["--verbose"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "Traceback (most recent call last):"
    assert err[-1] == "error: x.jsonl:1: bad"


def test_library_tracebacks_become_one_line_unless_verbose():
    def record(pathname, exc_info=None, level=logging.ERROR):
        r = logging.LogRecord(
            "absl", level, pathname, 1, "save failed:\n%s", ("details",), exc_info
        )
        return r

    try:
        raise ValueError("RESOURCE_EXHAUSTED")
    except ValueError:
        import sys

        info = sys.exc_info()
    orbax = "/venv/site-packages/orbax/checkpoint/_src/futures/future.py"
    quiet, loud = cli.QuietLibraries(), cli.QuietLibraries(verbose=True)
    r = record(orbax, info)
    assert quiet.filter(r) and r.exc_info is None and r.getMessage() == "save failed: details"
    r = record(orbax, info)
    assert loud.filter(r) and r.exc_info is not None
    assert not quiet.filter(record(orbax, level=logging.INFO))  # chatter
    ours = record("/repo/instructrl/stages/lm.py", info)
    assert quiet.filter(ours) and ours.exc_info is not None  # our own records are untouched
