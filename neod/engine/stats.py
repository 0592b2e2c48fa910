"""Rolling iteration statistics: what the scheduler chose, what it predicted, what it took."""

from __future__ import annotations

from collections import deque
from typing import Any

from neod.sched import Plan

WINDOW = 512  # iterations kept for the percentiles and the prediction error


class EngineStats:
    def __init__(self) -> None:
        self.num_iterations = 0
        self.num_pipelined = 0
        self.num_tokens = 0
        self.busy_s = 0.0
        self.num_cpu_decodes = 0
        self.cpu_busy_s = 0.0
        self._recent: deque[tuple[float, float, bool, int]] = deque(maxlen=WINDOW)

    def record_iteration(
        self, plan: Plan, elapsed_s: float, num_seqs: int, cpu_busy_s: float
    ) -> None:
        self.busy_s += elapsed_s
        self.cpu_busy_s += cpu_busy_s
        self.num_iterations += 1
        self.num_pipelined += plan.pipelined
        self.num_tokens += num_seqs
        self.num_cpu_decodes += len(plan.decode_cpu_b0) + len(plan.decode_cpu_b1)
        self._recent.append((elapsed_s, plan.predicted_iter_s, plan.pipelined, num_seqs))

    def snapshot(self) -> dict[str, Any]:
        recent = list(self._recent)
        measured = sorted(r[0] for r in recent)
        errors = sorted(abs(r[1] - r[0]) / r[0] for r in recent if r[0] > 0 and r[1] > 0)

        def median(values: list[float]) -> float | None:
            return values[len(values) // 2] if values else None

        return {
            "total": self.num_iterations,
            "pipelined": self.num_pipelined,
            "tokens": self.num_tokens,
            "last_mode": ("pipelined" if recent[-1][2] else "sequential") if recent else None,
            "median_iter_ms": None if not measured else median(measured) * 1e3,
            "median_prediction_error": median(errors),
            "mean_cpu_decodes": self.num_cpu_decodes / max(1, self.num_iterations),
            "cpu_busy_share": self.cpu_busy_s / self.busy_s if self.busy_s else None,
        }
