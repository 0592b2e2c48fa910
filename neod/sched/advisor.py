"""Steady-state throughput of GPU-only serving versus NEO for a workload, from a cost model.

The question an operator asks before turning NEO on. The model of the steady state: every running
request emits one token per iteration; its context averages input + output/2 tokens over its life
(plus half a block of rounding); each finishing request is replaced by a new one, so an iteration
also carries, amortised, batch * input/output prompt tokens of prefill (all on the GPU) and, for
NEO, the layer-wise copy-out of the new CPU requests' KV. GPU-only fits as many requests as GPU KV
memory, the batch size and the token budget allow. NEO keeps that GPU batch and adds CPU-decoded
requests (bounded by host KV memory and the same limits), choosing their number, their split between
the sub-batches and the mode that maximise tokens per second with the same formulas the scheduler
uses.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from neod.sched.cost import BatchLoad, CostModel, pipelined_s, sequential_s
from neod.sched.views import Limits, blocks_for


def _argmin_int(f: Callable[[int], float], lo: int, hi: int) -> int:
    """Minimise a near-unimodal f over [lo, hi]: a coarse scan, refined around the best point."""
    while hi - lo > 32:
        step = (hi - lo) / 32
        points = sorted({lo + round(i * step) for i in range(33)})
        best = min(points, key=f)
        lo, hi = max(lo, best - int(step) - 1), min(hi, best + int(step) + 1)
    return min(range(lo, hi + 1), key=f)


def predict_workload(
    cost_model: CostModel,
    num_layers: int,
    kv_bytes_per_token: int,
    gpu_kv_bytes: int,
    cpu_kv_bytes: int,
    input_len: int,
    output_len: int,
    limits: Limits,
    *,
    block_size: int = 16,
    margin: float = 0.03,
) -> dict[str, Any]:
    """GPU-only and NEO throughput (output tokens/s), batch sizes, mode and gain, JSON-ready."""
    if min(num_layers, kv_bytes_per_token, input_len, output_len, block_size) < 1:
        raise ValueError(
            "num_layers, kv_bytes_per_token, input_len, output_len and block_size must be >= 1"
        )
    avg_ctx = input_len + output_len // 2
    request_bytes = kv_bytes_per_token * (avg_ctx + block_size // 2)
    prefill_per_request = input_len / output_len  # prompt tokens per iteration per running request
    token_cap = int(limits.max_tokens_in_batch / (1.0 + prefill_per_request))
    prompt_attn_s = cost_model.prefill_attn_s([input_len])
    copy_blocks = blocks_for(input_len, block_size) / output_len  # per CPU request per iteration

    def load(num_gpu: int, num_total: int) -> BatchLoad:
        base = BatchLoad(
            num_tokens=round(num_total * prefill_per_request),
            prefill_attn_s=num_total / output_len * prompt_attn_s,
        )
        return base.plus_gpu_decodes(num_gpu, num_gpu * avg_ctx)

    gpu_bounds = {
        "gpu memory": gpu_kv_bytes // request_bytes,
        "max_batch_size": limits.max_batch_size,
        "max_tokens_in_batch": token_cap,
    }
    gpu_bound = min(gpu_bounds, key=gpu_bounds.__getitem__)
    num_gpu = max(0, gpu_bounds[gpu_bound])
    gpu_s = sequential_s(cost_model, num_layers, load(num_gpu, num_gpu), 0)
    gpu_rate = num_gpu / gpu_s if gpu_s > 0 else 0.0

    def neo_plan(num_cpu: int) -> tuple[float, int, bool]:
        """(iteration seconds, CPU requests in b1, pipelined) for num_cpu CPU requests."""
        b0 = load(num_gpu, num_gpu + num_cpu)
        swap = round(num_cpu * copy_blocks)
        seq_s = sequential_s(
            cost_model, num_layers, b0.plus_cpu_decodes(num_cpu, num_cpu * avg_ctx), swap
        )
        if num_cpu < 1:
            return seq_s, 0, False

        def pipe(k1: int) -> float:
            b0k = b0.plus_cpu_decodes(num_cpu - k1, (num_cpu - k1) * avg_ctx)
            if not b0k.num_seqs:
                return float("inf")
            return pipelined_s(
                cost_model, num_layers, b0k, BatchLoad().plus_cpu_decodes(k1, k1 * avg_ctx), swap
            )

        k1 = _argmin_int(pipe, 1, num_cpu)
        return (pipe(k1), k1, True) if pipe(k1) < seq_s else (seq_s, 0, False)

    def neo_rate(num_cpu: int) -> float:
        t = neo_plan(num_cpu)[0]
        return (num_gpu + num_cpu) / t if t > 0 else 0.0

    cpu_bounds = {
        "host memory": cpu_kv_bytes // request_bytes,
        "max_batch_size": limits.max_batch_size - num_gpu,
        "max_tokens_in_batch": token_cap - num_gpu,
    }
    cpu_bound = min(cpu_bounds, key=cpu_bounds.__getitem__)
    max_cpu = max(0, cpu_bounds[cpu_bound])
    num_cpu = _argmin_int(lambda n: -neo_rate(n), 0, max_cpu)
    neo_s, num_b1, pipelined = neo_plan(num_cpu)
    neo_rate_best = neo_rate(num_cpu)
    if neo_rate_best <= gpu_rate:  # adding nothing is always possible
        num_cpu, neo_s, num_b1, pipelined, neo_rate_best = 0, gpu_s, 0, False, gpu_rate
    gain = neo_rate_best / gpu_rate if gpu_rate > 0 else None
    use_neo = (neo_rate_best > 0) if gain is None else gain > 1.0 + margin
    return {
        "input_len": input_len,
        "output_len": output_len,
        "avg_context_tokens": avg_ctx,
        "gpu_only": {
            "gpu_batch": num_gpu,
            "bound": gpu_bound,
            "iteration_s": gpu_s,
            "tokens_per_s": gpu_rate,
        },
        "neo": {
            "gpu_batch": num_gpu,
            "cpu_batch": num_cpu,
            "cpu_b0": num_cpu - num_b1,
            "cpu_b1": num_b1,
            "cpu_bound": cpu_bound if num_cpu == max_cpu else "cost",
            "pipelined": pipelined,
            "iteration_s": neo_s,
            "tokens_per_s": neo_rate_best,
        },
        "gain": gain,
        "mode": "neo" if use_neo else "gpu-only",
    }
