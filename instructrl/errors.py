"""Error types whose messages are shown to users as one line (and exit status 2).

Each names what is wrong and where: `data/cmp.jsonl:17: ranking ...`, `config key 'ppo.foo'
does not exist`, `stage rm: input stage 'sft' has no export in DIR/sft`,
`DIR/sft/checkpoints: no space left on device (12.0 MB free) ...`. The command-line boundary
that prints them is instructrl/cli.py.
"""

from __future__ import annotations

import errno
import os
import re
import shutil


class InstructrlError(ValueError):
    """Base of the errors that end a command with one clear line."""


class ConfigError(InstructrlError):
    """A bad config file, argument, key or value."""


class InputError(InstructrlError):
    """Bad input data, an unreadable or corrupt artifact, or a missing input stage."""


class StorageError(InstructrlError):
    """Writing or reading a file or folder failed in the operating system (disk full,
    read-only file system, no permission, I/O error); the message names the path, and the
    free space when the disk is full."""


class Preempted(Exception):
    """A stage stopped on SIGTERM after saving a checkpoint; re-running resumes it."""


# errno values of a full disk (ENOSPC; EDQUOT: a quota) and the words tensorstore and orbax
# use for them in the messages of the errors they raise instead of OSError.
_FULL = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))
_STORAGE_ERRNOS = {
    *_FULL,
    errno.EROFS,
    errno.EACCES,
    errno.EPERM,
    errno.EIO,
    errno.EEXIST,
    errno.ENOTDIR,
    errno.EISDIR,
    errno.ENOENT,
    errno.EFBIG,
    errno.EMFILE,
    errno.ENAMETOOLONG,
}
_STORAGE_WORDS = (
    ("No space left on device", errno.ENOSPC),
    ("Disk quota exceeded", _FULL[1]),
    ("Read-only file system", errno.EROFS),
    ("Input/output error", errno.EIO),
    ("Permission denied", errno.EACCES),
)
_QUOTED_PATH = re.compile(r'(?:Failed writing|Error writing|Error opening|writing):? "(/[^"]+)"')


def format_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def free_space(path: str) -> str:
    """The free space on the file system holding `path` (its nearest existing folder):
    "12.3 MB free", or "free space unknown"."""
    folder = os.path.abspath(path)
    while folder and not os.path.isdir(folder):
        parent = os.path.dirname(folder)
        if parent == folder:
            break
        folder = parent
    try:
        return f"{format_bytes(shutil.disk_usage(folder).free)} free"
    except OSError:
        return "free space unknown"


def _chain(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def storage_errno(exc: BaseException) -> tuple[int, str | None] | None:
    """(errno, path or None) when `exc` or an exception it was raised from is an operating
    system error of the storage (an OSError, or tensorstore's wording of one); else None."""
    for e in _chain(exc):
        if isinstance(e, OSError) and e.errno in _STORAGE_ERRNOS:
            return e.errno, e.filename
    for e in _chain(exc):
        text = str(e)
        for words, code in _STORAGE_WORDS:
            if words in text:
                m = _QUOTED_PATH.search(text)
                return code, m.group(1) if m else None
    return None


def os_error_line(exc: OSError, fallback_path: str | None = None) -> str:
    """One line for an OSError: "PATH: reason" (the free space when the disk is full)."""
    found = storage_errno(exc)
    code = exc.errno if exc.errno is not None else (found[0] if found else None)
    path = exc.filename or (found[1] if found else None) or fallback_path
    if exc.strerror:
        reason = exc.strerror
    elif code is not None:
        reason = os.strerror(code)
    else:  # e.g. FileNotFoundError("x.model: tokenizer model not found"): its own words
        text = " ".join(str(exc.args[0] if len(exc.args) == 1 else exc).split())
        return f"{path}: {text}" if path and path not in text else text
    reason = reason[0].lower() + reason[1:]
    if exc.filename2:
        path = f"{path} -> {exc.filename2}"
    line = f"{path}: {reason}" if path else reason
    if code in _FULL and path:
        line += f" ({free_space(str(exc.filename or path))})"
    return line


def storage_error(exc: BaseException, path: str, doing: str) -> StorageError | None:
    """A StorageError "PATH: <reason> while <doing> (<free>)" when `exc` comes from the
    storage (see storage_errno), else None (the caller re-raises `exc`: a bug keeps its
    traceback). `path`: what was being written or read."""
    found = storage_errno(exc)
    if found is None:
        return None
    code, _ = found
    line = f"{path}: {os.strerror(code)[0].lower()}{os.strerror(code)[1:]} while {doing}"
    if code in _FULL:
        line += f" ({free_space(path)})"
    return StorageError(line)
