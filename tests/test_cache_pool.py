"""KV pool layout, sizing limits and allocation."""

from __future__ import annotations

import os

import pytest
import torch

from neod.cache.allocator import BlockAllocator
from neod.cache.pool import KVLayout, allocate_pool, gpu_pool_blocks, host_pool_blocks

LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=64, block_size=16, dtype=torch.bfloat16)


def test_layout_sizes_match_the_tensor():
    pool = allocate_pool(LAYOUT, 3, torch.device("cpu"))
    assert pool.shape == (2, 3, 2, 2, 16, 64)
    assert LAYOUT.block_bytes * 3 == pool.numel() * pool.element_size()
    assert LAYOUT.bytes_per_token == LAYOUT.block_bytes // 16
    assert not pool.any()


def test_host_pool_is_first_touched_on_the_given_cpus_and_affinity_restored():
    before = os.sched_getaffinity(0)
    cpus = sorted(before)[:1]
    pool = allocate_pool(LAYOUT, 4, torch.device("cpu"), local_to_cpus=cpus)
    assert os.sched_getaffinity(0) == before
    assert pool.shape[1] == 4 and not pool.any()


def test_host_pool_request_beyond_the_limits_names_the_limit():
    with pytest.raises(MemoryError, match="cpu_kv_gib"):
        host_pool_blocks(LAYOUT, kv_gib=10**6, pinned=False)
    wanted = int(0.001 * (1 << 30))
    assert host_pool_blocks(LAYOUT, kv_gib=0.001, pinned=False) == wanted // LAYOUT.block_bytes


@pytest.mark.parametrize(
    ("free_gib", "fix"),
    [(20, "set cache.gpu_memory_utilization to 0.86 or more"), (2, "use a smaller model")],
)
def test_a_gpu_without_room_for_kv_names_the_fix(monkeypatch, free_gib, fix):
    """100 GiB device, 5 GiB kept for activations, utilisation 0.8: the error says what utilisation
    would leave 1 GiB of KV, or that none would."""
    gib = 1 << 30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (free_gib * gib, 100 * gib))
    with pytest.raises(MemoryError, match="no GPU memory left") as err:
        gpu_pool_blocks(LAYOUT, torch.device("cuda"), 0.0, 0.8, 5 * gib)
    assert fix in str(err.value) and "5.0 GiB kept for activations" in str(err.value)
    if free_gib == 20:  # the advice holds: 86 - 80 - 5 = 1 GiB of KV
        blocks = gpu_pool_blocks(LAYOUT, torch.device("cuda"), 0.0, 0.86, 5 * gib)
        assert abs(blocks * LAYOUT.block_bytes - gib) <= 0.01 * gib


def test_allocator_is_exact_and_rejects_double_free():
    alloc = BlockAllocator(8)
    a = alloc.allocate(3)
    b = alloc.allocate(5)
    assert sorted(a + b) == list(range(8)) and alloc.num_free == 0
    with pytest.raises(MemoryError):
        alloc.allocate(1)
    alloc.free(a)
    with pytest.raises(ValueError):
        alloc.free(a)
    with pytest.raises(ValueError):
        alloc.free([42])
    alloc.free(b)
    assert alloc.num_free == 8
    again = alloc.allocate(8)
    assert sorted(again) == list(range(8))
