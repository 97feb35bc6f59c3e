"""Clocks shared by the benchmarks: one blocking call, and runs alternated rep by rep.

Every figure is a (wall, process CPU) pair. On a shared machine the CPU time (all threads of
this process) is the steadier figure; alternating the runs of a comparison rep by rep exposes
both sides to the same background load, so their ratio is fair even when the machine is not
quiet.
"""

from __future__ import annotations

import resource
import statistics
import time
from collections.abc import Callable, Mapping


def timed(fn: Callable[[], object]) -> tuple[float, float]:
    """(wall seconds, this process's CPU seconds) of one blocking call."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def interleaved_medians(
    runs: Mapping[str, Callable[[], object]], reps: int
) -> dict[str, dict[str, float]]:
    """{name: {"wall_s", "cpu_s"}}: medians over `reps` of each blocking `run()`, calling the
    runs in turn, rep by rep."""
    return interleaved_within(runs, reps)[0]


def interleaved_within(
    runs: Mapping[str, Callable[[], object]], reps: int, budget_s: float | None = None
) -> tuple[dict[str, dict[str, float]], int]:
    """(interleaved_medians, reps done): as interleaved_medians, but once `budget_s` seconds
    have passed no further rep starts (at least one always runs)."""
    if reps < 1:
        raise ValueError(f"interleaved_medians: reps={reps}, need at least 1")
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in runs}
    start, done = time.perf_counter(), 0
    for _ in range(reps):
        for name, run in runs.items():
            times[name].append(timed(run))
        done += 1
        if budget_s is not None and time.perf_counter() - start > budget_s:
            break
    medians = {
        name: {
            "wall_s": statistics.median(w for w, _ in t),
            "cpu_s": statistics.median(c for _, c in t),
        }
        for name, t in times.items()
    }
    return medians, done


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far, MiB (ru_maxrss is KiB on Linux)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
