"""experiments/benchmarks/timing.py: the clocks every benchmark shares."""

from __future__ import annotations

import time

import pytest

from experiments.benchmarks import timing


def test_interleaved_medians_alternate_the_runs_and_take_medians():
    calls = []
    sleeps = {"a": [0.2, 0.001, 0.002], "b": [0.0, 0.0, 0.02]}

    def run(name):
        def f():
            calls.append(name)
            time.sleep(sleeps[name][sum(c == name for c in calls) - 1])

        return f

    out = timing.interleaved_medians({"a": run("a"), "b": run("b")}, reps=3)
    assert calls == ["a", "b", "a", "b", "a", "b"]  # rep by rep, not all of a then all of b
    assert set(out) == {"a", "b"} and all(set(v) == {"wall_s", "cpu_s"} for v in out.values())
    # medians: a's middle sleep is 2 ms (not the 200 ms outlier), b's is 0 ms
    assert 0.0015 <= out["a"]["wall_s"] < 0.1
    assert out["b"]["wall_s"] < 0.1
    assert out["a"]["cpu_s"] < out["a"]["wall_s"]  # sleeping costs no CPU


def test_timed_and_errors():
    wall, cpu = timing.timed(lambda: time.sleep(0.01))
    assert wall >= 0.009 and 0 <= cpu < wall
    with pytest.raises(ValueError, match="reps=0"):
        timing.interleaved_medians({"a": lambda: None}, reps=0)
    assert timing.peak_rss_mib() > 10  # a Python process with numpy/pytest loaded
