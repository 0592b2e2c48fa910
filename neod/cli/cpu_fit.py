"""One line on how the CPU program's time fits its prediction, for `neoctl status` and the
throughput benchmark; apart from the CLI's other modules so that the benchmark imports no client
(no pyzmq on a bare GPU host)."""

from __future__ import annotations

from typing import Any


def cpu_fit_text(fit: list[dict[str, Any]]) -> str:
    """The CPU program's measured over predicted time by CPU batch size (neod.engine.stats)."""
    return "measured over predicted CPU time, by CPU decodes: " + ", ".join(
        f"{b['decodes']}: {b['median_ratio']:.2f}x ({b['iterations']})" for b in fit
    )
