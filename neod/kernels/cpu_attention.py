"""Paged decode attention on the host CPU: the ISPC kernel run by the pinned thread pool.

`CpuAttention` owns one pool of worker threads, each pinned to its own core, created once. A
`decode` call checks the tensors here (so the native layer only sees consistent raw pointers),
releases the GIL and blocks the calling thread until the workers are done. The batch is split by
KV blocks, not by request, so one long request spreads over every worker and its pieces are
merged by log-sum-exp. `reference_decode` is the float64 ground truth the kernel is tested against.
"""

from __future__ import annotations

import logging
import math

import torch

from neod.cpu.bandwidth import recommended_threads
from neod.cpu.topology import pool_cores
from neod.cython import load_native

logger = logging.getLogger(__name__)

_KV_DTYPES = (torch.bfloat16, torch.float16)


def _check(t: torch.Tensor, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.device.type != "cpu":
        raise ValueError(f"{name} must be on the CPU, got {t.device}")
    if t.dtype != dtype:
        raise ValueError(f"{name} must be {dtype}, got {t.dtype}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {list(shape)}, got {list(t.shape)}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")


class CpuAttention:
    """Decode attention over a CPU KV pool, on `num_threads` pinned worker threads.

    `cores` pins worker i to cores[i]; by default the pool takes `num_threads` cores from
    `neod.cpu.pool_cores` (physical cores, leaving one free), and `num_threads` defaults to
    `neod.cpu.recommended_threads()` (the fewest threads that reach the host's read bandwidth).
    """

    def __init__(self, num_threads: int | None = None, cores: list[int] | None = None) -> None:
        native = load_native()
        if cores is None:
            cores = pool_cores(num_threads if num_threads is not None else recommended_threads())
        elif num_threads is not None and num_threads != len(cores):
            raise ValueError(f"num_threads={num_threads} but {len(cores)} cores were given")
        self._native = native
        self._pool = native.NativePool(list(cores))
        logger.info("CPU attention pool started: %d threads on cores %s", len(cores), list(cores))

    @property
    def num_threads(self) -> int:
        return len(self._pool.cores)

    @property
    def cores(self) -> tuple[int, ...]:
        return self._pool.cores

    @property
    def closed(self) -> bool:
        return self._pool.closed

    def thread_ids(self) -> list[int]:
        """Kernel thread ids of the workers (for checks such as their CPU affinity)."""
        return self._pool.thread_ids()

    def decode(
        self,
        q: torch.Tensor,
        kv_layer: torch.Tensor,
        block_tables: torch.Tensor,
        seq_lens: torch.Tensor,
        out: torch.Tensor,
        lse: torch.Tensor | None = None,
        k_new: torch.Tensor | None = None,
        v_new: torch.Tensor | None = None,
        scale: float | None = None,
    ) -> None:
        """Attention of one new query token per request; optionally appends its K/V first.

        q: [B, Hq, D] in the KV dtype (bf16 or fp16); kv_layer: [num_blocks, 2, Hkv, block_size, D];
        block_tables: [B, max_blocks] int32; seq_lens: [B] int32, including the new token;
        out: [B, Hq, D] in the KV dtype; lse: [B, Hq] fp32 (natural-log log-sum-exp of the scaled
        scores), or None; k_new / v_new: [B, Hkv, D] written at position seq_len - 1 of each
        request before the attention reads it; scale defaults to 1 / sqrt(D).
        """
        if not isinstance(kv_layer, torch.Tensor) or kv_layer.dim() != 5:
            raise ValueError("kv_layer must be a 5-d tensor [num_blocks, 2, Hkv, block_size, D]")
        num_blocks, two, num_kv_heads, block_size, head_dim = kv_layer.shape
        dtype = kv_layer.dtype
        if two != 2:
            raise ValueError(f"kv_layer dim 1 must be 2 (K, V), got {two}")
        if dtype not in _KV_DTYPES:
            raise ValueError(f"kv_layer must be bf16 or fp16, got {dtype}")
        if head_dim not in self._native.HEAD_DIMS:
            raise ValueError(f"head_dim must be one of {self._native.HEAD_DIMS}, got {head_dim}")
        _check(kv_layer, "kv_layer", tuple(kv_layer.shape), dtype)
        if not isinstance(q, torch.Tensor) or q.dim() != 3:
            raise ValueError("q must be a 3-d tensor [B, Hq, D]")
        batch, num_q_heads = q.shape[0], q.shape[1]
        if num_q_heads % num_kv_heads != 0:
            raise ValueError(f"Hq={num_q_heads} is not a multiple of Hkv={num_kv_heads}")
        _check(q, "q", (batch, num_q_heads, head_dim), dtype)
        if not isinstance(block_tables, torch.Tensor) or block_tables.dim() != 2:
            raise ValueError("block_tables must be a 2-d tensor [B, max_blocks]")
        max_blocks = block_tables.shape[1]
        _check(block_tables, "block_tables", (batch, max_blocks), torch.int32)
        _check(seq_lens, "seq_lens", (batch,), torch.int32)
        _check(out, "out", (batch, num_q_heads, head_dim), dtype)
        if lse is not None:
            _check(lse, "lse", (batch, num_q_heads), torch.float32)
        if (k_new is None) != (v_new is None):
            raise ValueError("k_new and v_new must be given together")
        if k_new is not None:
            _check(k_new, "k_new", (batch, num_kv_heads, head_dim), dtype)
            _check(v_new, "v_new", (batch, num_kv_heads, head_dim), dtype)
        if batch == 0:
            return
        if max_blocks == 0:
            raise ValueError("block_tables has no columns")
        self._pool.decode(
            q.data_ptr(),
            kv_layer.data_ptr(),
            block_tables.data_ptr(),
            seq_lens.data_ptr(),
            0 if k_new is None else k_new.data_ptr(),
            0 if v_new is None else v_new.data_ptr(),
            out.data_ptr(),
            0 if lse is None else lse.data_ptr(),
            num_blocks,
            batch,
            num_q_heads,
            num_kv_heads,
            head_dim,
            block_size,
            max_blocks,
            self._native.DTYPE_BF16 if dtype == torch.bfloat16 else self._native.DTYPE_FP16,
            1.0 / math.sqrt(head_dim) if scale is None else float(scale),
        )

    def probe_read_bandwidth(
        self, nbytes: int, thread_counts: list[int], repeats: int = 3
    ) -> list[float]:
        """Best read rate (bytes/s) of a `nbytes` buffer split over the first n workers, per n."""
        return self._pool.probe_read_bandwidth(nbytes, list(thread_counts), repeats)

    def close(self) -> None:
        """Stops and joins the workers; idempotent. A closed pool refuses further calls."""
        if not self._pool.closed:
            self._pool.close()
            logger.info("CPU attention pool stopped")

    def __enter__(self) -> CpuAttention:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def reference_decode(
    q: torch.Tensor,
    kv_layer: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 decode attention, one request at a time: (out [B, Hq, D], lse [B, Hq]), float64."""
    batch, num_q_heads, head_dim = q.shape
    num_kv_heads, block_size = kv_layer.shape[2], kv_layer.shape[3]
    group = num_q_heads // num_kv_heads
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    out = torch.empty(batch, num_q_heads, head_dim, dtype=torch.float64)
    lse = torch.empty(batch, num_q_heads, dtype=torch.float64)
    for b in range(batch):
        length = int(seq_lens[b])
        num = -(-length // block_size)
        blocks = block_tables[b, :num].long()
        kv = kv_layer[blocks].double()  # [num, 2, Hkv, block_size, D]
        kv = kv.permute(1, 2, 0, 3, 4).reshape(2, num_kv_heads, num * block_size, head_dim)
        keys, values = kv[0, :, :length], kv[1, :, :length]  # [Hkv, length, D]
        query = q[b].double().view(num_kv_heads, group, head_dim)
        scores = torch.einsum("hgd,htd->hgt", query, keys) * scale
        lse[b] = torch.logsumexp(scores, dim=-1).reshape(num_q_heads)
        probs = torch.softmax(scores, dim=-1)
        out[b] = torch.einsum("hgt,htd->hgd", probs, values).reshape(num_q_heads, head_dim)
    return out, lse
