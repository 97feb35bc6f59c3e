"""Every fault a user can cause ends in one clear line, and no good checkpoint is lost: the
16 faults of issue 20's table, each through `python -m instructrl.main` with the tiny
experiment's `smoke` argument.

Each test asserts the exit status, that stderr's last line names the file:line, config key
or path (`_one_line`), that no traceback is printed, and that every file that existed before
is byte-identical after (`_assert_kept`, with tests/conftest.py's `tree_digest`).

  fault (issue 20's table)                                test
  demonstrations with BOM, CRLF, blank lines as           test_tokenizer_input_with_bom_crlf_and_blank_lines_is_fine
    tokenizer.input (valid)
  Latin-1 bytes as tokenizer.input                        test_tokenizer_input_with_latin1_bytes
  truncated JSON / an array line / no text field as       test_tokenizer_input_bad_line[truncated_json|array_line|no_text_field]
    tokenizer.input
  --config.pretrain.batch_size=-8                         test_out_of_range_value_names_its_key[batch_size]
  --config.pretrain.num_epochs=0                          test_out_of_range_value_names_its_key[num_epochs]
  --config.ppo.num_iterations=0                           test_out_of_range_value_names_its_key[num_iterations]
  --workdir is an existing regular file                   test_workdir_is_a_file
  --workdir on a read-only file system                    test_workdir_on_a_read_only_file_system (+ _real_mount)
  corrupt tokenizer .model as tokenizer_from / left in    test_corrupt_tokenizer_model[tokenizer_from|left_in_workdir]
    DIR/tokenizer/
  newest checkpoint truncated / its _METADATA garbled     test_corrupt_newest_checkpoint_falls_back[truncated|metadata]
    after a SIGKILL (an older good one exists)              (none readable: test_no_readable_checkpoint_names_the_folder)
  SIGTERM as a stage logs its last step                   test_sigterm_as_a_stage_logs_its_last_step
  the workdir's disk fills up                             test_disk_full_while_saving (+ _real_mount)

Read-only and full disks are simulated in Python (FAULTY_MAIN) so the tests run anywhere;
the `_real_mount` variants mount a small tmpfs where the tests run as root, and are skipped
elsewhere. Kill/resume with a corrupted newest checkpoint after a real SIGKILL:
tests/stages/test_stages_restarts.py.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys

import pytest

from tests.conftest import REPO, subprocess_env, tree_digest, wait_for_logged_step
from tests.stages.conftest import assert_params_equal, exported_params

TINY = os.path.join(REPO, "experiments", "tiny_instructgpt.py")
# The base run: world, tokenizer and 8 pretraining steps, a checkpoint every 2 (2 kept: 6, 8).
PRETRAIN = (
    "--config.stages=world,tokenizer,pretrain",
    "--config.pretrain.num_steps=8",
    "--config.pretrain.checkpoint_every=2",
)

FAULTY_MAIN = '''
"""python faulty_main.py KIND PREFIX [instructrl.main arguments]: `python -m instructrl.main`
with an OS fault simulated in Python for every path that starts with PREFIX (a string
prefix: DIR/pretrain/checkpoints/4 also covers DIR/pretrain/checkpoints/4.orbax-checkpoint-tmp):

  erofs   every file write, folder creation, rename or removal fails: a read-only file system
  enospc  every file write fails with "No space left on device", and 0 bytes are free: a
          full disk (folders are still made: they fit in blocks already allocated)
"""

import builtins
import errno
import io
import os
import runpy
import shutil
import sys

kind, prefix = sys.argv[1], os.path.abspath(sys.argv[2])
code = {"erofs": errno.EROFS, "enospc": errno.ENOSPC}[kind]
WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def under(path):
    return not isinstance(path, int) and os.path.abspath(os.fsdecode(path)).startswith(prefix)


def guard(fn, writes=lambda *a, **k: True):
    def wrapped(path, *args, **kwargs):
        if under(path) and writes(*args, **kwargs):
            raise OSError(code, os.strerror(code), os.fsdecode(path))
        return fn(path, *args, **kwargs)

    return wrapped


builtins.open = io.open = guard(io.open, lambda mode="r", *a, **k: any(c in mode for c in "wax+"))
os.open = guard(os.open, lambda flags, *a, **k: bool(flags & WRITE))
names = ["rename", "replace"] + (["mkdir", "rmdir", "remove", "unlink"] if kind == "erofs" else [])
for name in names:
    setattr(os, name, guard(getattr(os, name)))
usage = shutil.disk_usage
shutil.disk_usage = lambda p: usage(p)._replace(free=0) if under(p) else usage(p)

sys.argv = ["instructrl.main", *sys.argv[3:]]
runpy.run_module("instructrl.main", run_name="__main__", alter_sys=True)
'''


class Cli:
    """Runs `python -m instructrl.main --config=tiny:smoke` (or FAULTY_MAIN) in a subprocess,
    the runs of this module sharing one XLA compilation cache."""

    def __init__(self, root: str):
        self.root = root
        self.faulty = os.path.join(root, "faulty_main.py")
        with open(self.faulty, "w") as f:
            f.write(FAULTY_MAIN)
        self.env = subprocess_env(
            JAX_COMPILATION_CACHE_DIR=os.path.join(root, "xla_cache"),
            JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
            JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1",
        )

    def args(self, workdir, *overrides, fault=None) -> list[str]:
        head = [sys.executable, "-m", "instructrl.main"]
        if fault is not None:
            head = [sys.executable, self.faulty, *fault]
        return [*head, f"--config={TINY}:smoke", f"--workdir={workdir}", *overrides]

    def run(self, workdir, *overrides, fault=None, expect=None) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            self.args(workdir, *overrides, fault=fault),
            env=self.env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=600,
        )
        if expect is not None and proc.returncode != expect:
            pytest.fail(f"exit {proc.returncode} (expected {expect}):\n{proc.stderr[-6000:]}")
        return proc

    def start(self, workdir, *overrides) -> subprocess.Popen:
        return subprocess.Popen(
            self.args(workdir, *overrides),
            env=self.env,
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )


@pytest.fixture(scope="module")
def cli(tmp_path_factory):
    return Cli(str(tmp_path_factory.mktemp("faults")))


@pytest.fixture(scope="module")
def base(cli):
    """A finished world + tokenizer + 8-step pretraining run (the uninterrupted reference)."""
    workdir = os.path.join(cli.root, "base")
    cli.run(workdir, *PRETRAIN, expect=0)
    return workdir


def _copy(base: str, dst, drop: tuple[str, ...] = ()) -> str:
    def ignore(folder, names):
        rel = os.path.relpath(folder, base)
        return [n for n in names if os.path.normpath(os.path.join(rel, n)) in drop]

    return str(shutil.copytree(base, dst, ignore=ignore))


def _one_line(proc, status: int, *names: str) -> str:
    """The exit status is `status`, no traceback is printed, and stderr's last line is the
    error (or "preempted:") line naming every one of `names`; returns that line."""
    assert proc.returncode == status, proc.stderr[-6000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-6000:]
    last = proc.stderr.rstrip("\n").splitlines()[-1]
    assert last.startswith("preempted: " if status == 143 else "error: "), proc.stderr[-3000:]
    for name in names:
        assert name in last, (name, last)
    return last


def _assert_kept(before: dict[str, str], folder: str, moved: dict[str, str] | None = None):
    """Every file of `before` (a tree_digest of `folder`) is byte-identical; `moved` maps a
    relative path prefix to where those files are now (kept elsewhere, not rewritten)."""
    after = tree_digest(folder)
    for path, digest in before.items():
        now = path
        for old, new in (moved or {}).items():
            if path.startswith(old):
                now = new + path[len(old) :]
        assert after.get(now) == digest, f"{path} changed or is gone"


def _messy(lines: list[str]) -> bytes:
    """The README's own-data quirks: a byte-order mark, Windows line ends, blank lines."""
    return b"\xef\xbb\xbf" + "\r\n\r\n".join(lines).encode("utf-8") + b"\r\n\n"


# ------------------------------------------------------------------ tokenizer.input


def test_tokenizer_input_with_bom_crlf_and_blank_lines_is_fine(cli, base, tmp_path):
    from instructrl.tokenizer import Tokenizer

    with open(os.path.join(base, "world", "demonstrations.jsonl"), encoding="utf-8") as f:
        lines = f.read().splitlines()
    demos = tmp_path / "my_demos.jsonl"
    demos.write_bytes(_messy(lines))
    before = tree_digest(str(tmp_path))
    workdir = str(tmp_path / "run")
    proc = cli.run(workdir, "--config.stages=tokenizer", f"--config.tokenizer.input={demos}")
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    _assert_kept(before, str(tmp_path))
    # Exactly what the same demonstrations without the quirks train.
    clean = tmp_path / "clean.jsonl"
    clean.write_text("\n".join(lines) + "\n", encoding="utf-8")
    ref = Tokenizer.load(
        Tokenizer.train([str(clean)], 1024, str(tmp_path / "ref"), split_digits=False)
    )
    got = Tokenizer.load(os.path.join(workdir, "tokenizer", "tokenizer.model"))
    assert [got.id_to_piece(i) for i in range(got.vocab_size)] == [
        ref.id_to_piece(i) for i in range(ref.vocab_size)
    ]


def _bad_tokenizer_input(cli, tmp_path, content: bytes, where: str, message: str) -> None:
    bad = tmp_path / "my_text.jsonl"
    bad.write_bytes(content)
    before = tree_digest(str(tmp_path))
    workdir = str(tmp_path / "run")
    proc = cli.run(workdir, "--config.stages=tokenizer", f"--config.tokenizer.input={bad}")
    last = _one_line(proc, 2, f"{bad}:{where}: {message}")
    assert "INTERNAL" not in last and "At:" not in last and ".cc(" not in last
    _assert_kept(before, str(tmp_path))
    assert not os.path.exists(os.path.join(workdir, "tokenizer"))  # nothing half-written


def test_tokenizer_input_with_latin1_bytes(cli, tmp_path):
    content = b'{"text": "the menu"}\n{"text": "caf\xe9 au lait"}\n'
    _bad_tokenizer_input(cli, tmp_path, content, "2", "not valid UTF-8 (byte 14 of the line)")


@pytest.mark.parametrize(
    "content, message",
    [
        pytest.param(b'{"text": "ok"}\n{"text": "cut sh', "not valid JSON (Unterminated string",
                     id="truncated_json"),
        pytest.param(b'{"text": "ok"}\n["an", "array"]\n', "expected a JSON object, got array",
                     id="array_line"),
        pytest.param(b'{"text": "ok"}\n{"label": 1}\n', "no text field (expected one of text,",
                     id="no_text_field"),
    ],
)  # fmt: skip
def test_tokenizer_input_bad_line(cli, tmp_path, content, message):
    _bad_tokenizer_input(cli, tmp_path, content, "2", message)


# ------------------------------------------------------------------ config values


@pytest.mark.parametrize(
    "override, key",
    [
        pytest.param("pretrain.batch_size=-8", "'pretrain.batch_size' = -8: must be >= 1",
                     id="batch_size"),
        pytest.param("pretrain.num_epochs=0", "'pretrain.num_epochs' = 0: must be >= 1",
                     id="num_epochs"),
        pytest.param("ppo.num_iterations=0", "'ppo.num_iterations' = 0: must be >= 1",
                     id="num_iterations"),
    ],
)  # fmt: skip
def test_out_of_range_value_names_its_key(cli, base, tmp_path, override, key):
    workdir = _copy(base, tmp_path / "run")
    before = tree_digest(workdir)
    proc = cli.run(workdir, f"--config.{override}")
    assert _one_line(proc, 2, key).startswith("error: config key '")
    _assert_kept(before, workdir)
    assert tree_digest(workdir) == before  # not even a config.json: nothing ran


# ------------------------------------------------------------------ the workdir


def test_workdir_is_a_file(cli, tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("my notes\n")
    before = tree_digest(str(tmp_path))
    proc = cli.run(str(path))
    _one_line(proc, 2, f"{path}: --workdir is a file, not a folder")
    assert tree_digest(str(tmp_path)) == before


def test_workdir_on_a_read_only_file_system(cli, base, tmp_path):
    # A new workdir on a read-only disk.
    ro = tmp_path / "ro"
    ro.mkdir()
    proc = cli.run(str(ro / "run"), fault=("erofs", str(ro)))
    _one_line(proc, 2, f"{ro}/run: read-only file system")
    # A workdir with finished stages, read-only now: the first stage to write names its folder.
    workdir = _copy(base, tmp_path / "run", drop=("pretrain",))
    before = tree_digest(workdir)
    proc = cli.run(workdir, *PRETRAIN, fault=("erofs", workdir))
    _one_line(proc, 2, f"{workdir}/pretrain: read-only file system")
    assert tree_digest(workdir) == before


def _mount_tmpfs(folder, options: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    os.makedirs(folder, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)],
                          capture_output=True, text=True)  # fmt: skip
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")


def _umount(folder) -> None:
    subprocess.run(["umount", str(folder)], check=False)


@pytest.mark.slow
def test_workdir_on_a_read_only_file_system_real_mount(cli, tmp_path):
    mnt = tmp_path / "ro"
    _mount_tmpfs(mnt, "size=64k,ro")
    try:
        proc = cli.run(str(mnt / "run"))
        _one_line(proc, 2, f"{mnt}/run: read-only file system")
    finally:
        _umount(mnt)


# ------------------------------------------------------------------ artifacts


@pytest.mark.parametrize("where", ["tokenizer_from", "left_in_workdir"])
def test_corrupt_tokenizer_model(cli, base, tmp_path, where):
    workdir = _copy(base, tmp_path / "run")
    garbage = os.urandom(300)
    if where == "tokenizer_from":
        bad = str(tmp_path / "my.model")
        override = (f"--config.sft.tokenizer_from={bad}",)
    else:
        bad = os.path.join(workdir, "tokenizer", "tokenizer.model")  # the stage is DONE
        override = ()
    with open(bad, "wb") as f:
        f.write(garbage)
    before = tree_digest(str(tmp_path))
    proc = cli.run(workdir, "--config.stages=world,tokenizer,pretrain,sft",
                   "--config.sft.num_steps=2", *override)  # fmt: skip
    _one_line(proc, 2, f"{bad}: not a valid SentencePiece model")
    _assert_kept(before, str(tmp_path))
    assert not os.path.exists(os.path.join(workdir, "sft"))


def _after_a_kill(base, dst) -> str:
    """What a SIGKILL between the last checkpoint and the end of pretraining leaves: the
    checkpoints (6, 8) and metrics, no DONE, export or selection."""
    return _copy(base, dst, drop=tuple(f"pretrain/{n}" for n in ("DONE", "export", "selection.json")))  # fmt: skip


def _corrupt(step_dir: str, how: str) -> None:
    if how == "truncated":  # every array file cut short (small arrays live in the btree files)
        for root, _, names in os.walk(step_dir):
            if os.path.basename(root) == "d":
                for name in names:
                    with open(os.path.join(root, name), "r+b") as f:
                        f.truncate(10)
    else:
        with open(os.path.join(step_dir, "state", "_METADATA"), "w") as f:
            f.write('{"tree_metadata": {"garbled')


@pytest.mark.parametrize("how", ["truncated", "metadata"])
def test_corrupt_newest_checkpoint_falls_back(cli, base, tmp_path, how):
    """The run resumes from the newest checkpoint that reads (6), says which one it skipped
    (8) and why, keeps that one byte for byte in unreadable_checkpoints/8, and ends with the
    export of the uninterrupted run."""
    workdir = _after_a_kill(base, tmp_path / "run")
    ckpts = os.path.join(workdir, "pretrain", "checkpoints")
    _corrupt(os.path.join(ckpts, "8"), how)
    before = tree_digest(workdir)
    proc = cli.run(workdir, *PRETRAIN, expect=0)
    assert "Traceback" not in proc.stderr
    skipped = [x for x in proc.stderr.splitlines() if "cannot be read" in x]
    assert len(skipped) == 1 and f"WARNING {ckpts}/8: cannot be read (" in skipped[0], skipped
    reason = "OUT_OF_RANGE" if how == "truncated" else "JSONDecodeError"
    assert reason in skipped[0]
    assert "resumed from step 6" in proc.stderr
    unreadable = "pretrain/unreadable_checkpoints/8"
    _assert_kept(before, workdir, moved={"pretrain/checkpoints/8": unreadable})
    assert_params_equal(
        exported_params(os.path.join(workdir, "pretrain", "export")),
        exported_params(os.path.join(base, "pretrain", "export")),
        f"resumed past a {how} checkpoint",
    )


def test_no_readable_checkpoint_names_the_folder(cli, base, tmp_path):
    workdir = _after_a_kill(base, tmp_path / "run")
    ckpts = os.path.join(workdir, "pretrain", "checkpoints")
    for step in ("6", "8"):
        _corrupt(os.path.join(ckpts, step), "metadata")
    before = tree_digest(workdir)
    proc = cli.run(workdir, *PRETRAIN)
    _one_line(proc, 2, f"{ckpts}: no checkpoint can be read (steps 8, 6;")
    _assert_kept(before, workdir)  # nothing moved, nothing deleted
    assert not os.path.exists(os.path.join(workdir, "pretrain", "unreadable_checkpoints"))


# ------------------------------------------------------------------ SIGTERM


@pytest.mark.slow
def test_sigterm_as_a_stage_logs_its_last_step(cli, base, tmp_path):
    """The SIGTERM lands after the loop's last check (its last metrics line is written): the
    stage still finishes and saves (DONE, export), the next stage does not start, the run
    ends with 143; the same command then runs the rest."""
    workdir = _copy(base, tmp_path / "run", drop=("pretrain",))
    before = tree_digest(workdir)
    command = ("--config.stages=world,tokenizer,pretrain,sft", "--config.pretrain.num_steps=8",
               "--config.pretrain.checkpoint_every=2", "--config.sft.num_steps=2")  # fmt: skip
    proc = cli.start(workdir, *command)
    try:
        assert wait_for_logged_step(proc, workdir, "pretrain", 8), "ended before step 8"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    proc.stderr = err
    _one_line(proc, 143, "stage pretrain finished; stopped by SIGTERM before stage sft started")
    assert os.path.exists(os.path.join(workdir, "pretrain", "DONE"))
    assert not os.path.exists(os.path.join(workdir, "sft"))
    # A stage finished under a new config (sft added): DIR/config.json is that config now,
    # and the earlier one is kept beside it as config.<time>.json (docs/design.md).
    kept = [n for n in os.listdir(workdir) if re.fullmatch(r"config\.[\d-]+\.json", n)]
    assert len(kept) == 1, os.listdir(workdir)
    _assert_kept(before, workdir, moved={"config.json": kept[0]})
    proc = cli.run(workdir, *command, expect=0)
    assert "stage pretrain: finished earlier, skipped" in proc.stderr
    assert os.path.exists(os.path.join(workdir, "sft", "DONE"))
    assert_params_equal(
        exported_params(os.path.join(workdir, "pretrain", "export")),
        exported_params(os.path.join(base, "pretrain", "export")),
        "pretraining that received a SIGTERM at its end",
    )


# ------------------------------------------------------------------ a full disk


def _resumes_to_the_reference(cli, base, workdir, step: int) -> None:
    """The last good checkpoint loads: the same command on a disk with room resumes from it
    and ends with the uninterrupted run's export."""
    proc = cli.run(workdir, *PRETRAIN, expect=0)
    assert f"resumed from step {step}" in proc.stderr
    assert_params_equal(
        exported_params(os.path.join(workdir, "pretrain", "export")),
        exported_params(os.path.join(base, "pretrain", "export")),
        f"resumed from step {step} after a full disk",
    )


FREE = r"\([\d.]+ [KMGT]?B free\)"


@pytest.mark.slow
def test_disk_full_while_saving(cli, base, tmp_path):
    workdir = _copy(base, tmp_path / "run", drop=("pretrain",))
    before = tree_digest(workdir)
    ckpts = os.path.join(workdir, "pretrain", "checkpoints")
    proc = cli.run(workdir, *PRETRAIN, fault=("enospc", f"{ckpts}/4"))
    last = _one_line(proc, 2)
    assert re.fullmatch(
        re.escape(f"error: {ckpts}/4: no space left on device while saving the checkpoint of "
                  "step 4 ") + FREE + re.escape("; checkpoints: step 2, the newest saved, is intact"),
        last,
    ), last  # fmt: skip
    _assert_kept(before, workdir)
    assert sorted(n for n in os.listdir(ckpts) if n.isdigit()) == ["2"]
    _resumes_to_the_reference(cli, base, workdir, 2)


@pytest.mark.slow
def test_disk_full_while_saving_real_mount(cli, base, tmp_path):
    """A real full disk: a tmpfs with room for the inputs, the dataset and about one
    checkpoint. Orbax's own threads fail too (tensorstore's writes); still one line."""

    def size(path) -> int:
        return sum(os.path.getsize(os.path.join(r, n)) for r, _, ns in os.walk(path) for n in ns)

    need = sum(size(os.path.join(base, s)) for s in ("world", "tokenizer", "tfds"))
    need += size(os.path.join(base, "pretrain", "checkpoints", "8")) + 256 * 1024
    mnt = tmp_path / "disk"
    _mount_tmpfs(mnt, f"size={need // 1024 + 1}k")
    try:
        workdir = _copy(base, mnt / "run", drop=("pretrain", "tfds"))
        before = tree_digest(workdir)
        proc = cli.run(workdir, *PRETRAIN)
        last = _one_line(proc, 2, "no space left on device", " free")
        assert re.search(FREE, last), last
        _assert_kept(before, workdir)
        saved = re.search(r"step (\d+), the newest saved, is intact", last)
        assert saved or last.endswith("none saved yet"), last
        moved = shutil.copytree(workdir, tmp_path / "moved")  # a disk with room
    finally:
        _umount(mnt)
    if saved:
        _resumes_to_the_reference(cli, base, str(moved), int(saved.group(1)))


def test_the_table_in_the_module_doc_names_real_tests():
    names = set(re.findall(r"\b(test_\w+)", __doc__))
    names.discard("test_stages_restarts")
    assert names <= set(globals()), names - set(globals())
