"""Host time of one scheduling pass, per policy: what the engine thread spends deciding each
iteration before it issues any GPU work. `auto` also weighs whether offloading pays (its
outlook), which `gpu-only` skips; on a GPU-bound iteration of a few milliseconds that difference
is a share of the throughput.

    python -m neod.bench.schedule [--profile ~/.cache/neod/profiles/profile-<id>.json] \
        --running 14 --on-cpu 0 --waiting 50 --context 1100

Without --profile the costs are flat placeholder tables: the pass's host time depends on how many
requests it weighs far more than on their costs, but a host's own profile gives its real splits.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from neod.sched import (
    POLICIES,
    CacheView,
    CalibratedCostModel,
    Limits,
    Profile,
    Residence,
    Scheduler,
    SeqView,
    Table1D,
    Table2D,
    TableCostModel,
    profile_key,
)

BLOCK_SIZE = 16
GROWTH = 64  # the running requests' lengths vary by up to this many tokens from pass to pass


def placeholder_profile(num_layers: int = 32) -> Profile:
    """Flat per-layer costs of the order of an 8B layer on an H100: placeholders, not a host."""
    key = profile_key(
        model={"num_hidden_layers": num_layers}, dtype="bfloat16", tp=1, gpu="placeholder",
        cpu="placeholder", pool_threads=1, kernel_version="0", block_size=BLOCK_SIZE,
    )  # fmt: skip
    return Profile(
        key=key,
        linear=Table1D.from_points({1: 190e-6, 256: 260e-6, 4096: 2.5e-3}),
        prefill_attn=Table1D.from_points({16: 10e-6, 4096: 400e-6}),
        gpu_decode_attn=Table2D.from_points({(1, 16): 5e-6, (1, 65536): 40e-6,
                                             (256, 256): 8e-6, (256, 1 << 20): 600e-6}),
        cpu_decode_attn=Table2D.from_points({(1, 16): 10e-6, (1, 65536): 900e-6,
                                             (256, 256): 60e-6, (256, 1 << 20): 15e-3}),
        transfer=Table1D.from_points({1: 12e-6, 256: 90e-6}),
        swap=Table1D.from_points({1: 4e-6, 1024: 700e-6}),
        iteration_overhead=Table1D.from_points({1: 250e-6, 256: 900e-6}),
        pipeline_handoff=40e-6,
    )  # fmt: skip


def scheduling_inputs(
    running: int, on_cpu: int, waiting: int, context: int
) -> tuple[list[SeqView], list[SeqView], CacheView]:
    """`running` decodes of ~`context` tokens (the last `on_cpu` of them on the CPU), `waiting`
    prompts of `context` tokens, and a GPU pool that holds the GPU decodes with a few blocks to
    spare: the queue backed up behind a full GPU, as offloading finds it."""
    per_seq = -(-(context + 2 * GROWTH) // BLOCK_SIZE)
    run = [
        SeqView(i, i, context, context + 1 + i % GROWTH, context + 200,
                Residence.CPU if i >= running - on_cpu else Residence.GPU, 0)
        for i in range(running)
    ]  # fmt: skip
    wait = [
        SeqView(running + i, running + i, context, 0, context + 200, Residence.WAITING, 0)
        for i in range(waiting)
    ]
    gpu_blocks = (running - on_cpu) * per_seq + 4
    cache = CacheView(BLOCK_SIZE, gpu_blocks, 4, 1 << 16, (1 << 16) - on_cpu * per_seq)
    return wait, run, cache


def time_pass(
    scheduler: Scheduler, inputs: tuple, limits: Limits, seconds: float
) -> dict[str, Any]:
    """Median host time of one pass over repeats in about `seconds`, and what the first decided.
    Each pass sees the running requests at other lengths (up to GROWTH tokens longer, at random),
    so that context sums do not repeat from one pass to the next, as in serving, and the CPU's
    requests last decoded 1 to age_limit passes before, so that a share of them is aged (forced
    into the batch) as in serving, not all of them."""
    waiting, running, cache = inputs
    plan = scheduler.schedule(waiting, running, cache, limits, 1)
    rng = random.Random(0)
    samples, cpu_decodes = [], []
    deadline = time.perf_counter() + seconds
    step = 2
    while time.perf_counter() < deadline or len(samples) < 20:
        grown = [
            replace(
                s,
                num_computed_tokens=s.num_computed_tokens + rng.randrange(GROWTH),
                last_progress_step=step - 1
                - (i % scheduler.age_limit if s.residence == Residence.CPU else 0),
            )
            for i, s in enumerate(running)
        ]
        start = time.perf_counter()
        timed = scheduler.schedule(waiting, grown, cache, limits, step)
        samples.append(time.perf_counter() - start)
        cpu_decodes.append(len(timed.decode_cpu_b0) + len(timed.decode_cpu_b1))
        step += 1
    return {
        "us_per_pass": statistics.median(samples) * 1e6,
        "passes": len(samples),
        "decode_gpu": len(plan.decode_gpu),
        "decode_cpu": len(plan.decode_cpu_b0) + len(plan.decode_cpu_b1),
        "prefill": len(plan.prefill_gpu) + len(plan.prefill_cpu),
        "pipelined": plan.pipelined,
        "timed_cpu_decodes": statistics.median(cpu_decodes),  # the timed passes' CPU decodes
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="", help="a stored profile-<id>.json of this host")
    parser.add_argument("--running", type=int, default=14)
    parser.add_argument("--on-cpu", type=int, default=0, help="of the running, on the CPU")
    parser.add_argument("--waiting", type=int, default=50)
    parser.add_argument("--context", type=int, default=1100)
    parser.add_argument("--policies", default=",".join(POLICIES))
    parser.add_argument("--seconds", type=float, default=1.0, help="per policy")
    parser.add_argument("--json", default="", help="also write the report here")
    args = parser.parse_args(argv)
    if not 0 <= args.on_cpu <= args.running:
        parser.error("--on-cpu must be between 0 and --running")
    profile = (
        Profile.from_json(json.loads(Path(args.profile).read_text()))
        if args.profile
        else placeholder_profile()
    )
    num_layers = int(dict(profile.key.model)["num_hidden_layers"])
    inputs = scheduling_inputs(args.running, args.on_cpu, args.waiting, args.context)
    report: dict[str, Any] = {
        "profile": args.profile or "placeholder",
        "running": args.running,
        "on_cpu": args.on_cpu,
        "waiting": args.waiting,
        "context": args.context,
        "policies": {},
    }
    for policy in args.policies.split(","):
        if policy not in POLICIES:
            parser.error(f"unknown policy {policy!r}; one of {', '.join(POLICIES)}")
        scheduler = Scheduler(CalibratedCostModel(TableCostModel(profile)), num_layers)
        limits = Limits(256, 8192, policy)
        report["policies"][policy] = time_pass(scheduler, inputs, limits, args.seconds)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    print(
        f"one scheduling pass: {args.running} running ({args.on_cpu} on the CPU), "
        f"{args.waiting} waiting, ~{args.context} tokens each; profile {report['profile']}"
    )
    for policy, r in report["policies"].items():
        print(
            f"{policy:9} {r['us_per_pass']:8.1f} us   plan: {r['decode_gpu']} GPU + "
            f"{r['decode_cpu']} CPU decodes, {r['prefill']} prefills"
            + (", pipelined" if r["pipelined"] else "")
            + f"; timed passes: {r['timed_cpu_decodes']:g} CPU decodes (median)"
        )
    return report


if __name__ == "__main__":
    main()
