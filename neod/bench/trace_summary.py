"""Where a throughput run's time went, from its per-iteration trace (`throughput --trace-out`).

    python -m neod.bench.trace_summary trace.json [--splits 8]

Per policy: the iterations by kind (with prompts, with swaps, pipelined, sequential with CPU
decodes, GPU only), each kind's share of the run's time and its tokens/s (where it had CPU
decodes, also against the same iterations' GPU decodes alone, as the offload guard judges);
then, over the pipelined pure-decode iterations, how they ran against their prediction, how busy
the CPU pool was and against its own prediction, and what share of each the engine thread spent
issuing it; and the most frequent splits (GPU decodes, CPU decodes in sub-batch 0 and 1) with
their medians; and where `auto`'s offload guard, fed the trace's iterations, would stop
offloading. It answers "was it the GPU, the CPU, the hand-off or Python" without rerunning
anything.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
from collections import Counter
from typing import Any

KINDS = ("prefill", "swap", "pipelined", "sequential+cpu", "gpu")


def kind(record: dict[str, Any]) -> str:
    if record["prefill_gpu"] or record["prefill_cpu"]:
        return "prefill"
    if record["swap_in"] or record["swap_out"]:
        return "swap"
    if record["pipelined"]:
        return "pipelined"
    return "sequential+cpu" if record["decode_cpu_b0"] + record["decode_cpu_b1"] else "gpu"


def _tokens(record: dict[str, Any]) -> int:
    """Tokens sampled: every decode, and every prompt whose last chunk ran."""
    decodes = record["decode_gpu"] + record["decode_cpu_b0"] + record["decode_cpu_b1"]
    return decodes + record["prefill_gpu"] + record["prefill_cpu"] - record["chunked"]


def _cpu_decodes(record: dict[str, Any]) -> int:
    return record["decode_cpu_b0"] + record["decode_cpu_b1"]


def _over_gpu_alone(sums: list[float] | None, gpu_fit: float) -> float | None:
    """Token rate of iterations with CPU decodes over that of the same iterations without them:
    their predicted GPU-alone time, corrected as the guard corrects it (by how far GPU-only
    iterations ran from their predictions)."""
    if not sums or not sums[0] or not sums[3]:
        return None
    measured_ms, alone_ms, tokens, gpu_tokens = sums
    return (tokens / measured_ms) / (gpu_tokens / (alone_ms * gpu_fit))


def guard_stops(records: list[dict[str, Any]]) -> list[int]:
    """The iterations (1-based) at which `auto`'s offload guard, fed these iterations as the
    engine feeds it, would stop offloading: on any policy's trace, what the guard makes of it
    (after a stop the recorded run goes on as it ran)."""
    from neod.engine import guard as guard_module

    guard, stops = guard_module.OffloadGuard(), []
    quiet = guard_module.logger.level
    guard_module.logger.setLevel(logging.ERROR)  # a replayed stop is reported, not logged
    try:
        for step, r in enumerate(records, 1):
            if kind(r) == "prefill" or kind(r) == "swap":
                continue
            before = guard.snapshot()["stops"]
            guard.record(step, _tokens(r), r["measured_ms"] / 1e3, r["predicted_ms"] / 1e3,
                         r["decode_gpu"], r["gpu_alone_ms"] / 1e3,
                         chosen=not r.get("sends_home", False))  # fmt: skip
            if guard.snapshot()["stops"] > before:
                stops.append(step)
    finally:
        guard_module.logger.setLevel(quiet)
    return stops


STOP_WINDOW = 20  # iterations before a replayed stop whose gain it prints


def gain_before(records: list[dict[str, Any]], step: int, gpu_fit: float) -> float | None:
    """Over the GPU alone (as `_over_gpu_alone`), the iterations with CPU decodes among the
    STOP_WINDOW before iteration `step` (1-based): what a replayed stop judged."""
    sums = [0.0, 0.0, 0, 0]
    for r in records[max(0, step - STOP_WINDOW) : step]:
        if _cpu_decodes(r) and kind(r) not in ("prefill", "swap"):
            sums[0] += r["measured_ms"]
            sums[1] += r["gpu_alone_ms"]
            sums[2] += _tokens(r)
            sums[3] += _tokens(r) - _cpu_decodes(r)
    return _over_gpu_alone(sums, gpu_fit)


def _ratio(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def summarize(records: list[dict[str, Any]], num_splits: int = 8) -> dict[str, Any]:
    """One policy's trace: its kinds of iterations and its pipelined decode iterations."""
    spent = [r["measured_ms"] + r.get("host_ms", 0.0) for r in records]
    total_ms = sum(spent)
    kinds: dict[str, dict[str, float]] = {}
    # per kind, over its iterations with CPU decodes: measured ms, GPU-alone ms, tokens, tokens
    # without the CPU decodes
    offloaded: dict[str, list[float]] = {}
    for r, ms in zip(records, spent, strict=True):
        k = kinds.setdefault(kind(r), {"iterations": 0, "ms": 0.0, "measured_ms": 0.0,
                                       "predicted_ms": 0.0, "tokens": 0})  # fmt: skip
        k["iterations"] += 1
        k["ms"] += ms  # the engine's own time included
        k["measured_ms"] += r["measured_ms"]
        k["predicted_ms"] += r["predicted_ms"]
        k["tokens"] += _tokens(r)
        if _cpu_decodes(r):
            beside = offloaded.setdefault(kind(r), [0.0, 0.0, 0, 0])
            beside[0] += r["measured_ms"]
            beside[1] += r["gpu_alone_ms"]
            beside[2] += _tokens(r)
            beside[3] += _tokens(r) - _cpu_decodes(r)
    gpu = kinds.get("gpu")
    gpu_fit = gpu["measured_ms"] / gpu["predicted_ms"] if gpu and gpu["predicted_ms"] else 1.0
    for name, k in kinds.items():
        k["time_share"] = k["ms"] / total_ms if total_ms else 0.0
        k["tokens_per_s"] = k["tokens"] / (k["ms"] / 1e3) if k["ms"] else 0.0
        k["over_gpu_alone"] = _over_gpu_alone(offloaded.get(name), gpu_fit)
    pipe = [r for r in records if kind(r) == "pipelined"]
    splits = Counter((r["decode_gpu"], r["decode_cpu_b0"], r["decode_cpu_b1"]) for r in pipe)
    top = []
    for split, n in splits.most_common(num_splits):
        rs = [r for r in pipe if (r["decode_gpu"], r["decode_cpu_b0"], r["decode_cpu_b1"]) == split]
        top.append({
            "split": list(split),
            "iterations": n,
            "measured_ms": statistics.median(r["measured_ms"] for r in rs),
            "predicted_ms": statistics.median(r["predicted_ms"] for r in rs),
            "gpu_alone_ms": statistics.median(r["gpu_alone_ms"] for r in rs),
            "cpu_busy_ms": statistics.median(r["cpu_busy_ms"] for r in rs),
            "cpu_work_ms": statistics.median(r.get("cpu_work_ms", 0.0) for r in rs),
            "cpu_predicted_ms": statistics.median(r["predicted_cpu_ms"] for r in rs),
        })  # fmt: skip
    return {
        "iterations": len(records),
        "total_s": total_ms / 1e3,
        "median_host_ms": _ratio([r.get("host_ms", 0.0) for r in records]),
        # plans made during the step before (traces before planning ahead have no such field)
        "planned_ahead_share": (
            sum(bool(r.get("planned_ahead")) for r in records) / len(records) if records else None
        ),
        "median_ahead_ms": _ratio([r["ahead_ms"] for r in records if r.get("ahead_ms")]),
        "guard_stops": [
            {"iteration": step, "gain_before": gain_before(records, step, gpu_fit)}
            for step in guard_stops(records)
        ],
        "kinds": {name: kinds[name] for name in KINDS if name in kinds},
        "pipelined": {
            "measured_over_predicted": _ratio(
                [r["measured_ms"] / r["predicted_ms"] for r in pipe if r["predicted_ms"] > 0]
            ),
            "cpu_busy_share": _ratio([r["cpu_busy_ms"] / r["measured_ms"] for r in pipe]),
            "cpu_over_predicted": _ratio(
                [r["cpu_busy_ms"] / r["predicted_cpu_ms"]
                 for r in pipe if r["predicted_cpu_ms"] > 0]  # fmt: skip
            ),
            "cpu_work_over_predicted": _ratio(
                [r["cpu_work_ms"] / r["predicted_cpu_ms"]
                 for r in pipe if r.get("cpu_work_ms") and r["predicted_cpu_ms"] > 0]  # fmt: skip
            ),
            "issue_share": _ratio([r.get("issue_ms", 0.0) / r["measured_ms"] for r in pipe]),
            "splits": top,
        },
    }


def _fmt(value: float | None, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("trace", type=argparse.FileType("r"), help="a --trace-out file")
    parser.add_argument("--splits", type=int, default=8, help="most frequent splits shown")
    args = parser.parse_args(argv)
    with args.trace:
        traces = json.load(args.trace)
    report = {policy: summarize(records, args.splits) for policy, records in traces.items()}
    for policy, s in report.items():
        print(f"{policy}: {s['iterations']} iterations, {s['total_s']:.2f} s, engine's own time "
              f"{_fmt(s['median_host_ms'])} ms per iteration (median); planned ahead "
              f"{_fmt(s['planned_ahead_share'], '.0%')} of them, "
              f"{_fmt(s['median_ahead_ms'])} ms in the previous one's wait")  # fmt: skip
        for name, k in s["kinds"].items():
            fit = k["measured_ms"] / k["predicted_ms"] if k["predicted_ms"] else None
            beside = k["over_gpu_alone"]
            gain = "" if beside is None else f", {beside:.2f}x the GPU alone's rate"
            print(f"  {name:15s} {k['iterations']:6d} it {100 * k['time_share']:5.1f}% of the time "
                  f"{k['tokens_per_s']:8.1f} tok/s, measured / predicted {_fmt(fit)}"
                  f"{gain}")  # fmt: skip
        stops = ", ".join(
            f"{g['iteration']} ({_fmt(g['gain_before'])}x)" for g in s["guard_stops"]
        )
        why = f" (in brackets: over the GPU alone, the {STOP_WINDOW} iterations before)"
        print("  the offload guard, replayed on these iterations, stops offloading at: "
              + (stops + why if stops else "none"))
        p = s["pipelined"]
        if not p["splits"]:
            continue
        print(f"  pipelined decodes: measured / predicted {_fmt(p['measured_over_predicted'])}, "
              f"CPU pool busy {_fmt(p['cpu_busy_share'])} of each, CPU measured / predicted "
              f"{_fmt(p['cpu_over_predicted'])} (its work over the pool's size "
              f"{_fmt(p['cpu_work_over_predicted'])}), engine thread issuing "
              f"{_fmt(p['issue_share'])} of each (medians)")  # fmt: skip
        for t in p["splits"]:
            g, b0, b1 = t["split"]
            print(f"    {g} GPU + {b0}/{b1} CPU: {t['iterations']:5d} it, "
                  f"{t['measured_ms']:.2f} ms (predicted {t['predicted_ms']:.2f}, GPU alone "
                  f"{t['gpu_alone_ms']:.2f}), CPU "
                  f"{t['cpu_busy_ms']:.2f} ms, work {t['cpu_work_ms']:.2f} ms (predicted "
                  f"{t['cpu_predicted_ms']:.2f})")  # fmt: skip
    return report


if __name__ == "__main__":
    main()
