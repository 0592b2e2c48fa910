"""Memory-read bandwidth of this host, measured by the CPU attention pool itself, and the pool size
it implies.

Decode attention on the CPU can go no faster than memory bandwidth, so the pool should have the
fewest threads with which the attention kernel reaches (nearly) its best rate on this host: more
threads only take cores from the GPU-driving thread, the tokenizer and I/O. The kernel does
arithmetic on every byte, and each thread's share of the memory system shrinks as threads are
added, so that count is timed, not extrapolated from one thread: the kernel reads a KV far larger
than the last-level cache with 1..N pinned workers, as does a plain read loop (the host's read
rate, for reference). It is cached on disk, keyed by CPU model, usable cores and memory size, so
it runs once per host.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from neod.cpu.topology import CpuTopology, pool_cores, read_topology

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

_MIB = 1 << 20
PROBE_VERSION = 3  # bump when the probe changes what it measures: old cache entries are ignored
# The shape the kernel is timed on: a Llama-3 layer (GQA 4, head_dim 128, bf16).
_KERNEL_SHAPE = {"num_q_heads": 32, "num_kv_heads": 8, "head_dim": 128, "block_size": 16}
_KERNEL_REQUESTS = 16  # requests the timed batch splits the KV among
_PATTERN_ELEMENTS = 1_000_003  # fill_repeating's pattern length (a prime)


@dataclass(frozen=True)
class BandwidthProbe:
    cores: tuple[int, ...]  # worker i was pinned to cores[i]
    thread_counts: tuple[int, ...]
    read_bytes_per_s: tuple[float, ...]  # best read rate with thread_counts[i] workers
    buffer_bytes: int
    measured_at: float  # unix time
    # KV read rate of the attention kernel with thread_counts[i] workers; empty: not measured
    kernel_bytes_per_s: tuple[float, ...] = ()

    @property
    def peak_bytes_per_s(self) -> float:
        return max(self.read_bytes_per_s)

    def threads_for(self, fraction: float = 0.95) -> int:
        """The fewest threads with which the attention kernel reaches `fraction` of its best
        rate (without a kernel timing: of the plain reads' peak)."""
        rates = self.kernel_bytes_per_s or self.read_bytes_per_s
        target = fraction * max(rates)
        return min(n for n, r in zip(self.thread_counts, rates, strict=True) if r >= target)

    def rate_for(self, num_threads: int) -> float:
        """Read rate with `num_threads` workers, interpolated between measured counts."""
        points = sorted(zip(self.thread_counts, self.read_bytes_per_s, strict=True))
        if num_threads <= points[0][0]:
            return points[0][1] * num_threads / points[0][0]
        for (n0, r0), (n1, r1) in zip(points, points[1:], strict=False):
            if num_threads <= n1:
                return r0 + (r1 - r0) * (num_threads - n0) / (n1 - n0)
        return points[-1][1]

    def to_dict(self) -> dict:
        return {**asdict(self), "version": PROBE_VERSION}

    @classmethod
    def from_dict(cls, data: Mapping) -> BandwidthProbe:
        if data.get("version") != PROBE_VERSION:
            raise ValueError(f"probe format {data.get('version')!r}, expected {PROBE_VERSION}")
        return cls(
            cores=tuple(int(c) for c in data["cores"]),
            thread_counts=tuple(int(n) for n in data["thread_counts"]),
            read_bytes_per_s=tuple(float(r) for r in data["read_bytes_per_s"]),
            buffer_bytes=int(data["buffer_bytes"]),
            measured_at=float(data["measured_at"]),
            kernel_bytes_per_s=tuple(float(r) for r in data["kernel_bytes_per_s"]),
        )


def default_thread_counts(max_threads: int) -> list[int]:
    """Every count up to 16, then powers of two and multiples of max_threads / 8, then the max."""
    if max_threads <= 16:
        return list(range(1, max_threads + 1))
    counts = set(range(1, 9)) | {max_threads}
    counts |= {1 << k for k in range(max_threads.bit_length()) if 1 << k <= max_threads}
    step = max(1, max_threads // 8)
    counts |= set(range(step, max_threads + 1, step))
    return sorted(counts)


def default_buffer_bytes(topology: CpuTopology) -> int:
    """Eight times the last-level cache and at least 512 MiB, within a quarter of free memory."""
    want = max(512 * _MIB, 8 * topology.llc_bytes)
    return max(64 * _MIB, min(want, topology.available_bytes // 4))


def probe_bandwidth(
    num_threads: int | None = None,
    *,
    reserve_cores: int = 1,
    buffer_bytes: int | None = None,
    thread_counts: list[int] | None = None,
    repeats: int = 3,
    topology: CpuTopology | None = None,
) -> BandwidthProbe:
    """Read bandwidth with 1..num_threads pinned workers (default: every core but the reserved)."""
    from neod.kernels.cpu_attention import CpuAttention

    topo = topology or read_topology()
    if num_threads is None:
        num_threads = max(1, topo.num_physical_cores - reserve_cores)
    cores = pool_cores(num_threads, reserve_cores, topo)
    counts = thread_counts or default_thread_counts(num_threads)
    nbytes = buffer_bytes or default_buffer_bytes(topo)
    started = time.monotonic()
    with CpuAttention(cores=cores) as pool:
        rates = pool.probe_read_bandwidth(nbytes, counts, repeats)
    kernel_rates = kernel_read_rates(cores, counts, nbytes, repeats)
    best = max(range(len(counts)), key=lambda i: kernel_rates[i])
    logger.info(
        "memory read bandwidth probe: %d..%d threads, peak %.1f GB/s; attention kernel %.1f GB/s "
        "at its best, with %d threads; %.1f s",
        counts[0],
        counts[-1],
        max(rates) / 1e9,
        kernel_rates[best] / 1e9,
        counts[best],
        time.monotonic() - started,
    )
    return BandwidthProbe(
        tuple(cores), tuple(counts), tuple(rates), nbytes, time.time(), tuple(kernel_rates)
    )


def fill_repeating(t: torch.Tensor, gen: torch.Generator) -> None:
    """Fills a contiguous tensor with a random pattern of a prime length, repeated: every KV
    block differs from its neighbours, and gigabytes fill in a fraction of the time fresh random
    numbers take (the kernel's work does not depend on the values)."""
    import torch

    flat, pattern = t.view(-1), torch.randn(_PATTERN_ELEMENTS, generator=gen)
    whole = flat.numel() // _PATTERN_ELEMENTS * _PATTERN_ELEMENTS
    flat[:whole].view(-1, _PATTERN_ELEMENTS).copy_(pattern)
    flat[whole:].copy_(pattern[: flat.numel() - whole])


def kernel_read_rates(
    cores: list[int], thread_counts: list[int], nbytes: int, repeats: int = 3
) -> list[float]:
    """KV bytes per second the decode-attention kernel reads with the first n of `cores`, for
    each n in thread_counts: one batch whose KV (`nbytes`, far more than the last-level cache
    holds) is read once per call, as serving reads it."""
    import torch

    from neod.kernels.cpu_attention import CpuAttention

    shape = _KERNEL_SHAPE
    hkv, d, bs = shape["num_kv_heads"], shape["head_dim"], shape["block_size"]
    block_elements = 2 * hkv * bs * d
    per_request = max(1, nbytes // (2 * block_elements * _KERNEL_REQUESTS))
    num_blocks = per_request * _KERNEL_REQUESTS
    gen = torch.Generator().manual_seed(0)
    kv = torch.empty(num_blocks, 2, hkv, bs, d, dtype=torch.bfloat16)
    fill_repeating(kv, gen)
    q = torch.empty(_KERNEL_REQUESTS, shape["num_q_heads"], d, dtype=torch.bfloat16)
    q.uniform_(-1, 1, generator=gen)
    tables = torch.randperm(num_blocks, generator=gen).to(torch.int32)
    tables = tables.view(_KERNEL_REQUESTS, per_request)
    lens = torch.full((_KERNEL_REQUESTS,), per_request * bs, dtype=torch.int32)
    out = torch.empty_like(q)
    rates = []
    for n in thread_counts:
        best = math.inf
        with CpuAttention(cores=cores[:n]) as pool:
            for _ in range(repeats + 1):  # the first call also faults the scratch in
                start = time.perf_counter()
                pool.decode(q, kv, tables, lens, out)
                best = min(best, time.perf_counter() - start)
        rates.append(kv.numel() * kv.element_size() / best)
    return rates


def cache_dir(env: Mapping[str, str] | None = None) -> Path:
    """systemd's CacheDirectory, else $XDG_CACHE_HOME/neod, else ~/.cache/neod."""
    env = os.environ if env is None else env
    if env.get("CACHE_DIRECTORY"):
        return Path(env["CACHE_DIRECTORY"].split(":")[0])
    base = Path(env["XDG_CACHE_HOME"]) if env.get("XDG_CACHE_HOME") else Path.home() / ".cache"
    return base / "neod"


def cache_path(topology: CpuTopology, reserve_cores: int, directory: Path | None = None) -> Path:
    key = json.dumps(
        [topology.model_name, topology.allowed_cpus, topology.memory_bytes, reserve_cores]
    )
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return (directory or cache_dir()) / f"membw-{digest}.json"


def cached_probe(
    reserve_cores: int = 1,
    *,
    refresh: bool = False,
    directory: Path | None = None,
    topology: CpuTopology | None = None,
) -> BandwidthProbe:
    """The probe for this host from the cache, measured (and saved) if absent or on refresh."""
    topo = topology or read_topology()
    path = cache_path(topo, reserve_cores, directory)
    if not refresh:
        try:
            return BandwidthProbe.from_dict(json.loads(path.read_text()))
        except FileNotFoundError:
            pass
        except (OSError, ValueError, KeyError, TypeError) as exc:
            logger.warning("ignoring bandwidth cache %s: %s", path, exc)
    probe = probe_bandwidth(reserve_cores=reserve_cores, topology=topo)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(probe.to_dict(), indent=1))
        tmp.replace(path)
    except OSError as exc:
        logger.warning("cannot save the bandwidth probe to %s: %s", path, exc)
    return probe


def recommended_threads(reserve_cores: int = 1, fraction: float = 0.95) -> int:
    """Pool size: the fewest threads with which the attention kernel reaches `fraction` of its
    best rate on this host, never more than the physical cores left after `reserve_cores` and
    one more for the thread that drives the pool through an iteration (at least 1)."""
    topo = read_topology()
    limit = max(1, topo.num_physical_cores - reserve_cores - 1)
    if limit == 1:
        return 1
    return min(limit, cached_probe(reserve_cores, topology=topo).threads_for(fraction))
