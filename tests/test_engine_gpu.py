"""The engine on a GPU: the CUDA kernels, pinned host pool, copy streams and the pipelined stage
order.

Same checks as tests/test_engine.py, on device cuda: NEO mode (real scheduler, and a scripted one
that forces every data path) must give the greedy tokens of GPU-only mode, and every block must
come back.
"""

from __future__ import annotations

import random

import pytest
from test_engine import (
    ScriptedScheduler,
    assert_all_free,
    assert_greedy_equal,
    check_live_tuning_keeps_cpu_requests_tokens,
    make_engine,
    prompts,
    recording_plans,
    run_all,
    tokens_of,
)

from neod.engine.request import SamplingParams

pytestmark = pytest.mark.gpu

SMALL_GPU = {
    "model.device": "cuda",
    "model.dtype": "float16",
    "cache.gpu_kv_gib": 32 * 16 * 2048 / 2**30,
    "cache.cpu_kv_gib": 0.05,
}


def run(engine, ps, params):
    for i, p in enumerate(ps):
        engine.add_request(f"r{i}", p, params)
    return {k: tokens_of(v) for k, v in run_all(engine).items()}


@pytest.mark.parametrize("policy", ["neo", "scripted"])
def test_gpu_neo_greedy_equals_gpu_only(tmp_path, policy):
    ps = prompts(24, seed=11)
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    expected = run(
        make_engine(tmp_path, **{"scheduler.policy": "gpu-only"}, **SMALL_GPU), ps, params
    )
    if policy == "scripted":  # the script ignores capacity: give the GPU room for every request
        engine = make_engine(
            tmp_path, **{**SMALL_GPU, "scheduler.policy": "neo", "cache.gpu_kv_gib": 0.01}
        )
        engine.rt.scheduler = ScriptedScheduler()
    else:
        engine = make_engine(tmp_path, **{"scheduler.policy": "neo"}, **SMALL_GPU)
    got = run(engine, ps, params)
    assert_greedy_equal(engine, {f"r{i}": p for i, p in enumerate(ps)}, expected, got)
    assert_all_free(engine)
    if policy == "scripted":
        assert engine.stats()["iterations"]["pipelined"] > 0
        # The script puts rows on the CPU every iteration: the pool's accounting is live.
        share = engine.stats()["cpu_pool"]["computing_share"]
        assert share is not None and 0 < share <= 1


@pytest.mark.parametrize("policy", ["gpu-only", "neo"])
def test_gpu_chunked_prefills_keep_greedy_tokens(tmp_path, policy):
    """Prompts up to ~5x the token budget go in chunks, whose attention reads their prefix from
    the pool (flash, bottom-right causal): the tokens are those of whole prefills."""
    rng = random.Random(12)
    ps = prompts(10, seed=12) + [[rng.randrange(256) for _ in range(n)] for n in (64, 150, 230)]
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    expected = run(
        make_engine(tmp_path, **{"scheduler.policy": "gpu-only"}, **SMALL_GPU), ps, params
    )
    engine = make_engine(
        tmp_path, **{"scheduler.policy": policy, "scheduler.max_tokens_in_batch": 48}, **SMALL_GPU
    )
    plans = recording_plans(engine)
    got = run(engine, ps, params)
    assert len([n for plan in plans for n in plan.chunked.values()]) >= 230 // 48
    assert_greedy_equal(engine, {f"r{i}": p for i, p in enumerate(ps)}, expected, got)
    assert_all_free(engine)


def test_gpu_prompts_only_the_host_pool_holds_go_there_in_chunks(tmp_path):
    """Prompts longer than the GPU pool (128 tokens) and the token budget: each chunk's attention
    reads the earlier chunks' KV from the pinned host pool through its mapped address."""
    rng = random.Random(13)
    ps = prompts(4, seed=13) + [[rng.randrange(256) for _ in range(n)] for n in (300, 257, 211)]
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    expected = run(
        make_engine(tmp_path, **{"scheduler.policy": "gpu-only"}, **SMALL_GPU), ps, params
    )
    engine = make_engine(tmp_path, **{**SMALL_GPU, "scheduler.policy": "neo",
                                      "cache.gpu_kv_gib": 8 * 16 * 2048 / 2**30,
                                      "scheduler.max_tokens_in_batch": 64})  # fmt: skip
    plans = recording_plans(engine)
    got = run(engine, ps, params)
    cpu_chunks = [n for plan in plans for sid, n in plan.chunked.items() if sid in plan.prefill_cpu]
    assert len(cpu_chunks) >= 300 // 64
    assert_greedy_equal(engine, {f"r{i}": p for i, p in enumerate(ps)}, expected, got)
    assert_all_free(engine)


def test_gpu_decode_attention_is_profiled_past_a_small_pool(tmp_path):
    """The pool holds 512 tokens; the profile's GPU decode attention still reaches the grid's
    end, timed over a scratch cache (the predictor would otherwise extrapolate from launch-bound
    points)."""
    from neod.engine.profiler import GPU_DECODE_GRID_TOKENS

    engine = make_engine(tmp_path, **{"scheduler.policy": "neo"}, **SMALL_GPU)
    assert engine.stats()["kv_gpu"]["blocks_total"] * 16 < GPU_DECODE_GRID_TOKENS
    table = engine.rt.profile.gpu_decode_attn
    # 8 requests of up to 4096 tokens (the tiny model's longest) reach the grid's end.
    eight = table.rows[table.xs.index(8.0)]
    assert eight.xs[-1] == GPU_DECODE_GRID_TOKENS and 512 in eight.xs
    assert eight.ys[-1] > eight.ys[eight.xs.index(512)]  # 64x the KV read


@pytest.mark.parametrize("knobs", [{"cpu_threads": 1}, {"policy": "gpu-only"}])
def test_gpu_live_tuning_while_requests_decode_on_the_cpu_keeps_their_tokens(tmp_path, knobs):
    """The CPU side measured again on a GPU host (copies competing) over the live host pool."""
    check_live_tuning_keeps_cpu_requests_tokens(tmp_path, SMALL_GPU, knobs)


def test_the_gpus_numa_node_is_read_from_its_pci_address():
    from pathlib import Path

    import torch

    from neod.engine.runtime import gpu_numa_node

    props = torch.cuda.get_device_properties(0)
    if not hasattr(props, "pci_domain_id"):
        pytest.skip("this torch does not report the GPU's PCI address")
    address = f"{props.pci_domain_id:04x}:{props.pci_bus_id:02x}:{props.pci_device_id:02x}.0"
    node_file = Path("/sys/bus/pci/devices") / address / "numa_node"
    if not node_file.parent.parent.is_dir() or not any(node_file.parent.parent.iterdir()):
        pytest.skip("this machine's sysfs lists no PCI devices")
    assert node_file.exists(), f"no PCI device at {address}"
    expected = int(node_file.read_text())
    assert gpu_numa_node(torch.device("cuda:0")) == (expected if expected >= 0 else None)


def test_decode_graph_replay_matches_eager_forward(tmp_path):
    import torch

    from neod.engine.batch import build_sub_batch

    engine = make_engine(
        tmp_path,
        **{"scheduler.policy": "gpu-only", "model.device": "cuda", "model.dtype": "float16"},
    )
    for i, p in enumerate(prompts(5, seed=2)):
        engine.add_request(
            f"r{i}", p, SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
        )
    for _ in range(3):
        engine.step()
    seqs = list(engine.running.values())
    for s in seqs:  # cover the slot of the token this step stores
        s.block_ids += engine.gpu_blocks.allocate(
            s.blocks_needed(engine.block_size) - len(s.block_ids)
        )
    batch = build_sub_batch([], [], seqs, [], engine.block_size, engine.rt.device)
    executor = engine.rt.executor
    assert executor.graphs is not None and executor.graphs.accepts(batch)
    graphed = executor.run([batch])[0].clone()
    graphs, executor.graphs = executor.graphs, None
    eager = executor.run([batch])[0]
    executor.graphs = graphs
    torch.testing.assert_close(graphed, eager, rtol=2e-3, atol=2e-3)
    assert torch.equal(graphed.argmax(-1), eager.argmax(-1))


class PrefillOn:
    """Every waiting request prefills on one side; nothing decodes (the test takes one step)."""

    def __init__(self, cpu: bool) -> None:
        self.cpu = cpu

    def schedule(self, waiting, running, cache, limits, step):
        from neod.sched import Plan

        plan = Plan(pipelined=False)
        (plan.prefill_cpu if self.cpu else plan.prefill_gpu).extend(s.seq_id for s in waiting)
        return plan


def test_a_cpu_bound_prefill_needs_no_more_gpu_memory_than_a_gpu_one(tmp_path):
    """The engine thread issues every layer before the CPU stores the first: tensors the copy
    stream reads must not stay reserved for all of them (the activation reserve covers one)."""
    import torch

    peaks = {}
    for cpu in (False, True):
        engine = make_engine(
            tmp_path,
            **{**SMALL_GPU, "cache.gpu_kv_gib": 300 * 16 * 2048 / 2**30, "scheduler.policy": "neo",
               "model.max_model_len": 4096, "scheduler.max_tokens_in_batch": 4000,
               "cache.cpu_kv_gib": 0.2},
        )
        engine.rt.scheduler = PrefillOn(cpu)
        engine.add_request("long", [7] * 3900, SamplingParams(max_tokens=2, ignore_eos=True))
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        engine.step()
        torch.cuda.synchronize()
        peaks[cpu] = torch.cuda.max_memory_allocated() - before
        engine.close()
    assert peaks[True] <= 1.25 * peaks[False], peaks
