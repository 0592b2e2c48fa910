"""Steady-state throughput of GPU-only serving versus NEO for a workload, from a cost model.

The question an operator asks before turning NEO on. The model of the steady state: every running
request emits one token per iteration; its context averages input + output/2 tokens over its life
(plus half a block of rounding); each finishing request is replaced by a new one, so an iteration
also carries, amortised, batch * input/output prompt tokens of prefill (all on the GPU) and, for
NEO, the layer-wise copy-out of the new CPU requests' KV. GPU-only fits as many requests as GPU KV
memory, the batch size and the token budget allow. NEO keeps that GPU batch and adds the CPU-decoded
requests the scheduler's own split would take (bounded by host KV memory and the same limits), with
its sub-batch split and mode.
"""

from __future__ import annotations

from typing import Any

from neod.sched.cost import BatchLoad, CostModel, sequential_s
from neod.sched.split import CpuCandidate, DecodeSplit, SplitRule, split_cpu_decodes
from neod.sched.views import Limits, blocks_for


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
    split_rule: SplitRule = SplitRule(),
) -> dict[str, Any]:
    """GPU-only and NEO throughput (output tokens/s), batch sizes, mode and gain, JSON-ready."""
    if min(num_layers, kv_bytes_per_token, input_len, output_len, block_size) < 1:
        raise ValueError("num_layers, kv_bytes_per_token, lengths and block_size must be >= 1")
    avg_ctx = input_len + output_len // 2
    request_bytes = kv_bytes_per_token * (avg_ctx + block_size // 2)
    prefill_share = input_len / output_len  # prompt tokens per iteration per running request
    token_cap = int(limits.max_tokens_in_batch / (1.0 + prefill_share))
    prompt_attn_s = cost_model.prefill_attn_s([input_len])
    copy_blocks = blocks_for(input_len, block_size) / output_len  # per CPU request and iteration

    def load(num_gpu: int, num_total: int) -> BatchLoad:
        base = BatchLoad(
            num_tokens=round(num_total * prefill_share),
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

    cpu_bounds = {
        "host memory": cpu_kv_bytes // request_bytes,
        "max_batch_size": limits.max_batch_size - num_gpu,
        "max_tokens_in_batch": token_cap - num_gpu,
    }
    cpu_bound = min(cpu_bounds, key=cpu_bounds.__getitem__)
    max_cpu = max(0, cpu_bounds[cpu_bound])
    # As many CPU requests as the scheduler's admission control keeps: those its split decodes
    # around the GPU decodes alone. The iteration is then rated with its prefill and copies.
    cands = [CpuCandidate(i, avg_ctx) for i in range(max_cpu)]
    admitted = split_cpu_decodes(
        cost_model, num_layers, load(num_gpu, 0), (), cands, max_cpu, 0, split_rule
    )
    num_cpu = len(admitted.b0_ids) + len(admitted.b1_ids)
    split = split_cpu_decodes(
        cost_model,
        num_layers,
        load(num_gpu, num_gpu + num_cpu),
        cands[:num_cpu],
        (),
        0,
        round(num_cpu * copy_blocks),
        split_rule,
    )
    neo = _rated(split)
    if neo["tokens_per_s"] <= gpu_rate:  # taking no CPU request is always possible
        neo = {
            "cpu_b0": 0,
            "cpu_b1": 0,
            "pipelined": False,
            "iteration_s": gpu_s,
            "tokens_per_s": gpu_rate,
        }
    num_cpu = neo["cpu_b0"] + neo["cpu_b1"]
    gain = neo["tokens_per_s"] / gpu_rate if gpu_rate > 0 else None
    use_neo = (neo["tokens_per_s"] > 0) if gain is None else gain > 1.0 + margin
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
            "cpu_bound": cpu_bound if num_cpu == max_cpu else "cpu time",
            **neo,
        },
        "gain": gain,
        "mode": "neo" if use_neo else "gpu-only",
    }


def _rated(split: DecodeSplit) -> dict[str, Any]:
    if split.iter_s <= 0:
        return {
            "cpu_b0": 0,
            "cpu_b1": 0,
            "pipelined": False,
            "iteration_s": 0.0,
            "tokens_per_s": 0.0,
        }
    return {
        "cpu_b0": len(split.b0_ids),
        "cpu_b1": len(split.b1_ids),
        "pipelined": split.pipelined,
        "iteration_s": split.iter_s,
        "tokens_per_s": split.num_tokens_out / split.iter_s,
    }
