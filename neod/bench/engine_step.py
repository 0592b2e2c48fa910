"""GPU-only decode step and prefill speed against the hardware's limits, measured in the same run.

    python -m neod.bench.engine_step --preset llama-3.1-8b

Decode: one step of B requests at context C (the model's real forward through the executor:
projections, CUDA kernels, paged attention, LM head, argmax) against the roofline (weight bytes +
KV bytes) / HBM bandwidth, the bandwidth measured here with a device-to-device copy. Prefill:
tokens/s of 2K- and 8K-token batches against the bf16 matmul rate measured here on the model's own
MLP shape. Points whose KV does not
fit in GPU memory are reported as such, never faked by sharing blocks.
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from typing import Any

import torch

from neod.cache.pool import KVLayout, allocate_pool
from neod.engine.batch import SubBatch, build_sub_batch
from neod.engine.executor import Executor
from neod.engine.graphs import DecodeGraphs
from neod.engine.sequence import decoding_sequences
from neod.model.llama import LlamaModel
from neod.model.presets import get_preset

GIB = 1 << 30


def cuda_time(fn, repeats: int = 10, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / repeats


def _decode_step(executor: Executor, sub: SubBatch) -> None:
    """One decode step: the forward through the executor, then greedy argmax."""
    logits = executor.run([sub])[0]
    torch.argmax(logits, dim=-1)


def _run_sub(executor: Executor, sub: SubBatch) -> list[torch.Tensor]:
    """One executor forward over a single sub-batch."""
    return executor.run([sub])


def measure_hbm_bandwidth(device: torch.device) -> float:
    src = torch.empty(2 * GIB, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    seconds = cuda_time(lambda: dst.copy_(src))
    return 2 * src.numel() / seconds  # bytes read + written


def measure_matmul_flops(
    device: torch.device, hidden: int, inter: int, dtype: torch.dtype
) -> float:
    a = torch.randn(8192, hidden, device=device, dtype=dtype)
    b = torch.randn(hidden, inter, device=device, dtype=dtype)
    seconds = cuda_time(lambda: a @ b)
    return 2 * 8192 * hidden * inter / seconds


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="llama-3.1-8b")
    parser.add_argument("--batches", default="1,8,32,128,256")
    parser.add_argument("--contexts", default="1024,4096")
    parser.add_argument("--prefill-tokens", default="2048,8192")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    device = torch.device("cuda")
    config = get_preset(args.preset)
    dtype = torch.bfloat16
    model = LlamaModel.random(config, device, dtype)
    w = model.weights
    layer_bytes = sum(t.numel() * t.element_size() for lw in w.layers for t in vars(lw).values())
    weight_bytes = (
        layer_bytes + w.lm_head.numel() * w.lm_head.element_size()
    )  # what one decode step reads
    hbm = measure_hbm_bandwidth(device)
    flops = measure_matmul_flops(device, config.hidden_size, config.intermediate_size, dtype)
    layout = KVLayout(
        config.num_hidden_layers, config.num_key_value_heads, config.head_dim, 16, dtype
    )
    free, _ = torch.cuda.mem_get_info(device)
    num_blocks = int((free - 6 * GIB) // layout.block_bytes)
    pool = allocate_pool(layout, num_blocks, device)
    batches = [int(b) for b in args.batches.split(",")]
    executor = Executor(
        model, pool, None, None, max(batches), max(int(t) for t in args.prefill_tokens.split(","))
    )
    max_ctx = max(int(c) for c in args.contexts.split(","))
    graphs = DecodeGraphs(model, pool, max(batches), max_ctx + 16)
    graphs.capture_all()
    report: dict[str, Any] = {
        "preset": args.preset,
        "gpu": torch.cuda.get_device_name(device),
        "hbm_gbps": hbm / 1e9,
        "matmul_tflops": flops / 1e12,
        "weight_gib": weight_bytes / GIB,
        "decode": [],
        "prefill": [],
    }
    for ctx in (int(c) for c in args.contexts.split(",")):
        for b in batches:
            kv_bytes = b * ctx * layout.bytes_per_token
            if b * -(-ctx // 16) > num_blocks:
                report["decode"].append({"batch": b, "context": ctx, "fits": False})
                continue
            seqs = decoding_sequences(b, ctx, 16, 0, config.vocab_size)
            sub = build_sub_batch([], [], seqs, [], 16, device)
            step = functools.partial(_decode_step, executor, sub)
            executor.graphs = None
            eager_s = cuda_time(step)
            host_start = time.perf_counter()
            step()
            host_s = time.perf_counter() - host_start
            executor.graphs = graphs
            seconds = cuda_time(step)
            roofline = (weight_bytes + kv_bytes) / hbm
            report["decode"].append(
                {
                    "batch": b,
                    "context": ctx,
                    "fits": True,
                    "step_ms": seconds * 1e3,
                    "eager_step_ms": eager_s * 1e3,
                    "roofline_ms": roofline * 1e3,
                    "x_roofline": seconds / roofline,
                    "eager_host_issue_ms": host_s * 1e3,
                }
            )
    for tokens in (int(t) for t in args.prefill_tokens.split(",")):
        prompt_len = min(tokens, 2048)
        seqs = decoding_sequences(tokens // prompt_len, prompt_len, 16, 0, config.vocab_size)
        for s in seqs:
            s.num_computed_tokens = 0
        sub = build_sub_batch(seqs, [], [], [], 16, device)
        seconds = cuda_time(functools.partial(_run_sub, executor, sub), repeats=5)
        matmul_flop = 2 * layer_bytes / dtype.itemsize * tokens
        attn_flop = (
            2
            * 2
            * config.num_hidden_layers
            * config.num_attention_heads
            * config.head_dim
            * sum(len(s.token_ids) ** 2 / 2 for s in seqs)
        )
        report["prefill"].append(
            {
                "tokens": tokens,
                "prompts": len(seqs),
                "seconds": seconds,
                "tokens_per_s": tokens / seconds,
                "achieved_tflops": (matmul_flop + attn_flop) / seconds / 1e12,
                "share_of_matmul_peak": (matmul_flop + attn_flop) / seconds / flops,
            }
        )
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(
        f"{args.preset} on {report['gpu']}: weights {report['weight_gib']:.1f} GiB, "
        f"HBM {report['hbm_gbps']:.0f} GB/s (copy), "
        f"bf16 matmul {report['matmul_tflops']:.0f} TFLOP/s"
    )
    print(
        f"{'batch':>6} {'ctx':>6} {'graph ms':>8} {'roofline':>9} {'x':>6} "
        f"{'eager ms':>9} {'eager host':>10}"
    )
    for r in report["decode"]:
        if not r["fits"]:
            print(f"{r['batch']:6} {r['context']:6}   KV does not fit in GPU memory")
            continue
        print(
            f"{r['batch']:6} {r['context']:6} {r['step_ms']:8.2f} {r['roofline_ms']:9.2f} "
            f"{r['x_roofline']:6.2f} {r['eager_step_ms']:9.2f} {r['eager_host_issue_ms']:10.2f}"
        )
    for r in report["prefill"]:
        print(
            f"prefill {r['tokens']} tokens ({r['prompts']} prompts): "
            f"{r['tokens_per_s']:.0f} tok/s, {r['achieved_tflops']:.0f} TFLOP/s = "
            f"{100 * r['share_of_matmul_peak']:.0f}% of matmul peak"
        )


if __name__ == "__main__":
    main()
