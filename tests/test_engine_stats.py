"""The engine's rolling statistics: the CPU program's fit, binned by CPU batch size, and the
engine's own time per iteration."""

from __future__ import annotations

import pytest

from neod.engine.stats import EngineStats
from neod.sched import Plan


def _iteration(stats: EngineStats, num_cpu: int, measured_s: float, prefill_cpu: bool = False):
    plan = Plan(decode_cpu_b0=list(range(num_cpu)), predicted_cpu_s=1e-3, predicted_iter_s=2e-3)
    if prefill_cpu:
        plan.prefill_cpu = [99]
    stats.record_iteration(plan, 2e-3, num_cpu + 1, measured_s, 0.0)


def test_cpu_fit_bins_by_cpu_decodes_and_takes_each_bins_median():
    stats = EngineStats()
    for num_cpu, measured in [(1, 2.2e-3), (1, 1.8e-3), (1, 2.0e-3), (2, 1.5e-3), (3, 1.3e-3),
                              (9, 1.0e-3), (40, 0.9e-3), (33, 0.7e-3)]:
        _iteration(stats, num_cpu, measured)
    fit = {b["decodes"]: (b["iterations"], round(b["median_ratio"], 6))
           for b in stats.snapshot()["cpu_fit"]}
    assert fit == {"1": (3, 2.0), "2-3": (2, 1.5), "8-15": (1, 1.0), "32+": (2, 0.9)}


def test_cpu_fit_leaves_out_iterations_without_a_comparable_cpu_program():
    stats = EngineStats()
    _iteration(stats, 0, 0.0)  # nothing on the CPU
    _iteration(stats, 4, 3e-3, prefill_cpu=True)  # prompts' KV stores: not in the prediction
    _iteration(stats, 4, 0.0)  # no CPU time measured
    assert stats.snapshot()["cpu_fit"] == []
    _iteration(stats, 4, 3e-3)
    assert stats.snapshot()["cpu_fit"] == [{"decodes": "4-7", "iterations": 1, "median_ratio": 3.0}]


def test_host_time_per_iteration_is_the_median_of_the_recent_ones():
    stats = EngineStats()
    assert stats.snapshot()["median_host_ms"] is None
    for host_s in (0.4e-3, 3e-3, 0.5e-3):  # one slow pass (a log line, a GC) does not move it
        stats.record_host(host_s)
    assert stats.snapshot()["median_host_ms"] == 0.5


def test_the_share_of_recent_plans_made_ahead():
    stats = EngineStats()
    assert stats.snapshot()["planned_ahead_share"] is None
    for ahead in (False, True, True, True):
        stats.record_host(0.5e-3, ahead, 0.8e-3)
    assert stats.snapshot()["planned_ahead_share"] == 0.75


def test_the_trace_keeps_both_measures_of_the_cpu_program():
    stats = EngineStats()
    stats.trace = []
    plan = Plan(decode_cpu_b0=[1, 2], predicted_cpu_s=1e-3, predicted_iter_s=2e-3)
    stats.record_iteration(plan, 2e-3, 3, 1.2e-3, 0.1e-3, 0.9e-3, (0.8, 50e-6))
    (record,) = stats.trace
    assert record["cpu_busy_ms"] == 1.2 and record["cpu_work_ms"] == 0.9
    assert record["predicted_cpu_ms"] == 1.0
    # The correction the prediction carried: 0.8 x profiled + 50 us per CPU run.
    assert record["cpu_scale"] == 0.8 and record["cpu_fixed_us"] == pytest.approx(50.0)
