"""KV pool layout and sizing for both devices.

Both pools share one layout, `[num_layers, num_blocks, 2, num_kv_heads, block_size, head_dim]`
(docs/architecture.md), so a swap copies block-layers unchanged. Sizing is explicit and fails
loudly: the GPU pool comes from free memory x utilisation (or a GiB cap that emulates a smaller
GPU); the pinned host pool is bounded by available RAM, the cgroup limit and RLIMIT_MEMLOCK, and
an impossible request names the limit that stops it and how to lift it.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import resource
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch

logger = logging.getLogger(__name__)

GIB = 1 << 30
# Host memory never handed to the KV pool: the process itself, the OS and page cache need room.
HOST_SAFETY_MARGIN_BYTES = 4 * GIB
# Auto-sized host pools take at most this share of the memory that is available.
HOST_AUTO_FRACTION = 0.5
# A CPU-device run has no GPU memory to measure: its "GPU" pool defaults to this size.
CPU_DEVICE_DEFAULT_POOL_BYTES = GIB // 4


@dataclass(frozen=True)
class KVLayout:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: torch.dtype

    @property
    def block_bytes(self) -> int:
        """Bytes of one block across all layers (K and V)."""
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        return self.num_layers * 2 * self.num_kv_heads * self.block_size * self.head_dim * itemsize

    @property
    def bytes_per_token(self) -> int:
        return self.block_bytes // self.block_size

    def shape(self, num_blocks: int) -> tuple[int, ...]:
        return (self.num_layers, num_blocks, 2, self.num_kv_heads, self.block_size, self.head_dim)


def allocate_pool(
    layout: KVLayout,
    num_blocks: int,
    device: torch.device,
    pin: bool = False,
    local_to_cpus: list[int] | None = None,
) -> torch.Tensor:
    """Zero-filled so that never-written slots can't inject NaN into a masked-out lane.

    A host pool is allocated and first touched by this thread while it runs on `local_to_cpus`
    (the CPU attention pool's cores), so that Linux's first-touch policy places its pages on their
    NUMA node; the thread's own affinity is restored afterwards.
    """
    if device.type == "cuda":
        return torch.zeros(layout.shape(num_blocks), dtype=layout.dtype, device=device)
    with _running_on(local_to_cpus):
        pool = torch.empty(layout.shape(num_blocks), dtype=layout.dtype, pin_memory=pin)
        pool.zero_()
    return pool


@contextlib.contextmanager
def _running_on(cpus: list[int] | None) -> Iterator[None]:
    if not cpus:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def gpu_pool_blocks(
    layout: KVLayout, device: torch.device, kv_gib: float, utilization: float, reserve_bytes: int
) -> int:
    """Blocks for the device pool: a GiB cap when given, else what utilisation leaves after
    `reserve_bytes`."""
    if kv_gib > 0:
        budget = int(kv_gib * GIB)
    elif device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        used = total - free
        budget = int(total * utilization) - used - reserve_bytes
        if budget <= 0:
            # The utilisation that would leave 1 GiB of KV, where the device has it.
            wanted = math.ceil(1000 * (used + reserve_bytes + GIB) / total) / 1000
            fix = (
                f"set cache.gpu_memory_utilization to {wanted:g} or more"
                if wanted <= 1.0
                else "the model leaves no room on this GPU: use a smaller model or more GPUs "
                "(parallel.tp_size)"
            )
            raise MemoryError(
                f"no GPU memory left for the KV cache: {used / GIB:.1f} GiB in use of "
                f"{total / GIB:.1f} GiB, {reserve_bytes / GIB:.1f} GiB kept for activations "
                f"(scheduler.max_tokens_in_batch), utilization {utilization}; {fix}"
            )
    else:
        budget = CPU_DEVICE_DEFAULT_POOL_BYTES
    return budget // layout.block_bytes


def _cgroup_memory_limit() -> int | None:
    for path in (
        Path("/sys/fs/cgroup/memory.max"),
        Path("/sys/fs/cgroup/memory/memory.limit_in_bytes"),
    ):
        try:
            text = path.read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < (1 << 60):
            return int(text)
    return None


def host_pool_blocks(layout: KVLayout, kv_gib: float, pinned: bool) -> int:
    """Blocks for the host pool, within what this process may really use (and pin)."""
    available = psutil.virtual_memory().available - HOST_SAFETY_MARGIN_BYTES
    limits = {"available RAM minus a 4 GiB margin": available}
    cgroup = _cgroup_memory_limit()
    if cgroup is not None:
        limits["the cgroup memory limit"] = (
            cgroup - psutil.Process().memory_info().rss - HOST_SAFETY_MARGIN_BYTES
        )
    if pinned:
        soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
        if soft != resource.RLIM_INFINITY:
            limits[
                "RLIMIT_MEMLOCK (raise with LimitMEMLOCK=infinity in the unit, or ulimit -l)"
            ] = soft
    name, ceiling = min(limits.items(), key=lambda kv: kv[1])
    if kv_gib > 0:
        wanted = int(kv_gib * GIB)
        if wanted > ceiling:
            raise MemoryError(
                f"cache.cpu_kv_gib = {kv_gib} GiB does not fit: "
                f"{name} allows {max(ceiling, 0) / GIB:.1f} GiB; "
                "lower cache.cpu_kv_gib or lift that limit"
            )
    else:
        wanted = int(max(ceiling, 0) * HOST_AUTO_FRACTION)
    return max(wanted, 0) // layout.block_bytes
