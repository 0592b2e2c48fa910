"""Offline throughput benchmark: the same synthetic workload through the engine under several
policies.

    python -m neod.bench.throughput --preset llama-3.1-8b --gpu-kv-gib 0.5 \
        --policies gpu-only,auto --input-len 1000 --output-len 200 --num-requests 64

All requests arrive at once (offline serving, as in NEO's evaluation); lengths are uniform within
+-10% of the given means, token ids random, EOS ignored so every request produces exactly its
output length. The model is loaded once and shared by the runs, so the policies are compared on
identical weights and requests in one process, each starting from the same cost corrections.
Reports output tokens/s, TTFT and TPOT percentiles, the share of pipelined iterations, the CPU
pool's busy share and the predictor's median error; then what the advisor (`neoctl predict`)
says of the same workload on the same pools and profile, next to the measured gains, and the same
batch simulated through the scheduler (neod.sched.simulate). The advisor models the steady state
(finished requests replaced at once). A run of n requests reaches it between the first finished
request and the moment the queue runs dry (then the batch only shrinks): the "steady" rate is the
output tokens of that window over its length, the one to set against the advisor; it needs n to
be several times the number of requests the pools hold.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import time
from typing import Any

import torch

from neod.cli.cpu_fit import cpu_fit_text
from neod.config import load_config
from neod.engine import Engine, SamplingParams
from neod.engine.runtime import EngineRuntime, build_runtime
from neod.sched import (
    CalibratedCostModel,
    Limits,
    SplitRule,
    TableCostModel,
    describe_cpu_paced,
    predict_workload,
)
from neod.sched.simulate import batch_lengths, simulate_policies

logger = logging.getLogger(__name__)
PROGRESS_EVERY_S = 10.0


def make_workload(
    num_requests: int, input_len: int, output_len: int, vocab_size: int, seed: int
) -> list[tuple[list[int], int]]:
    """Random prompts of the lengths `neoctl predict --batch` plays for the same means."""
    rng = random.Random(seed)
    return [
        ([rng.randrange(vocab_size) for _ in range(prompt)], output)
        for prompt, output in batch_lengths(num_requests, input_len, output_len, seed)
    ]


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def run_workload(engine: Engine, workload: list[tuple[list[int], int]]) -> dict[str, Any]:
    pool = engine.rt.cpu_attention
    pool_before = None if pool is None else pool.thread_times()
    start = time.perf_counter()
    first: dict[str, float] = {}
    last: dict[str, float] = {}
    counts: dict[str, int] = {}
    for i, (prompt, out_len) in enumerate(workload):
        engine.add_request(
            str(i), prompt, SamplingParams(max_tokens=out_len, temperature=0.0, ignore_eos=True)
        )
    errors = produced = 0
    steady: list[tuple[float, int]] = []  # (time, tokens produced): window start, then end
    next_report = start + PROGRESS_EVERY_S
    while engine.has_unfinished():
        if time.perf_counter() > next_report:
            next_report += PROGRESS_EVERY_S
            logger.info("progress: %d output tokens, %d requests done, %s", sum(counts.values()),
                        len(workload) - len(engine.running) - len(engine.waiting),
                        engine.stats()["iterations"])
        for out in engine.step():
            now = time.perf_counter()
            errors += out.error is not None
            if out.new_token_ids:
                first.setdefault(out.request_id, now)
                last[out.request_id] = now
                counts[out.request_id] = counts.get(out.request_id, 0) + len(out.new_token_ids)
                produced += len(out.new_token_ids)
            if out.finished and not steady and engine.waiting:
                steady.append((now, produced))
        if len(steady) == 1 and not engine.waiting:
            steady.append((time.perf_counter(), produced))
    elapsed = time.perf_counter() - start
    steady_rate = None
    if len(steady) == 2 and steady[1][0] > steady[0][0]:
        (t0, n0), (t1, n1) = steady
        steady_rate = (n1 - n0) / (t1 - t0)
    ttft = [first[r] - start for r in first]
    tpot = [(last[r] - first[r]) / (counts[r] - 1) for r in first if counts[r] > 1]
    iterations = engine.stats()["iterations"]
    pool_waits = None if pool is None else (pool.thread_times() - pool_before).wait_share
    return {
        "output_tokens": sum(counts.values()),
        "errors": errors,
        "elapsed_s": elapsed,
        "output_tokens_per_s": sum(counts.values()) / elapsed,
        "steady_tokens_per_s": steady_rate,
        "ttft_p50_s": percentile(ttft, 0.5),
        "ttft_p99_s": percentile(ttft, 0.99),
        "tpot_p50_s": percentile(tpot, 0.5),
        "tpot_p99_s": percentile(tpot, 0.99),
        "iterations": iterations["total"],
        "pipelined_share": iterations["pipelined"] / max(1, iterations["total"]),
        "cpu_busy_share": iterations.get("cpu_busy_share"),
        "mean_cpu_decodes": iterations["mean_cpu_decodes"],
        "median_iter_ms": iterations["median_iter_ms"],
        "median_host_ms": iterations["median_host_ms"],
        "median_prediction_error": iterations["median_prediction_error"],
        "cpu_fit": iterations["cpu_fit"],
        "offload_guard": engine.stats()["offload_guard"],
        "cpu_cost_scale": engine.stats()["cpu_cost_scale"],
        "pipeline_handoff": engine.stats()["pipeline_handoff"],
        "pool_wait_share": pool_waits,  # the workers' time waiting for a core, of their wanted
    }


def advisor_prediction(
    runtime: EngineRuntime,
    cfg: Any,
    input_len: int,
    output_len: int,
    cpu_scale: float = 1.0,
    handoff_s: float | None = None,
    cpu_fixed_s: float = 0.0,
) -> dict[str, Any] | None:
    """What `neoctl predict` says of this workload on this run's pools and profile (None where
    this process keeps no profile); with `cpu_scale`, `cpu_fixed_s` and `handoff_s`, its CPU
    attention cost and hand-offs corrected as the engine measured them (None: the profile's
    hand-off)."""
    if runtime.profile is None:
        return None
    layout = runtime.layout
    return predict_workload(
        CalibratedCostModel(TableCostModel(runtime.profile), cpu_scale, handoff_s, cpu_fixed_s),
        layout.num_layers,
        layout.bytes_per_token,
        runtime.num_gpu_blocks * layout.block_bytes,
        runtime.num_cpu_blocks * layout.block_bytes,
        input_len,
        output_len,
        Limits(cfg.scheduler.max_batch_size, cfg.scheduler.max_tokens_in_batch),
        block_size=layout.block_size,
        split_rule=SplitRule.of(cfg.scheduler),
    )


def simulated(
    runtime: EngineRuntime,
    cfg: Any,
    workload: list[tuple[list[int], int]],
    results: dict[str, dict[str, Any]],
    cpu_scale: float = 1.0,
    handoff_s: float | None = None,
    cpu_fixed_s: float = 0.0,
) -> dict[str, dict[str, Any]] | None:
    """The same batch, sent at once, played through the scheduler on the profile's predicted
    costs plus each policy's measured host time per iteration (None where this process keeps no
    profile): what the run should measure, where the advisor prices only the steady state. The
    corrections are advisor_prediction's."""
    if runtime.profile is None:
        return None
    layout = runtime.layout
    return simulate_policies(
        CalibratedCostModel(TableCostModel(runtime.profile), cpu_scale, handoff_s, cpu_fixed_s),
        layout.num_layers,
        runtime.num_gpu_blocks,
        runtime.num_cpu_blocks,
        layout.block_size,
        Limits(cfg.scheduler.max_batch_size, cfg.scheduler.max_tokens_in_batch),
        [(len(prompt), output) for prompt, output in workload],
        {policy: (result["median_host_ms"] or 0.0) * 1e-3 for policy, result in results.items()},
        SplitRule.of(cfg.scheduler),
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--path", default="")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--policies", default="gpu-only,auto")
    parser.add_argument("--gpu-kv-gib", type=float, default=0.0)
    parser.add_argument("--cpu-kv-gib", type=float, default=0.0)
    parser.add_argument("--input-len", type=int, default=1000)
    parser.add_argument("--output-len", type=int, default=200)
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--max-batch-size", type=int, default=256)
    parser.add_argument("--max-tokens-in-batch", type=int, default=8192)
    parser.add_argument("--cpu-threads", type=int, default=0)
    parser.add_argument(
        "--set", action="append", default=[], help="extra config override section.key=value"
    )
    parser.add_argument("--json", action="store_true")
    parser.add_argument(
        "--trace-out",
        type=argparse.FileType("w"),  # opened now: a bad path fails before the run, not after it
        help="write every iteration's plan and times, per policy, here (neod.bench.trace_summary "
        "summarises it)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    overrides = {
        "model.preset": args.preset,
        "model.path": args.path,
        "model.device": args.device,
        "cache.gpu_kv_gib": args.gpu_kv_gib,
        "cache.cpu_kv_gib": args.cpu_kv_gib,
        "scheduler.max_batch_size": args.max_batch_size,
        "scheduler.max_tokens_in_batch": args.max_tokens_in_batch,
        "cpu.threads": args.cpu_threads,
        "scheduler.policy": "neo",
    }
    cfg = load_config(None, overrides={**overrides, **dict(s.split("=", 1) for s in args.set)})
    runtime = build_runtime(cfg)
    workload = make_workload(
        args.num_requests, args.input_len, args.output_len, runtime.vocab_size, seed=0
    )
    results = {}
    cost = runtime.scheduler.cost
    start: dict[str, float | int] | None = None
    traces: dict[str, list[dict[str, Any]]] = {}
    for policy in args.policies.split(","):
        engine = Engine(cfg, runtime=runtime)
        # Every policy starts from the corrections a fresh engine starts with, not from those the
        # previous policy's run left: else the later policies would start better informed.
        if isinstance(cost, CalibratedCostModel):
            if start is None:
                start = cost.state()
            else:
                cost.restore(start)
        engine.tune(policy=policy)
        if args.trace_out:
            engine.iteration_stats.trace = traces[policy] = []
        results[policy] = run_workload(engine, workload)
        if runtime.device.type == "cuda":
            torch.cuda.synchronize()
    report = {
        "preset": args.preset,
        "device": str(runtime.device),
        "gpu": torch.cuda.get_device_name(runtime.device)
        if runtime.device.type == "cuda"
        else None,
        "gpu_kv_blocks": runtime.num_gpu_blocks,
        "cpu_kv_blocks": runtime.num_cpu_blocks,
        "block_size": runtime.layout.block_size,
        "cpu_threads": runtime.cpu_threads,
        "cpu_amx": runtime.cpu_tile_path,
        "input_len": args.input_len,
        "output_len": args.output_len,
        "num_requests": args.num_requests,
        "results": results,
        "advisor": advisor_prediction(runtime, cfg, args.input_len, args.output_len),
        "advisor_as_measured": None,
        "simulated": simulated(runtime, cfg, workload, results),
        "simulated_as_measured": None,
    }
    # The corrections the engine ended the last policy's run with.
    scales = [r["cpu_cost_scale"] for r in results.values()
              if r["cpu_cost_scale"] and r["cpu_cost_scale"]["samples"]]
    if scales:
        scale, fixed_us = scales[-1]["measured_over_profiled"], scales[-1]["fixed_us"]
        handoff_us = results[list(results)[-1]]["pipeline_handoff"]["per_layer_us"]
        report["advisor_as_measured"] = advisor_prediction(
            runtime, cfg, args.input_len, args.output_len, scale, handoff_us * 1e-6,
            fixed_us * 1e-6,
        )  # fmt: skip
        report["advisor_as_measured"].update(
            cpu_scale=scale, cpu_fixed_us=fixed_us, handoff_us=handoff_us
        )
        report["simulated_as_measured"] = simulated(
            runtime, cfg, workload, results, scale, handoff_us * 1e-6, fixed_us * 1e-6
        )
    if "gpu-only" in results:
        base = results["gpu-only"]["output_tokens_per_s"]
        report["speedup_vs_gpu_only"] = {  # nan where GPU-only served none (prompts it refused)
            p: r["output_tokens_per_s"] / base if base else math.nan for p, r in results.items()
        }
        steady_base = results["gpu-only"]["steady_tokens_per_s"]
        report["steady_speedup_vs_gpu_only"] = {
            p: r["steady_tokens_per_s"] / steady_base
            for p, r in results.items()
            if steady_base and r["steady_tokens_per_s"]
        }
    if args.trace_out:
        with args.trace_out as f:
            json.dump(traces, f)
    if args.json:
        print(json.dumps(report, indent=2))
        return report
    print(
        f"{args.preset} on {report['gpu'] or report['device']}: "
        f"gpu_kv_blocks={runtime.num_gpu_blocks} cpu_kv_blocks={runtime.num_cpu_blocks} "
        f"cpu_threads={runtime.cpu_threads} cpu_amx={runtime.cpu_tile_path} "
        f"in~{args.input_len} out~{args.output_len} "
        f"n={args.num_requests}"
    )
    paced = runtime.profile.cpu_paced if runtime.profile is not None else None
    if paced is not None:
        print(f"profile: {describe_cpu_paced(paced)} (CPU x corrects this)")
    print(
        f"{'policy':10} {'tok/s':>9} {'x':>6} {'steady':>8} {'TTFT p50':>9} {'p99':>8} "
        f"{'TPOT p50':>9} {'p99':>8} {'pipe%':>6} {'pred err':>8} {'CPU reqs':>8} {'CPU busy':>8} "
        f"{'CPU x':>10} {'hand-off':>8} {'wait':>6}"
    )
    for policy, r in results.items():
        speedup = report.get("speedup_vs_gpu_only", {}).get(policy, float("nan"))
        err = r["median_prediction_error"]
        steady_rate = r["steady_tokens_per_s"]
        print(
            f"{policy:10} {r['output_tokens_per_s']:9.1f} {speedup:6.2f} "
            f"{_opt(steady_rate, '8.1f'):>8} {_opt(r['ttft_p50_s'], '9.3f'):>9} "
            f"{_opt(r['ttft_p99_s'], '8.3f'):>8} {_opt(r['tpot_p50_s'], '8.1f', 1e3, 'm'):>9} "
            f"{_opt(r['tpot_p99_s'], '7.1f', 1e3, 'm'):>8} "
            f"{100 * r['pipelined_share']:6.1f} {'-' if err is None else f'{100 * err:7.1f}%':>8} "
            f"{r['mean_cpu_decodes']:8.1f} {100 * (r['cpu_busy_share'] or 0):7.1f}% "
            f"{_scale(r['cpu_cost_scale']):>10} {_handoff(r['pipeline_handoff']):>8} "
            f"{_share(r['pool_wait_share']):>6}"
        )
    print("CPU x: the CPU attention's measured over profiled cost at the end of the policy's run, "
          "and its fixed cost per sub-batch layer; hand-off: what a pipelined sub-batch's trip to "
          "the CPU and back adds per layer beyond its copies, as profiled then measured; both are "
          "the scheduler's running corrections, each policy starting from the same; wait: "
          "the CPU pool workers' time waiting for their cores, of the time they wanted one")
    for policy, r in results.items():
        if r["errors"]:
            print(f"{policy}: {r['errors']} of {args.num_requests} requests ended in an error")
    for policy, r in results.items():
        if r["cpu_fit"]:
            print(f"{policy}: {cpu_fit_text(r['cpu_fit'])} (iterations)")
    for policy, r in results.items():
        guard = r["offload_guard"]
        if policy == "auto" and guard["stops"]:
            print(f"auto: the offload guard stopped offloading {guard['stops']} time(s); last "
                  f"state {guard}")
    measured = ", ".join(
        f"{p} {x:.2f}x" for p, x in report.get("steady_speedup_vs_gpu_only", {}).items()
        if p != "gpu-only"
    )
    corrected = report["advisor_as_measured"]
    for costs, sims in (
        ("the profile's costs", report["simulated"]),
        ("the costs as the run corrected them (as the advisor's second line)",
         report["simulated_as_measured"]),
    ):
        if sims:
            base = sims.get("gpu-only", {}).get("output_tokens_per_s")
            print(f"simulated (this batch at once, {costs} and each run's host time per "
                  "iteration): " + ", ".join(
                f"{p} {r['output_tokens_per_s']:.1f} tok/s"
                + (f" ({r['output_tokens_per_s'] / base:.2f}x)" if base and p != "gpu-only" else "")
                for p, r in sims.items()
            ))
    for label, advice in (
        ("advisor (steady state)", report["advisor"]),
        (f"advisor, CPU cost x{corrected['cpu_scale']:.2f} + {corrected['cpu_fixed_us']:g} us "
         f"and hand-off "
         f"{corrected['handoff_us']:g} us as the run measured them" if corrected else "",
         corrected),
    ):
        if advice is not None:
            print(f"{label}: {_advice(advice)}; measured in the steady window: {measured or '-'}")
    return report


def _advice(advice: dict[str, Any]) -> str:
    gpu, neo = advice["gpu_only"], advice["neo"]
    mode = "pipelined" if neo["pipelined"] else "sequential"
    gain = "-" if advice["gain"] is None else f"{advice['gain']:.2f}x"
    return (f"gpu-only {gpu['tokens_per_s']:.1f} tok/s with {gpu['gpu_batch']} requests, neo "
            f"{neo['tokens_per_s']:.1f} tok/s with {neo['gpu_batch']} + "
            f"{neo['cpu_batch']} ({mode}), gain {gain}, advice {advice['mode']}")


def _opt(value: float | None, spec: str, factor: float = 1.0, unit: str = "") -> str:
    """A number, or '-' where there is none (no request produced a token)."""
    return "-" if value is None else f"{value * factor:{spec}}{unit}"


def _scale(scale: dict[str, Any] | None) -> str:
    if not scale or not scale["samples"]:
        return "-"
    return f"{scale['measured_over_profiled']:.2f}+{scale['fixed_us']:.0f}us"


def _share(share: float | None) -> str:
    return "-" if share is None else f"{100 * share:.2f}%"


def _handoff(handoff: dict[str, Any] | None) -> str:
    return "-" if not handoff else f"{handoff['per_layer_us']:.0f}us"


if __name__ == "__main__":
    main()
