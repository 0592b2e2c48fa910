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
from dataclasses import dataclass
from typing import NamedTuple

import torch

from neod.cpu.bandwidth import recommended_threads
from neod.cpu.threads import ThreadTimes, thread_times
from neod.cpu.topology import pool_cores
from neod.cython import load_native

logger = logging.getLogger(__name__)

_KV_DTYPES = (torch.bfloat16, torch.float16)


def amx_in_use() -> str | None:
    """The tile products bf16 batches run on AMX now: "scores+values", "scores" or None (see
    `use_amx`)."""
    return load_native().amx_in_use()


def use_amx(enabled: bool, *, values: bool = True, soft: bool = False) -> bool:
    """Whether bf16 batches run their scores (and, with `values`, their weighted sums of V) on AMX
    tiles, where the CPU and the OS allow, or with the ISPC kernel's fp32 FMAs; returns whether
    they now do. Both give the same attention up to fp32 summation order (the probabilities meet V
    as two bf16 parts, 16 bits). `soft` runs the AMX paths on software tiles, on any CPU: tests
    only. Process-wide: the engine sets it from `cpu.amx`."""
    return bool(load_native().use_amx(enabled, values, soft))


def use_tile_path(path: str | None) -> None:
    """Select a tile path by the name `amx_in_use` reports for it."""
    use_amx(path is not None, values=path == "scores+values")


@dataclass
class CpuFlight:
    """One sub-batch's CPU work in every layer of an iteration (`CpuAttention.decode_layers`).

    The tensors are fixed buffers that the GPU refills layer by layer before it sets `ready[l]`;
    the same block tables and lengths serve every layer.
    """

    q: torch.Tensor  # [B, Hq, D], rows may be strided (views of one fused Q/K/V row)
    k_new: torch.Tensor | None  # [B, Hkv, D], appended at position seq_len - 1 (None: no append)
    v_new: torch.Tensor | None  # [B, Hkv, D], rows as far apart as k_new's
    out: torch.Tensor  # [B, Hq, D]
    block_tables: torch.Tensor  # [B, max_blocks] int32
    seq_lens: torch.Tensor  # [B] int32, including the new token
    ready: torch.Tensor  # [L] int32 flags set by the producer of q/k_new/v_new/prefill
    done: torch.Tensor  # [L] int32 flags set here once out (and the stored prefill) is written
    prefill_k: torch.Tensor | None = None  # [P, Hkv, D] staged K of CPU-bound prompt tokens
    prefill_v: torch.Tensor | None = None  # [P, Hkv, D]
    prefill_slots: torch.Tensor | None = None  # [P] int64, block * block_size + offset


class LayersBusy(NamedTuple):
    """Where `decode_layers` spent an iteration (not counting its waits for the GPU)."""

    wall_s: float  # time during which some (layer, flight) step was computing
    worker_s: float  # the workers' time in that work, summed over them: at most threads x wall_s

    def pool_share(self, threads: int) -> float | None:
        """Share of the pool's thread time that computed; the rest went to hand-offs and to
        workers waiting for the next step's inputs while others finished theirs."""
        return self.worker_s / (threads * self.wall_s) if self.wall_s > 0 else None


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


def _check_rows(t: torch.Tensor, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> int:
    """Like `_check` for a [B, H, D] tensor whose rows (dim 0) may be strided, as in views of a
    fused Q/K/V row; returns the row stride in elements."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {list(shape)}, got {list(t.shape)}")
    _check(t[:1], f"each row of {name}", tuple(t[:1].shape), dtype)
    return t.stride(0) if shape[0] > 1 else shape[1] * shape[2]


class CpuAttention:
    """Decode attention over a CPU KV pool, on `num_threads` pinned worker threads.

    `cores` pins worker i to cores[i]; by default the pool takes `num_threads` cores from
    `neod.cpu.pool_cores` (physical cores, leaving one free), and `num_threads` defaults to
    `neod.cpu.recommended_threads()` (the fewest threads with which the kernel reaches its best
    rate).
    """

    def __init__(self, num_threads: int | None = None, cores: list[int] | None = None) -> None:
        native = load_native()
        if cores is None:
            cores = pool_cores(num_threads if num_threads is not None else recommended_threads())
        elif num_threads is not None and num_threads != len(cores):
            raise ValueError(f"num_threads={num_threads} but {len(cores)} cores were given")
        self._native = native
        self._pool = native.NativePool(list(cores))
        self._worker_s = 0.0
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

    @property
    def worker_seconds(self) -> float:
        """The workers' time in attention work since the pool started, summed over them: against
        the pool size times a span's length, the share of the pool that computed in it."""
        return self._worker_s

    def thread_ids(self) -> list[int]:
        """Kernel thread ids of the workers (for checks such as their CPU affinity)."""
        return self._pool.thread_ids()

    def thread_times(self) -> ThreadTimes:
        """The workers' time on their cores and waiting for them, since the pool started: a
        worker that waits holds up every layer it shares (neod.cpu.threads)."""
        return thread_times(self.thread_ids())

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
        spec = self._decode_spec(q, kv_layer, block_tables, seq_lens, out, lse, k_new, v_new, scale)
        if q.shape[0] == 0:
            return
        if block_tables.shape[1] == 0:
            raise ValueError("block_tables has no columns")
        self._worker_s += self._pool.decode(*spec)

    def decode_layers(
        self,
        kv_pool: torch.Tensor,
        flights: list[CpuFlight],
        seq: int,
        timeout_s: float = 60.0,
        scale: float | None = None,
    ) -> LayersBusy:
        """Every layer of one iteration in one native call, paced by flags (neod_layers.h).

        kv_pool: [L, num_blocks, 2, Hkv, block_size, D]. For each layer l, flight by flight: wait
        until `ready[l] == seq`, store the staged prefill K/V, run `decode` (appending k_new/v_new),
        set `done[l] = seq`. `seq` must differ from the flags' previous values (1 <= seq < 2**31).
        Every done flag is set on return, also on error, so nothing waiting on them hangs. Returns
        the time spent computing; TimeoutError if a ready flag stays unset for `timeout_s`.
        """
        try:
            if not 0 < seq < 2**31:
                raise ValueError(f"seq must be in [1, 2**31), got {seq}")
            if not isinstance(kv_pool, torch.Tensor) or kv_pool.dim() != 6:
                raise ValueError("kv_pool must be a 6-d tensor [L, num_blocks, 2, Hkv, bs, D]")
            if not flights:
                raise ValueError("no flights")
            _check(kv_pool, "kv_pool", tuple(kv_pool.shape), kv_pool.dtype)
            num_layers = kv_pool.shape[0]
            specs = [self._flight_spec(kv_pool, f, num_layers, scale) for f in flights]
            layer_bytes = kv_pool.stride(0) * kv_pool.element_size()
            busy = LayersBusy(
                *self._pool.decode_layers(specs, num_layers, layer_bytes, seq, timeout_s)
            )
            self._worker_s += busy.worker_s
            return busy
        except Exception:
            # The native call releases them itself, but the binding may refuse its arguments
            # first: a GPU stream waiting on one must never hang.
            for f in flights:
                if isinstance(f.done, torch.Tensor):
                    f.done.fill_(seq)
            raise

    def _flight_spec(
        self, kv_pool: torch.Tensor, f: CpuFlight, num_layers: int, scale: float | None
    ) -> tuple:
        spec = self._decode_spec(
            f.q, kv_pool[0], f.block_tables, f.seq_lens, f.out, None, f.k_new, f.v_new, scale
        )
        if f.q.shape[0] and f.block_tables.shape[1] == 0:
            raise ValueError("block_tables has no columns")
        num_prefill = f.prefill_slots.shape[0] if f.prefill_slots is not None else 0
        prefill = (0, 0, 0)
        if num_prefill:
            shape = (num_prefill, kv_pool.shape[3], kv_pool.shape[5])
            _check(f.prefill_k, "prefill_k", shape, kv_pool.dtype)
            _check(f.prefill_v, "prefill_v", shape, kv_pool.dtype)
            _check(f.prefill_slots, "prefill_slots", (num_prefill,), torch.int64)
            prefill = (f.prefill_k.data_ptr(), f.prefill_v.data_ptr(), f.prefill_slots.data_ptr())
        _check(f.ready, "ready", (num_layers,), torch.int32)
        _check(f.done, "done", (num_layers,), torch.int32)
        return (*spec, *prefill, num_prefill, f.ready.data_ptr(), f.done.data_ptr())

    def _decode_spec(
        self,
        q: torch.Tensor,
        kv_layer: torch.Tensor,
        block_tables: torch.Tensor,
        seq_lens: torch.Tensor,
        out: torch.Tensor,
        lse: torch.Tensor | None,
        k_new: torch.Tensor | None,
        v_new: torch.Tensor | None,
        scale: float | None,
    ) -> tuple:
        """Checks one batch's tensors against each other; the native call's 19 arguments."""
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
        q_stride = _check_rows(q, "q", (batch, num_q_heads, head_dim), dtype)
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
        kv_new_stride = num_kv_heads * head_dim
        if k_new is not None:
            kv_new_stride = _check_rows(k_new, "k_new", (batch, num_kv_heads, head_dim), dtype)
            v_stride = _check_rows(v_new, "v_new", (batch, num_kv_heads, head_dim), dtype)
            if v_stride != kv_new_stride:
                raise ValueError(
                    f"k_new and v_new rows must be equally far apart, got {kv_new_stride} and "
                    f"{v_stride} elements"
                )
        return (
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
            max(max_blocks, 1),
            self._native.DTYPE_BF16 if dtype == torch.bfloat16 else self._native.DTYPE_FP16,
            1.0 / math.sqrt(head_dim) if scale is None else float(scale),
            q_stride,
            kv_new_stride,
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
