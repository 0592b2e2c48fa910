"""The engine's CPU program (`CpuAttention.decode_layers`) with every layer's inputs ready: the
time per (layer, flight) step and its KV read rate against what the pool's cores can read.

This is the regime in which the CPU paces a pipelined iteration: each step's inputs are waiting
when the previous one ends, so what the program loses between steps (a worker idle while the
slowest of a step finishes, hand-offs) shows up in full. The profiler times the same program;
this bench spells it out over a grid and next to the host's read rate, and an A/B of two builds
of the native module is two runs of it on one machine. Each point is first checked against the
float64 reference.

With --paced, each point is also run with its steps released one at a time, as the GPU releases
them in a pipelined iteration where the GPU paces it: step j's inputs are marked ready at
j x 1.5 x the point's back-to-back step time, so every step starts alone, on idle workers, and
ends with its slowest one. The pool's busy time per step in both runs, and their difference, is
the cost of a step that starts alone (the profile's `cpu_paced` fits the same over the engine's
iterations).

    python -m neod.bench.cpu_program [--flights 2] [--batch 4,6,8] [--context 512,1100,4096]
        [--threads N] [--q-heads 64 --kv-heads 8 --head-dim 128] [--products amx-scores]
        [--paced]
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import platform
import statistics
import threading
import time
from dataclasses import replace
from datetime import UTC, datetime

import torch

from neod.bench.cpu_attention import GB, parse_ints
from neod.cpu.bandwidth import fill_repeating
from neod.cpu.topology import pool_cores, read_topology
from neod.kernels.cpu_attention import (
    CpuAttention,
    CpuFlight,
    amx_in_use,
    reference_decode,
    use_amx,
)

READ_BYTES = 1 << 30  # KV one timed program reads, at least: far beyond any last-level cache
PACE_OVER_STEP = 1.5  # --paced: steps released this many back-to-back step times apart


def flights_for(
    args: argparse.Namespace, batch: int, context: int, gen: torch.Generator
) -> tuple[torch.Tensor, list[CpuFlight]]:
    """A KV pool of as many layers as READ_BYTES needs (capped by --max-kv-gib) and the flights
    over it: `batch` requests of `context` tokens each, their blocks scattered over the pool."""
    bs, hkv, d, hq = args.block_size, args.kv_heads, args.head_dim, args.q_heads
    per_request = -(-context // bs)
    num_blocks = args.flights * batch * per_request
    step_bytes = batch * context * hkv * d * 2 * args.dtype.itemsize
    layer_bytes = num_blocks * 2 * hkv * bs * d * args.dtype.itemsize
    layers = -(-READ_BYTES // (step_bytes * args.flights))
    layers = max(1, min(args.layers, layers, int(args.max_kv_gib * 2**30 // layer_bytes)))
    pool = torch.empty(layers, num_blocks, 2, hkv, bs, d, dtype=args.dtype)
    fill_repeating(pool, gen)
    order = torch.randperm(num_blocks, generator=gen).to(torch.int32)
    flights = []
    for i in range(args.flights):
        tables = order[i * batch * per_request : (i + 1) * batch * per_request]
        q = torch.randn(batch, hq + 2 * hkv, d, generator=gen).to(args.dtype)
        q, k_new, v_new = q.split([hq, hkv, hkv], dim=1)  # one fused row, as the engine stages
        flights.append(
            CpuFlight(
                q=q, k_new=k_new, v_new=v_new, out=torch.empty(batch, hq, d, dtype=args.dtype),
                block_tables=tables.view(batch, per_request).contiguous(),
                seq_lens=torch.full((batch,), context, dtype=torch.int32),
                ready=torch.zeros(layers, dtype=torch.int32),
                done=torch.zeros(layers, dtype=torch.int32),
            )  # fmt: skip
        )
    return pool, flights


def validate(attn: CpuAttention, pool: torch.Tensor, flights: list[CpuFlight], seq: int) -> None:
    """One layer through the program, each flight's output against the float64 reference (the
    timed programs overlap consecutive layers, whose outputs share rows)."""
    layer = [replace(f, ready=f.ready[:1], done=f.done[:1]) for f in flights]
    for f in layer:
        f.ready.fill_(seq)
    attn.decode_layers(pool[:1], layer, seq)
    for f in layer:
        expected, _ = reference_decode(f.q, pool[0], f.block_tables, f.seq_lens)
        torch.testing.assert_close(f.out.double(), expected, rtol=2e-2, atol=2e-2)


def measure(
    args: argparse.Namespace, attn: CpuAttention, batch: int, context: int, host_rate: float
) -> dict:
    gen = torch.Generator().manual_seed(batch * 100_003 + context)
    pool, flights = flights_for(args, batch, context, gen)
    seqs = itertools.count(1)
    layers = pool.shape[0]

    steps = layers * args.flights

    def program(pace_s: float = 0.0) -> tuple[float, float, float]:
        seq = next(seqs)
        release = None
        if pace_s > 0.0:
            release = threading.Thread(target=_release, args=(flights, layers, seq, pace_s))
        else:
            for f in flights:
                f.ready.fill_(seq)
        start = time.perf_counter()
        if release is not None:
            release.start()
        busy = attn.decode_layers(pool, flights, seq)
        if release is not None:
            release.join()
        return time.perf_counter() - start, busy.wall_s, busy.worker_s

    validate(attn, pool, flights, next(seqs))
    program()  # warm-up: workspace, scratch, page faults
    samples = [program() for _ in range(args.repeats)]
    wall = statistics.median(s[0] for s in samples)
    step_bytes = batch * context * args.kv_heads * args.head_dim * 2 * args.dtype.itemsize
    share = statistics.median(s[2] / (attn.num_threads * s[1]) for s in samples if s[1] > 0)
    row = {
        "flights": args.flights,
        "batch": batch,
        "context": context,
        "layers": layers,
        "step_mib": step_bytes / 2**20,
        "step_us": wall / steps * 1e6,
        "busy_step_us": statistics.median(s[1] for s in samples) / steps * 1e6,
        "gbps": step_bytes * steps / wall / GB,
        "host_read_gbps": host_rate / GB,
        "share_of_host": step_bytes * steps / wall / host_rate,
        "pool_share": share,
    }
    if args.paced:
        pace = PACE_OVER_STEP * wall / steps
        paced = [program(pace) for _ in range(args.repeats)]
        row["pace_us"] = pace * 1e6
        row["paced_step_us"] = statistics.median(s[0] for s in paced) / steps * 1e6
        row["paced_busy_step_us"] = statistics.median(s[1] for s in paced) / steps * 1e6
    return row


def _release(flights: list[CpuFlight], layers: int, seq: int, pace_s: float) -> None:
    """Marks step j's inputs ready at j x pace_s from now (layer j // F of flight j % F), as the
    GPU would; it spins rather than sleeps, for microsecond timing."""
    flags = [f.ready.numpy() for f in flights]
    start = time.perf_counter()
    for j in range(layers * len(flights)):
        due = start + j * pace_s
        while time.perf_counter() < due:
            pass
        flags[j % len(flights)][j // len(flights)] = seq


HEADER = (
    f"{'flights':>7} {'batch':>5} {'context':>7} {'layers':>6} {'MiB/step':>8} {'us/step':>8} "
    f"{'GB/s':>6} {'host GB/s':>9} {'of host':>7} {'busy':>5} {'busy us':>8}"
)
PACED_HEADER = f" {'paced':>8} {'+us':>6}"


def print_row(row: dict) -> None:
    paced = row.get("paced_busy_step_us")
    print(
        f"{row['flights']:7d} {row['batch']:5d} {row['context']:7d} {row['layers']:6d} "
        f"{row['step_mib']:8.2f} {row['step_us']:8.1f} {row['gbps']:6.1f} "
        f"{row['host_read_gbps']:9.1f} {row['share_of_host']:7.0%} {row['pool_share']:5.0%} "
        f"{row['busy_step_us']:8.1f}"
        + ("" if paced is None else f" {paced:8.1f} {paced - row['busy_step_us']:+6.1f}"),
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    topo = read_topology()
    parser = argparse.ArgumentParser(
        prog="python -m neod.bench.cpu_program",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--flights", type=int, default=2, help="sub-batches per iteration")
    parser.add_argument("--batch", type=parse_ints, default=[1, 4, 6, 8, 16],
                        help="requests per flight")  # fmt: skip
    parser.add_argument("--context", type=parse_ints, default=[16, 512, 1100, 4096],
                        help="tokens per request")  # fmt: skip
    parser.add_argument("--threads", type=int, default=None,
                        help="pool size (default: the engine's, neod.cpu.pool_cores)")  # fmt: skip
    parser.add_argument("--reserve-cores", type=int, default=1)
    parser.add_argument("--q-heads", type=int, default=64)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128, choices=[64, 128])
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument("--layers", type=int, default=80, help="at most this many per program")
    parser.add_argument("--max-kv-gib", type=float, default=4.0)
    parser.add_argument("--repeats", type=int, default=5, help="timed programs per point")
    parser.add_argument("--products", default="amx-scores", choices=["amx", "amx-scores", "fp32"],
                        help="where the tile products run (AMX where the host has it)")  # fmt: skip
    parser.add_argument("--probe-bytes", type=int, default=1 << 30)
    parser.add_argument("--paced", action="store_true",
                        help="also time each point with its steps released one at a time")
    parser.add_argument("--out", help="also write the JSON report to this file")
    args = parser.parse_args(argv)
    args.dtype = getattr(torch, args.dtype)
    if args.flights < 1:
        parser.error("--flights must be at least 1")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    amx_before = amx_in_use()
    amx = args.products != "fp32" and args.dtype == torch.bfloat16
    use_amx(amx, values=args.products == "amx")
    cores = pool_cores(args.threads, args.reserve_cores, topo) if args.threads else None
    rows = []
    try:
        with CpuAttention(cores=cores) as attn:
            host_rate = attn.probe_read_bandwidth(args.probe_bytes, [attn.num_threads], 3)[0]
            print(
                f"# {topo.model_name}, {attn.num_threads} pool threads on cores "
                f"{list(attn.cores)}; Hq={args.q_heads} Hkv={args.kv_heads} D={args.head_dim} "
                f"{args.dtype} block {args.block_size}; tile products {amx_in_use() or 'fp32'}"
            )
            print(HEADER + (PACED_HEADER if args.paced else ""))
            for batch in args.batch:
                for context in args.context:
                    rows.append(measure(args, attn, batch, context, host_rate))
                    print_row(rows[-1])
    finally:
        use_amx(amx_before is not None, values=amx_before == "scores+values")
    if args.out:
        report = {
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "host": platform.node(),
            "cpu_model": topo.model_name,
            "products": args.products,
            "rows": rows,
        }
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
