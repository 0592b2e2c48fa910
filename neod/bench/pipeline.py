"""NEO iterations against the cost model and against the GPU alone, measured in one run.

    python -m neod.bench.pipeline --preset llama-3.1-8b --gpu-decodes 4 --cpu-decodes 0,2,4,8 \
        --context 1100

For each CPU batch size K, the engine's executor runs the same G GPU decodes (context C each):
alone (the GPU-only iteration, through its CUDA graph), with K CPU decodes in one batch
(sequential), and with the K CPU decodes split between the two sub-batches the way the scheduler
splits them (pipelined). Each iteration is timed on the host clock from issue to logits on the
host, the CPU side included, and compared with the time this host's profile predicts; tokens/s
are set against the GPU-only iteration. This separates "the scheduler would not offload" from
"the executor is slower than the model says". The CPU pool's busy time is set against the
profile's CPU attention time too: where the iteration runs over its prediction, that says whether
the CPU's own work or the round trips between the devices took the difference.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import torch

from neod.config import load_config
from neod.cpu.threads import process_threads, thread_times
from neod.engine.batch import build_sub_batch
from neod.engine.runtime import EngineRuntime, build_runtime
from neod.engine.sequence import Sequence, decoding_sequences
from neod.model.presets import get_preset
from neod.sched.cost import BatchLoad, CostModel, pipelined_s, sequential_s
from neod.sched.split import CpuCandidate, split_candidates

GIB = 1 << 30


def _time_iterations(runtime: EngineRuntime, batches: list, repeats: int) -> dict[str, Any]:
    """Median wall time of one iteration, the CPU attention's busy time in it, the engine thread's
    time issuing its layers, the share of the pool's thread time in that busy time that computed
    (None without CPU work), and per iteration how long the pool's workers and this process's
    other threads waited for a core."""
    executor = runtime.executor
    for _ in range(2):
        executor.run(batches)
    walls, busy, issue = [], [], []
    worker_before, capacity_before = executor.cpu_worker_s, executor.cpu_capacity_s
    workers = runtime.cpu_attention.thread_ids()
    others = sorted(set(process_threads()) - set(workers))
    workers_before, others_before = thread_times(workers), thread_times(others)
    for _ in range(repeats):
        cpu_before, issue_before = executor.cpu_busy_s, executor.issue_s
        start = time.perf_counter()
        logits = executor.run(batches)
        for t in logits:
            t.argmax(dim=-1).cpu()  # what sampling waits for
        walls.append(time.perf_counter() - start)
        busy.append(executor.cpu_busy_s - cpu_before)
        issue.append(executor.issue_s - issue_before)
    capacity = executor.cpu_capacity_s - capacity_before
    worker = executor.cpu_worker_s - worker_before
    workers_waited = thread_times(workers) - workers_before
    others_waited = thread_times(others) - others_before
    return {
        "wall_ms": statistics.median(walls) * 1e3,
        "cpu_busy_ms": statistics.median(busy) * 1e3,
        "issue_ms": statistics.median(issue) * 1e3,
        "cpu_pool_share": worker / capacity if capacity > 0 else None,
        "workers_wait_ms": workers_waited.wait_s / repeats * 1e3,
        "workers_preempted": workers_waited.preempted / repeats,
        "others_wait_ms": others_waited.wait_s / repeats * 1e3,
    }


def _seqs(runtime: EngineRuntime, num: int, ctx: int, first_block: int, pool: torch.Tensor):
    bs = runtime.layout.block_size
    seqs: list[Sequence] = decoding_sequences(num, ctx, bs, first_block, runtime.vocab_size)
    used = num * -(-ctx // bs)
    pool[:, first_block : first_block + used].normal_(std=0.5)  # no denormals, no NaNs
    return seqs


def _cpu_attention_ms(cost: CostModel, layers: int, sizes: list[int], ctx: int) -> float:
    """What the profile expects the CPU pool to be busy for: the attention of each sub-batch's
    CPU rows, every layer (the copies around it are not the pool's work)."""
    return sum(layers * cost.cpu_decode_attn_s(k, k * ctx) * 1e3 for k in sizes if k)


def measure(
    runtime: EngineRuntime, num_gpu: int, cpu_sizes: list[int], ctx: int, repeats: int
) -> list[dict[str, Any]]:
    device, bs = runtime.device, runtime.layout.block_size
    cost, layers = runtime.scheduler.cost, runtime.layout.num_layers
    gpu_seqs = _seqs(runtime, num_gpu, ctx, 0, runtime.gpu_pool)
    all_cpu = _seqs(runtime, max(cpu_sizes), ctx, 0, runtime.cpu_pool)
    for i, s in enumerate(all_cpu):
        s.seq_id = num_gpu + i
    base = BatchLoad().plus_gpu_decodes(num_gpu, num_gpu * ctx)
    alone = build_sub_batch([], [], gpu_seqs, [], bs, device)
    gpu_only = _time_iterations(runtime, [alone], repeats)
    gpu_only["predicted_ms"] = sequential_s(cost, layers, base, 0) * 1e3
    rows = []
    for k in cpu_sizes:
        cpu_seqs = all_cpu[:k]
        by_id = {s.seq_id: s for s in cpu_seqs}
        forced = [CpuCandidate(s.seq_id, ctx) for s in cpu_seqs]
        seq_split, pipe_split = split_candidates(cost, layers, base, forced, (), 0, 0)
        row: dict[str, Any] = {
            "gpu_decodes": num_gpu,
            "cpu_decodes": k,
            "context": ctx,
            "gpu_only": gpu_only,
        }
        one = build_sub_batch([], [], gpu_seqs, cpu_seqs, bs, device)
        row["sequential"] = _time_iterations(runtime, [one], repeats)
        row["sequential"]["predicted_ms"] = seq_split.iter_s * 1e3
        row["sequential"]["cpu_predicted_ms"] = _cpu_attention_ms(cost, layers, [k], ctx)
        if pipe_split is not None:
            b0 = [by_id[i] for i in pipe_split.b0_ids]
            b1 = [by_id[i] for i in pipe_split.b1_ids]
            batches = [
                build_sub_batch([], [], gpu_seqs, b0, bs, device),
                build_sub_batch([], [], [], b1, bs, device),
            ]
            row["pipelined"] = _time_iterations(runtime, batches, repeats)
            load0 = base.plus_cpu_decodes(len(b0), len(b0) * ctx)
            load1 = BatchLoad().plus_cpu_decodes(len(b1), len(b1) * ctx)
            row["pipelined"]["predicted_ms"] = pipelined_s(cost, layers, load0, load1, 0) * 1e3
            row["pipelined"]["split"] = [len(b0), len(b1)]
            row["pipelined"]["cpu_predicted_ms"] = _cpu_attention_ms(
                cost, layers, [len(b0), len(b1)], ctx
            )
        for mode in ("gpu_only", "sequential", "pipelined"):
            if mode in row:
                r = row[mode]
                tokens = num_gpu + (k if mode != "gpu_only" else 0)
                r["tokens_per_s"] = tokens / r["wall_ms"] * 1e3
                r["x_gpu_only"] = (
                    r["tokens_per_s"] / gpu_only["tokens_per_s"] if mode != "gpu_only" else 1.0
                )
                r["x_predicted"] = r["wall_ms"] / r["predicted_ms"]
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="llama-3.1-8b")
    parser.add_argument("--gpu-decodes", default="4")
    parser.add_argument("--cpu-decodes", default="0,1,2,4,6,8,12")
    parser.add_argument("--context", type=int, default=1100)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--cpu-threads", type=int, default=0)
    parser.add_argument(
        "--isolation",
        default="on",
        help="measure with this process's other threads kept off the pool's cores (on), free to "
        "run anywhere (off), or both in turn (on,off)",
    )
    parser.add_argument(
        "--set", action="append", default=[], help="extra config override section.key=value"
    )
    parser.add_argument("--json", default="", help="also write the report here")
    args = parser.parse_args(argv)
    gpu_sizes = [int(x) for x in args.gpu_decodes.split(",")]
    cpu_sizes = sorted({int(x) for x in args.cpu_decodes.split(",")})
    ctx = args.context
    overrides = {
        "model.preset": args.preset,
        "scheduler.policy": "neo",
        "cpu.threads": args.cpu_threads,
        "scheduler.max_batch_size": max(gpu_sizes) + max(cpu_sizes) + 1,
    }
    # KV room for the largest batches only: cache.*_kv_gib caps the pools.
    mc = get_preset(args.preset)
    token_bytes = 2 * mc.num_hidden_layers * mc.num_key_value_heads * mc.head_dim * 2
    seq_gib = (ctx + 16) * token_bytes / GIB
    overrides["cache.gpu_kv_gib"] = max(gpu_sizes) * seq_gib + 0.05
    overrides["cache.cpu_kv_gib"] = max(cpu_sizes) * seq_gib + 0.05
    cfg = load_config(None, overrides={**overrides, **dict(s.split("=", 1) for s in args.set)})
    runtime = build_runtime(cfg)
    rows = []
    for isolation in args.isolation.split(","):
        if isolation == "off":
            runtime.release_pool_cores()
        elif isolation == "on":
            runtime.isolate_pool()
        else:
            parser.error(f"--isolation takes on and off, not {isolation!r}")
        for g in gpu_sizes:
            for row in measure(runtime, g, cpu_sizes, ctx, args.repeats):
                row["other_cpus"] = None if isolation == "off" else runtime.other_cpus
                rows.append(row)
    report = {
        "preset": args.preset,
        "gpu": torch.cuda.get_device_name(runtime.device)
        if runtime.device.type == "cuda"
        else "cpu",
        "cpu_threads": runtime.cpu_threads,
        "pool_cores": list(runtime.cpu_attention.cores),
        "rows": rows,
    }
    runtime.close()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    print(
        f"{args.preset} on {report['gpu']}, {report['cpu_threads']} CPU attention threads, "
        f"context {ctx}; wall ms measured / predicted, tokens/s vs GPU-only, CPU pool busy ms "
        "measured / predicted, the share of the pool's thread time in it that computed, and ms "
        "per iteration the pool's workers / the process's other threads waited for a core, and "
        "the engine thread's ms issuing the layers"
    )
    shown: object = ()
    for row in report["rows"]:
        if row["other_cpus"] != shown:
            shown = row["other_cpus"]
            where = "anywhere" if shown is None else f"on CPUs {sorted(shown)}"
            print(f"other threads {where}")
            print(f"{'G':>3} {'K':>3} | {'gpu-only':>15} | {'sequential':>41} | "
                  f"{'pipelined (b0/b1)':>49}")
        g = row["gpu_only"]
        parts = [
            f"{row['gpu_decodes']:>3} {row['cpu_decodes']:>3} | "
            f"{g['wall_ms']:6.2f}/{g['predicted_ms']:6.2f}ms"
        ]
        for mode in ("sequential", "pipelined"):
            r = row.get(mode)
            if r is None:
                parts.append(f"{'-':>29}" if mode == "sequential" else f"{'-':>37}")
                continue
            split = f" {r['split'][0]}/{r['split'][1]}" if "split" in r else ""
            share = r["cpu_pool_share"]
            pool = f" {100 * share:3.0f}%" if share is not None else ""
            parts.append(
                f"{r['wall_ms']:6.2f}/{r['predicted_ms']:6.2f}ms {r['x_gpu_only']:4.2f}x"
                f" cpu {r['cpu_busy_ms']:5.2f}/{r['cpu_predicted_ms']:5.2f}{pool}{split}"
                f" wait {r['workers_wait_ms']:5.2f}/{r['others_wait_ms']:5.2f}"
                f" issue {r['issue_ms']:6.2f}"
            )
        print(" | ".join(parts))
    return report


if __name__ == "__main__":
    main()
