"""Host-side helpers for stage drivers: metrics files, progress lines, NaN guard, SIGTERM.

Not for jitted code (see train_lib.py). Only process 0 writes files or prints progress;
every helper is an object holding its own state (no module-level mutable state).
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Mapping
from typing import Any, TextIO

import jax
import numpy as np
from jax.experimental import multihost_utils

from instructrl.errors import InputError

METRICS_FILE = "metrics.jsonl"


class NonFiniteError(FloatingPointError):
    """A logged metric was NaN or inf; the run must stop (the message names step and metric)."""


def check_finite(metrics: Mapping[str, Any], step: int) -> None:
    """Raises NonFiniteError("step 123: loss is nan") if any metric is NaN/inf.

    Call it on logging steps and before every checkpoint save, on metrics already fetched
    for logging. Checking every step would need a device->host sync per step and stall
    the asynchronous dispatch; a NaN in the params does not heal, so it still shows at the
    next check, and checking before saves keeps it out of checkpoints.
    """
    bad = []
    for name, value in metrics.items():
        arr = np.asarray(jax.device_get(value))
        if arr.dtype.kind in "fc" and not np.all(np.isfinite(arr)):
            bad.append((name, "nan" if np.any(np.isnan(arr)) else "inf"))
    if bad:
        bad.sort(key=lambda kv: kv[0] != "loss")  # name the loss first when it is affected
        name, kind = bad[0]
        more = f" (also non-finite: {', '.join(n for n, _ in bad[1:])})" if len(bad) > 1 else ""
        raise NonFiniteError(f"step {step}: {name} is {kind}{more}")


def _to_python(name: str, value: Any) -> float | int:
    arr = np.asarray(value)
    if arr.size != 1:
        raise ValueError(f"metric {name!r}: expected a scalar, got shape {arr.shape}")
    return arr.reshape(()).item()


class MetricsWriter:
    """Appends `{"step": s, **metrics}` lines to <workdir>/metrics.jsonl and TensorBoard.

    resume_step: when a run resumes from a checkpoint at this step, lines logged after it by
    the interrupted run are dropped (they will be logged again), and TensorBoard purges
    them too. Only process 0 writes (enabled=None means "am I process 0").
    """

    def __init__(
        self, workdir: str, *, resume_step: int | None = None, enabled: bool | None = None
    ):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self.path = os.path.join(workdir, METRICS_FILE)
        self._file: TextIO | None = None
        self._tb = None
        if not self.enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        if resume_step is not None and os.path.exists(self.path):
            self._truncate_after(resume_step)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())
        purge = None if resume_step is None else resume_step + 1
        self._tb = _EventFile(workdir, purge_step=purge)

    def _truncate_after(self, resume_step: int) -> None:
        with open(self.path, encoding="utf-8") as f:
            lines = f.read().split("\n")
        kept = []
        for lineno, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                if lineno == len(lines):  # a line cut short by a kill mid-write
                    break
                raise InputError(f"{self.path}:{lineno}: not valid JSON") from None
            if record.get("step", -1) <= resume_step:
                kept.append(line)
        tmp = self.path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write("".join(line + "\n" for line in kept))
        os.replace(tmp, self.path)

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Fetches `metrics` (device arrays or numbers) to the host and writes one line."""
        if not self.enabled:
            return
        values = {k: _to_python(k, v) for k, v in jax.device_get(dict(metrics)).items()}
        try:
            self._file.write(json.dumps({"step": int(step), **values}) + "\n")
            self._file.flush()
        except OSError as e:  # a write to an open file names no file: name it
            e.filename = e.filename or self.path
            raise
        self._tb.write(int(step), values)

    def close(self) -> None:
        try:
            if self._file is not None:
                self._file.close()
        except OSError as e:
            e.filename = e.filename or self.path
            raise
        finally:
            self._file = None
            if self._tb is not None:
                tb, self._tb = self._tb, None
                tb.close()

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _EventFile:
    """TensorBoard scalars, written and flushed in the calling thread (tensorboardX's
    SummaryWriter writes from a thread of its own, which dies on a full disk and then
    blocks the next call forever). `purge_step` hides events of an interrupted run from
    that step on, as SummaryWriter's does."""

    def __init__(self, logdir: str, purge_step: int | None = None):
        from tensorboardX.event_file_writer import EventsWriter  # heavy; the writing process only
        from tensorboardX.proto.event_pb2 import Event, SessionLog
        from tensorboardX.summary import scalar

        self._event, self._scalar = Event, scalar
        # The pid keeps a resumed run's file apart from one started in the same second.
        self._writer = EventsWriter(os.path.join(logdir, "events"), f".{os.getpid()}")
        self.path = self._writer._file_name
        if purge_step is not None:
            self._put([Event(step=purge_step, session_log=SessionLog(status=SessionLog.START))])

    def _put(self, events) -> None:
        try:
            for event in events:
                event.wall_time = time.time()
                self._writer.write_event(event)
            self._writer.flush()
        except OSError as e:
            e.filename = e.filename or self.path
            raise

    def write(self, step: int, values: Mapping[str, float]) -> None:
        self._put([self._event(step=step, summary=self._scalar(k, v)) for k, v in values.items()])

    def close(self) -> None:
        try:
            self._writer.close()
        except OSError as e:
            e.filename = e.filename or self.path
            raise


def _format_seconds(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    s = int(seconds)
    h, m = divmod(s, 3600)
    return f"{h}h{m // 60:02d}m" if h else f"{m // 60}m{m % 60:02d}s"


class Progress:
    """Prints "step 120/1000 (12%) | 3.4 steps/s | 870 tokens/s | ETA 4m20s" every few seconds
    (prefixed by "label: " when given).

    A plain line (no carriage returns) so it stays readable in log files. Rates are
    measured over the interval since the previous line, and timing starts at the first
    update so compilation is not counted. Silent on processes other than 0.
    """

    def __init__(
        self,
        total_steps: int,
        *,
        tokens_per_step: int | None = None,
        label: str = "",
        interval_s: float = 5.0,
        enabled: bool | None = None,
        stream: TextIO | None = None,
        clock=time.monotonic,
    ):
        self.total_steps = total_steps
        self.tokens_per_step = tokens_per_step
        self.label = label
        self.interval_s = interval_s
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self.stream = stream
        self._clock = clock
        self._last: tuple[float, int] | None = None

    def update(self, step: int) -> str | None:
        """Call after each step with the number of steps done; returns the line printed."""
        if not self.enabled:
            return None
        now = self._clock()
        if self._last is None:
            self._last = (now, step)
            return None
        t0, s0 = self._last
        if now - t0 < self.interval_s and step < self.total_steps:
            return None
        rate = (step - s0) / max(now - t0, 1e-9)
        eta = (self.total_steps - step) / rate if rate > 0 else float("inf")
        pct = 100.0 * step / max(self.total_steps, 1)
        parts = [f"step {step}/{self.total_steps} ({pct:.0f}%)", f"{rate:.2f} steps/s"]
        if self.tokens_per_step:
            parts.append(f"{rate * self.tokens_per_step:,.0f} tokens/s")
        parts.append(f"ETA {_format_seconds(eta)}")
        line = (f"{self.label}: " if self.label else "") + " | ".join(parts)
        print(line, file=self.stream or sys.stderr, flush=True)
        self._last = (now, step)
        return line


class TerminationSignal:
    """Context manager that records SIGTERM (a preemption notice) instead of dying.

        with TerminationSignal() as term:
            for step in ...:
                ...
                if term.should_stop(step):
                    ckpt.save(step, state, force=True); break

    The previous handlers are restored on exit. Must be entered in the main thread. Nested
    ones share what they saw: an inner one (a stage's training loop) starts with a signal
    the outer one (main's, around all stages) already received, and passes on the signals
    it receives, so a SIGTERM that arrives after a loop's last check is still seen by main.
    """

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM,)):
        self.signals = signals
        self.received = False
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}
        self._outer: TerminationSignal | None = None

    def _handle(self, signum, frame) -> None:
        self.received = True
        self.signum = signum
        if self._outer is not None:
            self._outer._handle(signum, frame)

    def __enter__(self) -> TerminationSignal:
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("TerminationSignal must be entered in the main thread")
        self._previous = {s: signal.signal(s, self._handle) for s in self.signals}
        outers = [getattr(h, "__self__", None) for h in self._previous.values()]
        self._outer = next((o for o in outers if isinstance(o, TerminationSignal)), None)
        if self._outer is not None and self._outer.received:
            self.received, self.signum = True, self._outer.signum
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}
        self._outer = None

    def should_stop(self, step: int, *, sync_every: int = 1) -> bool:
        """True once a signal arrived (on any process: all processes must stop together).

        With several processes the flags are combined by a host all-gather, every
        `sync_every` steps (so all processes take the same decision at the same step).
        """
        if jax.process_count() == 1:
            return self.received
        if step % sync_every:
            return False
        flags = multihost_utils.process_allgather(np.int32(self.received))
        return bool(np.any(flags))
