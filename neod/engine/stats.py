"""Rolling iteration statistics: what the scheduler chose, what it predicted, what it took."""

from __future__ import annotations

from collections import deque
from typing import Any

from neod.sched import Plan

WINDOW = 512  # iterations kept for the percentiles and the prediction error
# CPU batch sizes (first, last; None: no last) binned for the CPU program's measured over predicted
# time: the corrections are fitted over all sizes at once, so a misfit shows as bins on either
# side of 1.
CPU_BINS = ((1, 1), (2, 3), (4, 7), (8, 15), (16, 31), (32, None))


class EngineStats:
    def __init__(self) -> None:
        self.num_iterations = 0
        self.num_pipelined = 0
        self.num_tokens = 0
        self.busy_s = 0.0
        self.num_cpu_decodes = 0
        self.cpu_busy_s = 0.0
        self._recent: deque[tuple[float, float, bool, int]] = deque(maxlen=WINDOW)
        # (CPU decodes, measured s, predicted s) of recent iterations whose CPU program decoded
        self._cpu_recent: deque[tuple[int, float, float]] = deque(maxlen=WINDOW)
        # The engine thread's own time per recent iteration around the timed forward and sampling
        # (scheduling, applying the plan, building the batches, outputs): no prediction has it.
        self._host_recent: deque[float] = deque(maxlen=WINDOW)
        self._planned_ahead: deque[bool] = deque(maxlen=WINDOW)  # plan made during the step before
        # Every iteration's plan and times, for a benchmark to study offline; None: not kept.
        self.trace: list[dict[str, Any]] | None = None

    def record_host(self, host_s: float, planned_ahead: bool = False, ahead_s: float = 0.0) -> None:
        """planned_ahead: the step's plan was made during the step before (not in host_s);
        ahead_s: the time this step spent planning the next one while the devices computed."""
        self._host_recent.append(host_s)
        self._planned_ahead.append(planned_ahead)
        if self.trace:
            self.trace[-1]["host_ms"] = host_s * 1e3
            self.trace[-1]["planned_ahead"] = planned_ahead
            self.trace[-1]["ahead_ms"] = ahead_s * 1e3

    def record_iteration(
        self,
        plan: Plan,
        elapsed_s: float,
        num_seqs: int,
        cpu_busy_s: float,
        issue_s: float,
        cpu_work_s: float = 0.0,
        cpu_correction: tuple[float, float] = (1.0, 0.0),
    ) -> None:
        """cpu_busy_s: the time some CPU step computed; cpu_work_s: the pool's computing time
        over its size (the two differ by the workers' idle time within steps); cpu_correction:
        the (scale, fixed seconds) the plan's CPU time was predicted with, so that a trace gives
        back each CPU run's profiled time and another correction can be replayed on it."""
        self.busy_s += elapsed_s
        self.cpu_busy_s += cpu_busy_s
        self.num_iterations += 1
        self.num_pipelined += plan.pipelined
        self.num_tokens += num_seqs
        num_cpu = len(plan.decode_cpu_b0) + len(plan.decode_cpu_b1)
        self.num_cpu_decodes += num_cpu
        self._recent.append((elapsed_s, plan.predicted_iter_s, plan.pipelined, num_seqs))
        if num_cpu and not plan.prefill_cpu and cpu_busy_s > 0 and plan.predicted_cpu_s > 0:
            self._cpu_recent.append((num_cpu, cpu_busy_s, plan.predicted_cpu_s))
        if self.trace is not None:
            record = _trace_record(plan, elapsed_s, cpu_busy_s, cpu_work_s, issue_s)
            record["cpu_scale"], fixed_s = cpu_correction
            record["cpu_fixed_us"] = fixed_s * 1e6
            self.trace.append(record)

    def snapshot(self) -> dict[str, Any]:
        recent = list(self._recent)
        measured = sorted(r[0] for r in recent)
        errors = sorted(abs(r[1] - r[0]) / r[0] for r in recent if r[0] > 0 and r[1] > 0)

        return {
            "total": self.num_iterations,
            "pipelined": self.num_pipelined,
            "tokens": self.num_tokens,
            "last_mode": ("pipelined" if recent[-1][2] else "sequential") if recent else None,
            "median_iter_ms": None if not measured else _median(measured) * 1e3,
            "median_host_ms": (
                None if not self._host_recent else _median(sorted(self._host_recent)) * 1e3
            ),
            "median_prediction_error": _median(errors),
            "planned_ahead_share": (
                sum(self._planned_ahead) / len(self._planned_ahead) if self._planned_ahead else None
            ),
            "mean_cpu_decodes": self.num_cpu_decodes / max(1, self.num_iterations),
            "cpu_busy_share": self.cpu_busy_s / self.busy_s if self.busy_s else None,
            "cpu_fit": self._cpu_fit(),
        }

    def _cpu_fit(self) -> list[dict[str, Any]]:
        """Per bin of CPU batch sizes: iterations and the median of measured over predicted CPU
        program time, the prediction carrying the correction of its moment."""
        fit = []
        for first, last in CPU_BINS:
            ratios = sorted(measured / predicted for n, measured, predicted in self._cpu_recent
                            if first <= n and (last is None or n <= last))
            if ratios:
                fit.append({"decodes": _bin_label(first, last), "iterations": len(ratios),
                            "median_ratio": _median(ratios)})
        return fit


def _bin_label(first: int, last: int | None) -> str:
    if last is None:
        return f"{first}+"
    return str(first) if last == first else f"{first}-{last}"


def _median(values: list[float]) -> float | None:
    """Of sorted values."""
    return values[len(values) // 2] if values else None


def _trace_record(
    plan: Plan, elapsed_s: float, cpu_busy_s: float, cpu_work_s: float, issue_s: float
) -> dict[str, Any]:
    return {
        "pipelined": plan.pipelined,
        "sends_home": plan.sends_home,
        "prefill_gpu": len(plan.prefill_gpu),
        "prefill_cpu": len(plan.prefill_cpu),
        "chunked": len(plan.chunked),
        "decode_gpu": len(plan.decode_gpu),
        "decode_cpu_b0": len(plan.decode_cpu_b0),
        "decode_cpu_b1": len(plan.decode_cpu_b1),
        "swap_in": len(plan.swap_in),
        "swap_out": len(plan.swap_out),
        "cpu_batches": plan.cpu_batches,
        "measured_ms": elapsed_s * 1e3,
        "predicted_ms": plan.predicted_iter_s * 1e3,
        "gpu_alone_ms": plan.predicted_gpu_alone_s * 1e3,
        "predicted_cpu_ms": plan.predicted_cpu_s * 1e3,
        "cpu_busy_ms": cpu_busy_s * 1e3,
        "cpu_work_ms": cpu_work_s * 1e3,
        "issue_ms": issue_s * 1e3,
    }
