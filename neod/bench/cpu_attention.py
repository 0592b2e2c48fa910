"""CPU decode-attention benchmark: the ISPC kernel's KV read rate against the host's measured read
bandwidth, and against torch on the CPU (gather + scaled_dot_product_attention), in one run.

Decode attention is bound by memory bandwidth, so the figure of merit is KV bytes read per second
as a share of what the same number of pinned threads can read at all (the pool's own probe, same
cores). Each point validates the kernel against the torch baseline before timing it. Calls rotate
over several layers' worth of KV so that no call finds the previous one's data in cache; with
`--resident-blocks N` every request reads the same N blocks instead, which stay in cache, so the
rate is the kernel's compute bound (the same work without the memory). "busy" is the share of the
pool's thread time during the timed calls that its workers spent computing; the rest went to
waking them, handing work off and waiting for the slowest worker of each call. With
`--busy-cpus`, a process spins on each of those CPUs while the kernel is timed: a neighbour that
slows some of the pool's workers, as the engine's own threads and a VM's neighbours do while
serving.

    python -m neod.bench.cpu_attention [--quick] [--json] [--out FILE]
        [--batch 1,16,64] [--context 1024,4096,16384] [--threads 1,8,16] [--torch-at 16]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime

import torch
import torch.nn.functional as F

from neod.cpu.topology import pool_cores, read_topology
from neod.kernels.cpu_attention import CpuAttention, amx_in_use, use_amx

logger = logging.getLogger(__name__)

GB = 1e9
ROTATE_BYTES = 1 << 30  # KV touched by consecutive calls: far beyond any last-level cache


def parse_ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def time_calls(fn: Callable[[], None], min_seconds: float, min_calls: int) -> float:
    """Median seconds per call after one warm-up call."""
    fn()
    samples: list[float] = []
    deadline = time.perf_counter() + min_seconds
    while len(samples) < min_calls or time.perf_counter() < deadline:
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


@contextmanager
def spinning(cpus: list[int]) -> Iterator[None]:
    """A busy process pinned to each of `cpus` for the duration."""
    loop = "import os, sys\nos.sched_setaffinity(0, {int(sys.argv[1])})\nwhile True:\n    pass"
    procs = [subprocess.Popen([sys.executable, "-c", loop, str(cpu)]) for cpu in cpus]
    try:
        time.sleep(0.05 if procs else 0.0)  # pinned and spinning before the timing starts
        yield
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


class Point:
    """One (batch, context) workload: `num_layers` KV layers cycled call after call."""

    def __init__(self, args: argparse.Namespace, batch: int, context: int, seed: int,
                 memory: str = "pageable") -> None:
        gen = torch.Generator().manual_seed(seed)
        self.batch, self.context, self.memory = batch, context, memory
        bs, hkv, d = args.block_size, args.kv_heads, args.head_dim
        blocks_per_req = -(-context // bs)
        num_blocks = batch * blocks_per_req
        self.kv_bytes = batch * context * hkv * d * 2 * args.dtype.itemsize
        if args.resident_blocks:
            num_blocks = min(num_blocks, args.resident_blocks)
            self.num_layers = 1
        else:
            self.num_layers = max(1, min(16, math.ceil(ROTATE_BYTES / self.kv_bytes)))
        shape = (self.num_layers, num_blocks, 2, hkv, bs, d)
        # "pinned": page-locked by the CUDA driver, as the engine's host KV pool on a GPU host.
        self.kv = torch.empty(shape, dtype=args.dtype, pin_memory=memory == "pinned")
        self.kv.normal_(generator=gen)
        # Requests' blocks scattered over the pool, as after a while of allocation and freeing
        # (or, cache-resident, the same few blocks over and over).
        order = torch.randperm(batch * blocks_per_req, generator=gen) % num_blocks
        self.block_tables = order.to(torch.int32).view(batch, blocks_per_req).contiguous()
        self.seq_lens = torch.full((batch,), context, dtype=torch.int32)
        self.q = torch.randn(batch, args.q_heads, d, generator=gen).to(args.dtype)
        self.out = torch.empty_like(self.q)
        self.layer = 0
        self.scale = 1.0 / math.sqrt(d)

    def next_kv(self) -> torch.Tensor:
        self.layer = (self.layer + 1) % self.num_layers
        return self.kv[self.layer]

    def kernel_call(self, pool: CpuAttention) -> None:
        pool.decode(self.q, self.next_kv(), self.block_tables, self.seq_lens, self.out)

    def torch_call(self) -> torch.Tensor:
        """Gather the blocks into dense K/V and run SDPA (one query token, GQA)."""
        kv = self.next_kv()[self.block_tables.long()]  # [B, blocks, 2, Hkv, bs, D]
        batch, blocks, _, hkv, bs, d = kv.shape
        kv = kv.permute(2, 0, 3, 1, 4, 5).reshape(2, batch, hkv, blocks * bs, d)
        length = int(self.seq_lens[0])  # every request of a point has the same context
        k, v = kv[0, :, :, :length], kv[1, :, :, :length]
        q = self.q[:, :, None, :]
        return F.scaled_dot_product_attention(q, k, v, scale=self.scale, enable_gqa=True)[:, :, 0]


def run(args: argparse.Namespace) -> list[dict]:
    topo = read_topology()
    cores = {n: pool_cores(n, args.reserve_cores, topo) for n in args.threads}
    amx_before = amx_in_use()
    host_rates = {}
    for threads in args.threads:  # the host's read rate with exactly the pool's cores
        with CpuAttention(cores=cores[threads]) as pool:
            host_rates[threads] = pool.probe_read_bandwidth(args.probe_bytes, [threads], 3)[0]
    rows = []
    for batch in args.batch:
        for context in args.context:
            kv_bytes = batch * context * args.kv_heads * args.head_dim * 2 * args.dtype.itemsize
            if kv_bytes > args.max_kv_gib * 2**30:
                continue
            for memory in args.kv_memory:
                point = Point(args, batch, context, seed=batch * 100_003 + context, memory=memory)
                for threads in args.threads:
                    with CpuAttention(cores=cores[threads]) as pool:
                        for products in args.products:
                            amx = products != "fp32"
                            on = use_amx(amx, values=products == "amx")
                            if amx and (args.dtype != torch.bfloat16 or not on):
                                continue  # fp16 KV, or no AMX here
                            rows.append(measure(args, pool, point, host_rates[threads]))
                            rows[-1]["products"] = products
                            print_row(rows[-1], args)
                del point
    use_amx(amx_before is not None, values=amx_before == "scores+values")
    return rows


def measure(args: argparse.Namespace, pool: CpuAttention, point: Point, host_rate: float) -> dict:
    threads = pool.num_threads
    # Validate: kernel and torch agree on the same layer.
    point.layer = point.num_layers - 1
    expected = point.torch_call().float()
    point.layer = point.num_layers - 1
    point.kernel_call(pool)
    torch.testing.assert_close(point.out.float(), expected, rtol=2e-2, atol=2e-2)

    with spinning(args.busy_cpus):
        worker_before, start = pool.worker_seconds, time.perf_counter()
        kernel_s = time_calls(lambda: point.kernel_call(pool), args.seconds, 5)
        elapsed = time.perf_counter() - start
    pool_share = (pool.worker_seconds - worker_before) / (threads * elapsed)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        run_torch = not args.no_torch and (not args.torch_at or threads in args.torch_at)
        torch_s = time_calls(point.torch_call, args.seconds, 3) if run_torch else None
    finally:
        torch.set_num_threads(previous_threads)
    rate = point.kv_bytes / kernel_s
    return {
        "batch": point.batch,
        "context": point.context,
        "kv_memory": point.memory,
        "tokens": point.batch * point.context,
        "threads": threads,
        "kv_mib": point.kv_bytes / 2**20,
        "kernel_ms": kernel_s * 1e3,
        "kernel_gbps": rate / GB,
        "host_read_gbps": host_rate / GB,
        "share_of_host": rate / host_rate,
        "pool_share": pool_share,
        "torch_ms": None if torch_s is None else torch_s * 1e3,
        "speedup_vs_torch": None if torch_s is None else torch_s / kernel_s,
        "busy_cpus": args.busy_cpus,
    }


HEADER = (f"{'batch':>5} {'context':>7} {'KV mem':>8} {'threads':>7} {'products':>10} "
          f"{'KV MiB':>8} {'ms':>8} "
          f"{'GB/s':>7} "
          f"{'host GB/s':>9} {'of host':>7} {'busy':>5} {'torch ms':>9} {'speedup':>7}")


def print_row(row: dict, args: argparse.Namespace) -> None:
    if args.json:
        return
    torch_ms = "-" if row["torch_ms"] is None else f"{row['torch_ms']:.2f}"
    speedup = "-" if row["speedup_vs_torch"] is None else f"{row['speedup_vs_torch']:.1f}x"
    print(f"{row['batch']:5d} {row['context']:7d} {row['kv_memory']:>8} {row['threads']:7d} "
          f"{row['products']:>10} "
          f"{row['kv_mib']:8.1f} "
          f"{row['kernel_ms']:8.3f} {row['kernel_gbps']:7.1f} {row['host_read_gbps']:9.1f} "
          f"{row['share_of_host']:7.0%} {row['pool_share']:5.0%} {torch_ms:>9} {speedup:>7}",
          flush=True)


def main(argv: list[str] | None = None) -> int:
    topo = read_topology()
    cpus = len(topo.allowed_cpus)
    default_threads = sorted({1, max(1, cpus // 4), max(1, cpus // 2), max(1, cpus - 1), cpus})
    parser = argparse.ArgumentParser(prog="python -m neod.bench.cpu_attention",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=parse_ints, default=[1, 16, 64])
    parser.add_argument("--context", type=parse_ints, default=[1024, 4096, 16384])
    parser.add_argument("--threads", type=parse_ints, default=default_threads)
    parser.add_argument("--q-heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128, choices=[64, 128])
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument("--reserve-cores", type=int, default=1)
    parser.add_argument("--max-kv-gib", type=float, default=4.0, help="skip larger points")
    parser.add_argument("--resident-blocks", type=int, default=0,
                        help="every request reads the same N blocks (cache-resident: the "
                             "compute bound); 0 = distinct blocks from memory")
    parser.add_argument("--probe-bytes", type=int, default=1 << 30)
    parser.add_argument("--seconds", type=float, default=0.5, help="minimum timing per point")
    parser.add_argument("--products", type=lambda text: text.split(","),
                        default=["amx", "amx-scores", "fp32"],
                        help="where the tile products run, compared: amx (scores and values on "
                             "AMX tiles, bf16 KV on CPUs that have them), amx-scores (scores "
                             "only), fp32 (the ISPC kernel's FMAs)")
    parser.add_argument("--kv-memory", type=lambda text: text.split(","), default=["pageable"],
                        help="where the KV lies, compared: pageable (plain host memory), pinned "
                             "(page-locked by CUDA, as the engine's host pool on a GPU host)")
    parser.add_argument("--busy-cpus", type=parse_ints, default=[],
                        help="spin a process on each of these CPUs while the kernel is timed")
    parser.add_argument("--no-torch", action="store_true", help="skip the torch baseline")
    parser.add_argument("--torch-at", type=parse_ints, default=[],
                        help="run the torch baseline only at these thread counts (default: all)")
    parser.add_argument("--quick", action="store_true", help="a small grid (a smoke run)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--out", help="also write the JSON report to this file")
    args = parser.parse_args(argv)
    args.dtype = getattr(torch, args.dtype)
    if not set(args.kv_memory) <= {"pageable", "pinned"}:
        parser.error(f"--kv-memory takes pageable and pinned, not {args.kv_memory}")
    if "pinned" in args.kv_memory and not torch.cuda.is_available():
        parser.error("--kv-memory pinned needs CUDA (the driver page-locks the memory)")
    if not set(args.busy_cpus) <= set(topo.allowed_cpus):
        parser.error(f"--busy-cpus {args.busy_cpus}: this process may run only on CPUs "
                     f"{sorted(topo.allowed_cpus)}")
    if args.quick:
        args.batch, args.context, args.seconds = [4], [2048], 0.1
        args.threads = sorted({1, cpus})
        args.probe_bytes = 256 << 20
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    if not args.json:
        print(f"# {topo.model_name}, {cpus} CPUs ({topo.num_physical_cores} cores); "
              f"Hq={args.q_heads} Hkv={args.kv_heads} D={args.head_dim} {args.dtype} "
              f"block {args.block_size}; torch {torch.__version__}")
        print(HEADER)
    rows = run(args)
    report = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "host": platform.node(),
        "cpu_model": topo.model_name,
        "cpus": cpus,
        "physical_cores": topo.num_physical_cores,
        "torch": torch.__version__,
        "shape": {"q_heads": args.q_heads, "kv_heads": args.kv_heads, "head_dim": args.head_dim,
                  "block_size": args.block_size, "dtype": str(args.dtype)},
        "rows": rows,
    }
    if args.json:
        print(json.dumps(report, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
