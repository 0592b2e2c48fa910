"""The advisor on roofline cost models of the benchmark hosts: it must reproduce the issue's
estimates (offloading pays on a memory-starved GPU, never when the GPU has room) and never predict
a loss."""

from __future__ import annotations

import time

import pytest

from neod.sched import Limits, predict_workload

GIB = 1 << 30


class RooflineCost:
    """Every stage streams its bytes at the device's bandwidth, plus a fixed launch cost."""

    def __init__(self, hidden, intermediate, num_heads, num_kv_heads, vocab, gpu_bw, cpu_bw):
        head_dim = 128
        self.layer_weight_bytes = 2 * (
            hidden * (num_heads + 2 * num_kv_heads) * head_dim
            + num_heads * head_dim * hidden
            + 3 * hidden * intermediate
        )
        self.kv_token_bytes = 2 * num_kv_heads * head_dim * 2  # K and V, bf16, one layer
        self.row_bytes = (2 * num_heads + 2 * num_kv_heads) * head_dim * 2  # QKV out, O back
        self.lm_head_bytes = 2 * vocab * hidden
        self.gpu_bw, self.cpu_bw, self.pcie_bw = gpu_bw, cpu_bw, 50e9
        self.params_per_token = self.layer_weight_bytes // 2

    def linear_s(self, n):
        return (
            max(self.layer_weight_bytes / self.gpu_bw, 2 * self.params_per_token * n / 700e12)
            + 8e-6
        )

    def prefill_attn_s(self, lens):
        return sum(n * n for n in lens) * 4 * 8192 / 500e12 + 5e-6

    def gpu_decode_attn_s(self, n, ctx):
        return ctx * self.kv_token_bytes / self.gpu_bw + 5e-6

    def cpu_decode_attn_s(self, n, ctx):
        return ctx * self.kv_token_bytes / self.cpu_bw + 20e-6

    def transfer_s(self, n):
        return n * self.row_bytes / self.pcie_bw + 10e-6

    def swap_s(self, blocks):
        return blocks * 16 * self.kv_token_bytes / self.pcie_bw + 10e-6

    def iteration_overhead_s(self, n):
        return self.lm_head_bytes / self.gpu_bw + 1e-3

    def pipeline_handoff_s(self):
        return 0.0


LLAMA_8B_H100 = {
    "hidden": 4096,
    "intermediate": 14336,
    "num_heads": 32,
    "num_kv_heads": 8,
    "vocab": 128256,
    "gpu_bw": 3.0e12,
    "cpu_bw": 85e9,
}
LLAMA_70B_H200 = {
    "hidden": 8192,
    "intermediate": 28672,
    "num_heads": 64,
    "num_kv_heads": 8,
    "vocab": 128256,
    "gpu_bw": 3.4e12,
    "cpu_bw": 94e9,
}


def predict(shape, layers, gpu_kv_gib, output_len=200):
    cost = RooflineCost(**shape)
    return predict_workload(
        cost,
        layers,
        layers * cost.kv_token_bytes,
        int(gpu_kv_gib * GIB),
        100 * GIB,
        1000,
        output_len,
        Limits(512, 16384, "auto"),
    )


def test_memory_starved_8b_gains_from_offloading():
    result = predict(LLAMA_8B_H100, 32, 0.5)
    assert result["mode"] == "neo" and result["neo"]["pipelined"]
    assert 1.25 < result["gain"] < 1.8
    assert result["gpu_only"]["bound"] == "gpu memory"
    assert result["neo"]["cpu_b0"] + result["neo"]["cpu_b1"] == result["neo"]["cpu_batch"] > 0


@pytest.mark.parametrize("gpu_kv_gib", [2, 8])
def test_8b_with_room_on_the_gpu_stays_gpu_only(gpu_kv_gib):
    result = predict(LLAMA_8B_H100, 32, gpu_kv_gib)
    assert result["mode"] == "gpu-only" and result["gain"] < 1.03


def test_70b_on_one_h200_gains_most_with_little_kv():
    tight, roomy = predict(LLAMA_70B_H200, 80, 2), predict(LLAMA_70B_H200, 80, 5)
    assert tight["mode"] == "neo" and tight["gain"] > 1.6
    assert 1.0 <= roomy["gain"] < tight["gain"]


@pytest.mark.parametrize("output_len", [50, 100, 200, 400])
def test_neo_is_never_predicted_slower(output_len):
    for shape, layers in ((LLAMA_8B_H100, 32), (LLAMA_70B_H200, 80)):
        for gib in (0.5, 2, 8):
            result = predict(shape, layers, gib, output_len)
            assert result["neo"]["tokens_per_s"] >= result["gpu_only"]["tokens_per_s"] > 0
            if result["mode"] == "gpu-only":
                assert result["gain"] <= 1.03


def test_without_host_memory_nothing_is_offloaded():
    cost = RooflineCost(**LLAMA_8B_H100)
    result = predict_workload(
        cost, 32, 32 * cost.kv_token_bytes, GIB // 2, 0, 1000, 200, Limits(256, 8192, "auto")
    )
    assert result["neo"]["cpu_batch"] == 0 and result["mode"] == "gpu-only"
    assert result["neo"]["cpu_bound"] == "host memory"


def test_advice_is_quick():
    start = time.perf_counter()
    predict(LLAMA_70B_H200, 80, 2)
    assert time.perf_counter() - start < 2.0
