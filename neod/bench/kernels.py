"""GPU kernel benchmark: bandwidth of decode attention and swaps against the device's ceilings.

Paged decode attention is memory-bound, so it is reported as KV bytes read per second next to
the device-to-device copy bandwidth (bytes read + written); block swaps are reported next to one
large pinned copy. Small ops are reported as device time per call and host time to issue a call
(the cost NEO's host thread pays between CPU attention runs). Inputs rotate over several buffers
larger than L2 so repeated calls do not measure the cache.

    python -m neod.bench.kernels [--out results.json] [--quick] [--only decode|swap|small]
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import statistics
import time
from collections.abc import Callable

import torch

from neod.kernels import cuda_ops, ops

GIB = 1 << 30
ROTATE_BYTES = 256 << 20  # inputs spread over at least this much memory (H100 L2: 50 MB)
MAX_KV_BYTES = 12 * GIB  # skip decode points whose KV would not fit comfortably
DEV = "cuda"


def _time_ms(fn: Callable[[int], None], target_ms: float = 60.0, repeats: int = 5) -> float:
    """Median device time per call of fn(i), timed with events over a loop of calls."""
    for i in range(3):
        fn(i)
    torch.cuda.synchronize()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn(0)
    stop.record()
    stop.synchronize()
    iters = max(3, min(2000, int(target_ms / max(start.elapsed_time(stop), 1e-3))))
    samples = []
    for _ in range(repeats):
        start.record()
        for i in range(iters):
            fn(i)
        stop.record()
        stop.synchronize()
        samples.append(start.elapsed_time(stop) / iters)
    return statistics.median(samples)


def _graph_us(fn: Callable[[int], None], calls: int = 20, repeats: int = 10) -> float:
    """Median device time per call without launch gaps: `calls` calls in a replayed CUDA graph."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for i in range(3):
            fn(i)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fn(i)
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    samples = []
    for _ in range(repeats):
        start.record()
        graph.replay()
        stop.record()
        stop.synchronize()
        samples.append(start.elapsed_time(stop) * 1e3 / calls)
    return statistics.median(samples)


def _host_us(fn: Callable[[int], None], calls: int = 200) -> float:
    """Host time to issue one call (Python, checks, launch), device work left queued."""
    fn(0)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(calls):
        fn(i)
    host_us = (time.perf_counter() - t0) / calls * 1e6
    torch.cuda.synchronize()
    return host_us


def copy_bandwidths(nbytes: int = GIB) -> dict[str, float]:
    """Device-to-device (read + write) and pinned host<->device copy bandwidth, GB/s."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=DEV).random_()
    dst = torch.empty_like(src)
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    host.copy_(src)  # never time copies of untouched memory
    d2d = _time_ms(lambda i: dst.copy_(src), target_ms=100)
    h2d = _time_ms(lambda i: dst.copy_(host, non_blocking=True), target_ms=100)
    d2h = _time_ms(lambda i: host.copy_(src, non_blocking=True), target_ms=100)
    return {
        "d2d_gbps": 2 * nbytes / d2d / 1e6,
        "h2d_gbps": nbytes / h2d / 1e6,
        "d2h_gbps": nbytes / d2h / 1e6,
    }


def decode_point(
    batch: int, context: int, num_q_heads: int, num_kv_heads: int, head_dim: int, block_size: int
) -> dict[str, float]:
    """Time paged decode attention with every request at `context` tokens (blocks scattered)."""
    torch.cuda.empty_cache()  # the previous point's pool: avoid fragmenting the next one
    dtype = torch.bfloat16
    blocks_per_req = math.ceil(context / block_size)
    kv_bytes = batch * context * 2 * num_kv_heads * head_dim * dtype.itemsize
    rotations = max(1, min(8, math.ceil(ROTATE_BYTES / kv_bytes)))
    num_blocks = rotations * batch * blocks_per_req
    kv_layer = torch.randn(
        (num_blocks, 2, num_kv_heads, block_size, head_dim), dtype=dtype, device=DEV
    )
    perm = torch.randperm(num_blocks, device=DEV).to(torch.int32)
    tables = perm.view(rotations, batch, blocks_per_req)
    seq_lens = torch.full((batch,), context, dtype=torch.int32, device=DEV)
    queries = torch.randn((rotations, batch, num_q_heads, head_dim), dtype=dtype, device=DEV)
    out = torch.empty_like(queries[0])
    scale = head_dim**-0.5

    def run(i: int) -> None:
        r = i % rotations
        ops.paged_decode_attention(queries[r], kv_layer, tables[r], seq_lens, scale, out=out)

    device_us = _graph_us(run)
    host_us = _host_us(run, calls=50)
    return {"device_us": device_us, "host_us": host_us, "kv_gbps": kv_bytes / device_us / 1e3}


def swap_bandwidths() -> list[dict]:
    """GB/s of swapping 512 block-layers x 32 layers of a Llama-3-8B pool (64 KiB each).

    Scattered ids model a fragmented pool (one copy per block-layer); contiguous ids let the
    memcpy path merge each layer's run into one copy.
    """
    num_layers, num_blocks, num_pairs, shape = 32, 1024, 512, (2, 8, 16, 128)
    gpu_pool = torch.randn((num_layers, num_blocks, *shape), dtype=torch.bfloat16, device=DEV)
    host_pool = torch.empty((num_layers, num_blocks, *shape), dtype=torch.bfloat16, pin_memory=True)
    host_pool.copy_(gpu_pool)  # never time copies of untouched memory
    nbytes = num_layers * num_pairs * gpu_pool[0, 0].numel() * gpu_pool.element_size()
    patterns = {
        "scattered": torch.stack((torch.randperm(num_blocks), torch.randperm(num_blocks)), 1),
        "contiguous": torch.stack((torch.arange(num_blocks), torch.arange(num_blocks)), 1),
    }
    stream = torch.cuda.Stream()
    rows = []
    for pattern, all_pairs in patterns.items():
        pairs = all_pairs[:num_pairs]
        for direction in ("d2h", "h2d"):
            src, dst = (gpu_pool, host_pool) if direction == "d2h" else (host_pool, gpu_pool)
            row = {"pattern": pattern, "direction": direction}
            for method in cuda_ops.SWAP_METHODS:
                call = functools.partial(
                    cuda_ops.swap_blocks, src, dst, pairs, None, stream, method
                )
                with torch.cuda.stream(stream):
                    ms = _time_ms(lambda i, call=call: call(), target_ms=200, repeats=3)
                row[method] = nbytes / ms / 1e6
            rows.append(row)
    return rows


def small_ops(num_tokens: int) -> dict[str, dict[str, float]]:
    """Device and host time per call of the small ops at Llama-3-8B sizes."""
    hidden, inter, num_q_heads, num_kv_heads, head_dim = 4096, 14336, 32, 8, 128
    dtype = torch.bfloat16
    x = torch.randn((num_tokens, hidden), dtype=dtype, device=DEV)
    residual = torch.randn_like(x)
    weight = torch.randn(hidden, dtype=dtype, device=DEV)
    gate_up = torch.randn((num_tokens, 2 * inter), dtype=dtype, device=DEV)
    sizes = [num_q_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim]
    qkv = torch.randn((num_tokens, sum(sizes)), dtype=dtype, device=DEV)
    q, k, v = (t.unflatten(-1, (-1, head_dim)) for t in qkv.split(sizes, dim=-1))
    positions = torch.randint(0, 8192, (num_tokens,), device=DEV)
    inv_freq = 1.0 / 500000.0 ** (torch.arange(0, head_dim, 2, device=DEV) / head_dim)
    angles = torch.arange(8192, device=DEV)[:, None] * inv_freq[None, :]
    cos_sin = torch.cat((angles.cos(), angles.sin()), -1).float()
    kv_layer = torch.zeros((4096, 2, num_kv_heads, 16, head_dim), dtype=dtype, device=DEV)
    slots = torch.randperm(4096 * 16, device=DEV)[:num_tokens]
    calls = {
        "fused_add_rms_norm_": lambda: ops.fused_add_rms_norm_(x, residual, weight, 1e-5),
        "rotary_embedding_": lambda: ops.rotary_embedding_(positions, q, k, cos_sin),
        "silu_and_mul": lambda: ops.silu_and_mul(gate_up),
        "store_kv_": lambda: ops.store_kv_(k, v, kv_layer, slots),
        "torch mul_ (baseline)": lambda: gate_up.mul_(1.0),  # a plain torch launch, for scale
    }
    results = {}
    for name, call in calls.items():
        results[name] = {
            "device_us": _graph_us(lambda i, call=call: call()),
            "host_us": _host_us(lambda i, call=call: call()),
        }
    return results


def _report_decode(results: dict, copy: dict[str, float], quick: bool) -> None:
    batches = [1, 8, 32, 128] if quick else [1, 8, 32, 64, 128, 256]
    contexts = [1024, 8192, 32768] if quick else [512, 2048, 8192, 32768]
    shapes = {"llama3-8b": (32, 8, 128), "llama3-70b": (64, 8, 128)}
    results["decode"] = []
    print("\npaged decode attention, bf16, block 16: KV GB/s (% of D2D copy) device us / host us")
    for model, (num_q_heads, num_kv_heads, head_dim) in shapes.items():
        for context in contexts:
            cells = []
            for batch in batches:
                if batch * context * 2 * num_kv_heads * head_dim * 2 > MAX_KV_BYTES:
                    continue
                point = decode_point(batch, context, num_q_heads, num_kv_heads, head_dim, 16)
                results["decode"].append(dict(model=model, batch=batch, context=context, **point))
                pct = 100 * point["kv_gbps"] / copy["d2d_gbps"]
                cells.append(
                    f"B={batch} {point['kv_gbps']:.0f} ({pct:.0f}%) "
                    f"{point['device_us']:.0f}/{point['host_us']:.0f}"
                )
            print(f"  {model} ctx {context:>5}: " + " | ".join(cells))


def _report_swap(results: dict, copy: dict[str, float]) -> None:
    results["swap"] = swap_bandwidths()
    print("\nswap, 512 block-layers x 32 layers of 64 KiB: GB/s")
    for row in results["swap"]:
        cells = ", ".join(f"{m} {row[m]:.1f}" for m in cuda_ops.SWAP_METHODS)
        pinned = copy[f"{row['direction']}_gbps"]
        print(f"  {row['pattern']:>10} {row['direction']}: {cells} (one pinned copy: {pinned:.1f})")


def _report_small_ops(results: dict) -> None:
    results["small_ops"] = {}
    print("\nsmall ops (Llama-3-8B sizes, bf16): device us / host us per call")
    for num_tokens in (1, 256, 4096):
        row = small_ops(num_tokens)
        results["small_ops"][num_tokens] = row
        cells = ", ".join(f"{n} {r['device_us']:.1f}/{r['host_us']:.1f}" for n, r in row.items())
        print(f"  T={num_tokens:>4}: {cells}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="write all results as JSON to this file")
    parser.add_argument("--quick", action="store_true", help="a smaller decode grid")
    parser.add_argument(
        "--only", choices=["decode", "swap", "small"], help="run one section (after the copies)"
    )
    args = parser.parse_args()
    if not cuda_ops.available():
        raise SystemExit(f"needs a GPU and {cuda_ops.library_path()} (scripts/build_cuda.sh)")
    props = torch.cuda.get_device_properties(0)
    results: dict = {"device": props.name, "sms": props.multi_processor_count}
    results["library"] = str(cuda_ops.library_path())
    results["copy"] = copy = copy_bandwidths()
    print(
        f"{props.name}: D2D copy {copy['d2d_gbps']:.0f} GB/s (read+write), pinned H2D "
        f"{copy['h2d_gbps']:.1f} GB/s, D2H {copy['d2h_gbps']:.1f} GB/s"
    )
    if args.only in (None, "decode"):
        _report_decode(results, copy, args.quick)
    if args.only in (None, "swap"):
        _report_swap(results, copy)
    if args.only in (None, "small"):
        _report_small_ops(results)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
