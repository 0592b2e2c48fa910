"""A measured check on the predictor for policy `auto`.

The scheduler decides from predicted costs; when a prediction is wrong (a profile from a quieter
moment, host contention the profile never saw), offloading can lose throughput. The guard watches
what decode iterations really did. Offloading is stopped when iterations that used the CPU took
much longer than predicted (the predictor cannot be trusted with them), or when they produced
tokens more slowly than iterations that did not. `auto` then places no new work on the CPU for a
while (requests already there come back to the GPU), then tries again with fresh measurements.
"""

from __future__ import annotations

MIN_SAMPLES = 16  # decode iterations of each kind before the rates are compared
EWMA_WEIGHT = 0.1  # weight of the newest iteration in each rate
BACKOFF_STEPS = 512  # iterations without new offloading after it was measured to lose
MAX_UNDERESTIMATE = 1.25  # measured / predicted time of offloaded iterations still trusted


class OffloadGuard:
    def __init__(self, margin: float = 0.03) -> None:
        self.margin = margin
        self._rates: dict[bool, float] = {}
        self._samples = {False: 0, True: 0}
        self._underestimate: float | None = None  # EWMA of measured / predicted, offloaded
        self._blocked_until = -1

    def record(self, step: int, used_cpu: bool, num_tokens: int, elapsed_s: float,
               predicted_s: float) -> None:
        """One pure decode iteration (prefill iterations would skew the token rate)."""
        if elapsed_s <= 0:
            return
        self._rates[used_cpu] = self._ewma(self._rates.get(used_cpu), num_tokens / elapsed_s)
        self._samples[used_cpu] += 1
        if used_cpu and predicted_s > 0:
            self._underestimate = self._ewma(self._underestimate, elapsed_s / predicted_s)
        if self._samples[True] < MIN_SAMPLES:
            return
        mispredicted = self._underestimate is not None and self._underestimate > MAX_UNDERESTIMATE
        slower = self._samples[False] >= MIN_SAMPLES and self._rates[True] < self._rates[False] * (
            1 - self.margin
        )
        if mispredicted or slower:
            self._blocked_until = step + BACKOFF_STEPS
            self._rates.pop(True)  # retry later with fresh measurements
            self._samples[True] = 0
            self._underestimate = None

    @staticmethod
    def _ewma(old: float | None, value: float) -> float:
        return value if old is None else (1 - EWMA_WEIGHT) * old + EWMA_WEIGHT * value

    def allows_offload(self, step: int) -> bool:
        return step >= self._blocked_until

    def snapshot(self) -> dict[str, float | int | None]:
        return {
            "gpu_only_tokens_per_s": self._rates.get(False),
            "offload_tokens_per_s": self._rates.get(True),
            "offload_measured_over_predicted": self._underestimate,
            "blocked_until_step": self._blocked_until,
        }
