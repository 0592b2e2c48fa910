"""A measured check on the predictor for policy `auto`.

The scheduler decides from predicted costs; when a prediction is wrong (a profile from a quieter
moment, host contention the profile never saw), offloading can lose throughput. The guard compares
what decode iterations really produced: tokens per second of those that used the CPU against those
that did not. When offloading is measured to lose, `auto` stops placing new work on the CPU for a
while (requests already there still finish), then tries again with fresh measurements.
"""

from __future__ import annotations

MIN_SAMPLES = 16  # decode iterations of each kind before the rates are compared
EWMA_WEIGHT = 0.1  # weight of the newest iteration in each rate
BACKOFF_STEPS = 512  # iterations without new offloading after it was measured to lose


class OffloadGuard:
    def __init__(self, margin: float = 0.03) -> None:
        self.margin = margin
        self._rates: dict[bool, float] = {}
        self._samples = {False: 0, True: 0}
        self._blocked_until = -1

    def record(self, step: int, used_cpu: bool, num_tokens: int, elapsed_s: float) -> None:
        """One pure decode iteration (prefill iterations would skew the token rate)."""
        if elapsed_s <= 0:
            return
        rate = num_tokens / elapsed_s
        old = self._rates.get(used_cpu)
        new = rate if old is None else (1 - EWMA_WEIGHT) * old + EWMA_WEIGHT * rate
        self._rates[used_cpu] = new
        self._samples[used_cpu] += 1
        if min(self._samples.values()) >= MIN_SAMPLES and self._rates[True] < self._rates[False] * (
            1 - self.margin
        ):
            self._blocked_until = step + BACKOFF_STEPS
            self._rates.pop(True)  # retry later with fresh measurements
            self._samples[True] = 0

    def allows_offload(self, step: int) -> bool:
        return step >= self._blocked_until

    def snapshot(self) -> dict[str, float | int | None]:
        return {
            "gpu_only_tokens_per_s": self._rates.get(False),
            "offload_tokens_per_s": self._rates.get(True),
            "blocked_until_step": self._blocked_until,
        }
