"""The daemon's own serving metrics for `neoctl status`: counts, throughput and latency percentiles.

Latencies are kept for the most recent finished requests (a bounded ring), throughput over the last
few seconds (per-second buckets), so memory stays constant however long the daemon runs. Everything
here is touched only from the event loop.
"""

from __future__ import annotations

import collections
import time
from typing import Any

RECENT_REQUESTS = 2000
RATE_WINDOW_S = 10


def percentiles(values: list[float], points: tuple[int, ...] = (50, 90, 99)) -> dict[str, float]:
    """Nearest-rank percentiles, rounded to 0.01; empty input gives an empty dict."""
    if not values:
        return {}
    ordered = sorted(values)
    last = len(ordered) - 1
    return {f"p{p}": round(ordered[min(last, int(p / 100 * len(ordered)))], 2) for p in points}


class Metrics:
    def __init__(self) -> None:
        self.started = time.monotonic()
        self.counts: collections.Counter[str] = collections.Counter()
        self._ttft_ms: collections.deque[float] = collections.deque(maxlen=RECENT_REQUESTS)
        self._tpot_ms: collections.deque[float] = collections.deque(maxlen=RECENT_REQUESTS)
        self._queue_ms: collections.deque[float] = collections.deque(maxlen=RECENT_REQUESTS)
        self._tokens_per_second: collections.deque[list[int]] = collections.deque(
            maxlen=RATE_WINDOW_S + 1)  # [second, tokens]

    def count(self, what: str, n: int = 1) -> None:
        self.counts[what] += n

    def tokens(self, n: int, now: float) -> None:
        second = int(now)
        if self._tokens_per_second and self._tokens_per_second[-1][0] == second:
            self._tokens_per_second[-1][1] += n
        else:
            self._tokens_per_second.append([second, n])
        self.counts["output_tokens"] += n

    def finished(self, queue_ms: float, ttft_ms: float | None, tpot_ms: float | None) -> None:
        self._queue_ms.append(queue_ms)
        if ttft_ms is not None:
            self._ttft_ms.append(ttft_ms)
        if tpot_ms is not None:
            self._tpot_ms.append(tpot_ms)

    def tokens_per_s(self, now: float) -> float:
        """Output tokens per second over the last full seconds of the window."""
        current = int(now)
        total = sum(n for second, n in self._tokens_per_second
                    if current - RATE_WINDOW_S <= second < current)
        return round(total / RATE_WINDOW_S, 1)

    def snapshot(self, now: float) -> dict[str, Any]:
        return {
            "uptime_s": round(now - self.started, 1),
            "tokens_per_s": self.tokens_per_s(now),
            "ttft_ms": percentiles(list(self._ttft_ms)),
            "tpot_ms": percentiles(list(self._tpot_ms)),
            "queue_ms": percentiles(list(self._queue_ms)),
            "counts": dict(sorted(self.counts.items())),
        }
