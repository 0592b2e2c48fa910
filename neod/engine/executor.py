"""One iteration's forward pass over the model's layer stages, sequential or pipelined.

Each sub-batch is a `_Flight` moving through the layers. Per layer it runs `pre` (norm, QKV, rope)
and the GPU attention of its GPU rows on the compute stream; the Q/K/V of its CPU rows leave on the
device-to-host stream as soon as `pre` is done; the host runs their attention on the pinned CPU
pool; the output returns on the host-to-device stream; `post` (O projection, MLP) waits for it on
the GPU, never on the host.

On a GPU host the CPU side of the whole iteration is one native call (`decode_layers`) on a helper
thread, started before any layer is issued. The device-to-host stream announces each layer's
Q/K/V with a flag in pinned memory; the native program waits for it, computes, and sets a done
flag that the host-to-device stream waits for before it copies the output back. So the engine
thread issues all GPU work of the iteration without ever waiting for the CPU, and no Python runs
between the layers of the CPU side. With two sub-batches the devices overlap (design.md,
Pipelining):

    GPU:  post(i) b0 + pre(i+1) b0 | post(i) b1 + pre(i+1) b1 + GPU attention(i+1) b0 | ...
    CPU:  attention(i) of b1       | attention(i+1) of b0's CPU rows

With one sub-batch the same loop is the sequential mode: its CPU rows overlap its own GPU
attention. On a CPU-only host the streams are absent and the host work of a layer runs in place,
in the same order.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from neod.engine.batch import SubBatch
from neod.engine.graphs import DecodeGraphs
from neod.engine.stage_graphs import StageGraphs
from neod.kernels import cuda_ops, ops
from neod.kernels.cpu_attention import CpuFlight
from neod.model.attention import gpu_attention


@dataclass
class _HostBuffers:
    """Staging for one sub-batch; pinned on a GPU host so the copies are asynchronous.

    The CPU rows' Q, K and V arrive as the projection left them, one fused row per request, so
    that they cross in one contiguous copy (no gather kernel, one DMA); q, k and v view it."""

    qkv: torch.Tensor  # [max_rows, Hq + 2 Hkv, D]
    q: torch.Tensor  # [max_rows, Hq, D], a view of qkv
    k: torch.Tensor  # [max_rows, Hkv, D], a view of qkv
    v: torch.Tensor  # [max_rows, Hkv, D], a view of qkv
    o: torch.Tensor  # [max_rows, Hq, D]
    prefill_k: torch.Tensor  # [max_tokens, Hkv, D]
    prefill_v: torch.Tensor  # [max_tokens, Hkv, D]

    @classmethod
    def allocate(
        cls,
        max_rows: int,
        max_tokens: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        pin: bool,
    ) -> _HostBuffers:
        def buf(rows: int, heads: int) -> torch.Tensor:
            return torch.empty((rows, heads, head_dim), dtype=dtype, pin_memory=pin)

        qkv = buf(max_rows, num_heads + 2 * num_kv_heads)
        return cls(
            qkv,
            *qkv.split([num_heads, num_kv_heads, num_kv_heads], dim=1),
            buf(max_rows, num_heads),
            buf(max_tokens, num_kv_heads),
            buf(max_tokens, num_kv_heads),
        )


def _fused_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The [T, Hq + 2 Hkv, D] projection output that q, k and v are views of (the model's
    `layer_pre` contract): its rows are contiguous, so a range of them copies in one piece."""
    heads = q.shape[1] + k.shape[1] + v.shape[1]
    row = heads * q.shape[2]
    step = q.shape[2] * q.element_size()
    # A single row's stride is arbitrary (views give size-1 dims contiguous-style strides).
    strided = q.shape[0] < 2 or q.stride(0) == k.stride(0) == v.stride(0) == row
    adjacent = (
        k.data_ptr() == q.data_ptr() + q.shape[1] * step
        and v.data_ptr() == k.data_ptr() + k.shape[1] * step
    )
    if not (strided and adjacent):
        raise ValueError("q, k and v must be views of one fused [T, Hq + 2 Hkv, D] tensor")
    return q.as_strided((q.shape[0], heads, q.shape[2]), (row, q.shape[2], 1))


@dataclass(frozen=True)
class _SlotSync:
    """One sub-batch slot's flags (host addresses, [L] uint32 each) and native events."""

    ready: int  # flag `layer`: its Q/K/V are on the host (set by the GPU)
    done: int  # flag `layer`: its attention output is in the staging buffer (set by the CPU)
    d2h_join: int
    qkv_on_host: int
    h2d_join: int
    out_on_device: int

    @classmethod
    def create(cls, flags: torch.Tensor) -> _SlotSync:
        """flags: [2, L] pinned int32, ready then done."""
        ready, done = (cuda_ops.flag_address(f, 0) for f in flags)
        return cls(ready, done, *(cuda_ops.event_create() for _ in range(4)))

    def destroy(self) -> None:
        for event in (self.d2h_join, self.qkv_on_host, self.h2d_join, self.out_on_device):
            cuda_ops.event_destroy(event)


@dataclass
class _Flight:
    batch: SubBatch
    buffers: _HostBuffers
    hidden: torch.Tensor  # [T, H]
    residual: torch.Tensor | None = None
    attn_out: torch.Tensor | None = None  # [T, Hq * D]
    graph_slot: int | None = None  # which StageGraphs buffers this sub-batch uses; None = eager
    graph_size: int = 0  # its padded row count
    q: torch.Tensor | None = None  # [T, Hq, D], between the projections and the GPU attention
    k: torch.Tensor | None = None  # [T, Hkv, D]
    v: torch.Tensor | None = None  # [T, Hkv, D]
    out_on_device: int | None = None  # events of its slot (_SlotSync), once recorded
    qkv_on_host: int | None = None
    slot: int = 0  # index of its host buffers, flags and events

    @property
    def has_cpu_work(self) -> bool:
        b = self.batch
        return b.num_cpu_decodes > 0 or b.cpu_prefill_rows[1] > b.cpu_prefill_rows[0]


class Executor:
    def __init__(
        self,
        model,
        gpu_pool: torch.Tensor,
        cpu_pool: torch.Tensor | None,
        cpu_attention,
        max_rows: int,
        max_tokens: int,
        graphs: DecodeGraphs | None = None,
    ) -> None:
        cfg = model.config
        self.model = model
        self.gpu_pool = gpu_pool  # [L, N_gpu, 2, Hkv, bs, D]
        self.cpu_pool = cpu_pool  # [L, N_cpu, 2, Hkv, bs, D] (pinned on a GPU host) or None
        self.cpu_attention = cpu_attention
        self.graphs = graphs  # captured GPU decode steps; None on a CPU host
        self.stage_graphs: StageGraphs | None = None  # captured pipelined stages (GPU hosts)
        self.num_layers = cfg.num_hidden_layers
        self.num_heads = cfg.num_attention_heads
        self.head_dim = cfg.head_dim
        self.scale = self.head_dim**-0.5
        self.device = gpu_pool.device
        on_gpu = self.device.type == "cuda"
        self.d2h = torch.cuda.Stream(self.device) if on_gpu else None
        self.h2d = torch.cuda.Stream(self.device) if on_gpu else None
        self._pending_swaps: list[torch.cuda.Event] = []
        # Runs each iteration's native CPU program (it holds no GIL) while this thread issues GPU
        # work.
        self._cpu_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="neod-cpu-attn")
        self.cpu_busy_s = 0.0  # host time spent inside CPU attention, for the utilisation statistic
        # The pool workers' time in that work (summed over them), and the pool's thread time over
        # the same spans; their ratio is the share of the pool that computed.
        self.cpu_worker_s = self.cpu_capacity_s = 0.0
        # This thread's time issuing layer-by-layer forwards (not a whole captured step); on a GPU
        # host, where it nears the iteration's time, the GPU waits on Python, not on its work or
        # the CPU's.
        self.issue_s = 0.0
        self.cpu_timeout_s = 60.0  # a layer's inputs not on the host by then: the GPU is stuck
        # Per sub-batch slot: ready flags (set by the GPU), done flags (set by the CPU), [L] each.
        self._flags = (
            torch.zeros((2, 2, self.num_layers), dtype=torch.int32, pin_memory=True)
            if on_gpu and cpu_pool is not None
            else None
        )
        self._seq = 0  # this iteration's flag value
        self._sync = [] if self._flags is None else [_SlotSync.create(f) for f in self._flags]
        self._compute = 0  # the raw compute stream of the iteration being issued
        self._buffers = (
            [
                _HostBuffers.allocate(
                    max_rows,
                    max_tokens,
                    cfg.num_attention_heads,
                    cfg.num_key_value_heads,
                    cfg.head_dim,
                    gpu_pool.dtype,
                    pin=on_gpu,
                )
                for _ in range(2)
            ]
            if cpu_pool is not None
            else []
        )

    def close(self) -> None:
        self._cpu_thread.shutdown(wait=True)
        slots, self._sync = self._sync, []
        if slots:
            # No stream may still wait on the events. A failed CUDA context can neither
            # synchronise nor free them: they go with the process, and shutdown goes on.
            with contextlib.suppress(RuntimeError):
                torch.cuda.synchronize(self.device)
                for sync in slots:
                    sync.destroy()

    # ---- swaps -----------------------------------------------------------------------------------
    def swap(
        self,
        src_pool: torch.Tensor,
        dst_pool: torch.Tensor,
        pairs: list[tuple[int, int]],
        to_host: bool,
    ) -> None:
        """Copy whole blocks (all layers) between pools before this iteration's compute."""
        if not pairs:
            return
        block_pairs = torch.tensor(pairs, dtype=torch.int64)
        stream = self.d2h if to_host else self.h2d
        if stream is None:
            ops.swap_blocks(src_pool, dst_pool, block_pairs)
            return
        stream.wait_stream(torch.cuda.current_stream(self.device))
        for earlier in self._pending_swaps:  # a swap-in may land in blocks a swap-out is reading
            stream.wait_event(earlier)
        with torch.cuda.stream(stream):
            ops.swap_blocks(src_pool, dst_pool, block_pairs, stream=stream)
            event = torch.cuda.Event()
            event.record(stream)
        self._pending_swaps.append(event)

    # ---- stages ----------------------------------------------------------------------------------
    def _pre(self, f: _Flight, layer: int) -> None:
        """Projections of one layer; the CPU rows' Q/K/V leave for the host as soon as they
        exist."""
        b = f.batch
        if f.graph_slot is not None:
            n = b.num_tokens
            q, k, v = self.stage_graphs.replay(f.graph_slot, f.graph_size, layer)
            f.q, f.k, f.v = q[:n], k[:n], v[:n]
        else:
            f.q, f.k, f.v, f.residual = self.model.layer_pre(
                layer, f.hidden, f.residual, b.positions
            )
            f.attn_out = torch.empty(
                (b.num_tokens, self.num_heads * self.head_dim), dtype=f.q.dtype, device=self.device
            )
        if f.has_cpu_work:
            self._qkv_to_host(f, layer)

    def _gpu_attention(self, f: _Flight, layer: int) -> None:
        b, g = f.batch, f.batch.num_gpu_rows
        if g:
            ctx = b.gpu_meta.context  # a chunk of a prompt the host pool holds reads its prefix
            reads_host = ctx is not None and ctx.host_slots is not None
            host_layer = self.cpu_pool[layer] if reads_host else None
            gpu_attention(
                f.q[:g], f.k[:g], f.v[:g], self.gpu_pool[layer], b.gpu_meta, self.scale,
                out=f.attn_out[:g], host_kv_layer=host_layer,
            )  # fmt: skip
        if not f.has_cpu_work:  # else the copy streams may still read them: dropped in post
            f.q = f.k = f.v = None

    def _qkv_to_host(self, f: _Flight, layer: int) -> None:
        b, buf = f.batch, f.buffers
        c, n = b.cpu_decode_start, b.num_cpu_decodes
        p0, p1 = b.cpu_prefill_rows
        if self.d2h is None:
            buf.qkv[:n].copy_(_fused_rows(f.q, f.k, f.v)[c:])
            buf.prefill_k[: p1 - p0].copy_(f.k[p0:p1])
            buf.prefill_v[: p1 - p0].copy_(f.v[p0:p1])
            return
        # One native call per leg (cuda/host_flags.cu). The copy stream joins the compute stream
        # and, past the first layer, waits for the CPU to be done with the staging buffers. No
        # record_stream: the engine thread runs layers ahead of the GPU, and memory recorded on
        # this stream (paced by the CPU) would stay unusable for every layer issued meanwhile;
        # `post` orders the compute stream after these copies instead (_post_pre).
        sync, seq, d2h = self._sync[f.slot], self._seq, self.d2h.cuda_stream
        fused = _fused_rows(f.q, f.k, f.v)  # [T, Hq + 2 Hkv, D]
        row = fused.stride(0) * fused.element_size()
        prefill = p1 > p0
        last = (sync.qkv_on_host, sync.ready + 4 * layer)  # the event and flag of the last copy
        cuda_ops.handoff(
            self._compute, sync.d2h_join, d2h,
            sync.done + 4 * (layer - 1) if layer else None, seq,
            buf.qkv.data_ptr(), row, fused.data_ptr() + c * row, row, row, n,
            *((None, None) if prefill else last), seq,
        )  # fmt: skip
        if prefill:
            kv_row = buf.prefill_k.stride(0) * buf.prefill_k.element_size()
            for dst, src, done in ((buf.prefill_k, f.k, None), (buf.prefill_v, f.v, last)):
                cuda_ops.handoff(
                    self._compute, None, d2h, None, 0,
                    dst.data_ptr(), kv_row, src[p0].data_ptr(), row, kv_row, p1 - p0,
                    *(done or (None, None)), seq,
                )  # fmt: skip
        f.qkv_on_host = sync.qkv_on_host

    def _cpu_layer(self, f: _Flight, layer: int) -> None:
        """On a CPU-only host: one layer's host work, in place (store CPU-bound prefill KV, then
        CPU decode attention)."""
        if not f.has_cpu_work or self.d2h is not None:
            return
        b, buf = f.batch, f.buffers
        kv_layer = self.cpu_pool[layer]
        p0, p1 = b.cpu_prefill_rows
        if p1 > p0:
            ops.store_kv_(
                buf.prefill_k[: p1 - p0], buf.prefill_v[: p1 - p0], kv_layer, b.cpu_prefill_slots
            )
        n = b.num_cpu_decodes
        if n:
            start, worker_before = time.perf_counter(), self.cpu_attention.worker_seconds
            self.cpu_attention.decode(
                buf.q[:n],
                kv_layer,
                b.cpu_block_tables,
                b.cpu_seq_lens,
                buf.o[:n],
                k_new=buf.k[:n],
                v_new=buf.v[:n],
                scale=self.scale,
            )
            wall = time.perf_counter() - start
            self.cpu_busy_s += wall
            self.cpu_worker_s += self.cpu_attention.worker_seconds - worker_before
            self.cpu_capacity_s += self.cpu_attention.num_threads * wall

    def _start_cpu_program(self, flights: list[_Flight]) -> Future | None:
        """On a GPU host: the CPU side of the whole iteration, started before any GPU work."""
        busy = [f for f in flights if f.has_cpu_work]
        if self._flags is None or not busy:
            return None
        self._seq = self._seq % (2**31 - 2) + 1
        specs = []
        for f in busy:
            b, buf, n = f.batch, f.buffers, f.batch.num_cpu_decodes
            p = b.cpu_prefill_rows[1] - b.cpu_prefill_rows[0]
            ready, done = self._flags[f.slot]
            specs.append(
                CpuFlight(
                    q=buf.q[:n],
                    k_new=buf.k[:n],
                    v_new=buf.v[:n],
                    out=buf.o[:n],
                    block_tables=b.cpu_block_tables,
                    seq_lens=b.cpu_seq_lens,
                    ready=ready,
                    done=done,
                    prefill_k=buf.prefill_k[:p] if p else None,
                    prefill_v=buf.prefill_v[:p] if p else None,
                    prefill_slots=b.cpu_prefill_slots if p else None,
                )
            )
        return self._cpu_thread.submit(
            self.cpu_attention.decode_layers,
            self.cpu_pool,
            specs,
            self._seq,
            self.cpu_timeout_s,
            self.scale,
        )

    def _output_to_device(self, f: _Flight, layer: int) -> None:
        """Send the CPU rows' attention output back, ordered after the CPU's done flag (GPU host)
        or at once (CPU host); `post` waits for it."""
        b, buf, n = f.batch, f.buffers, f.batch.num_cpu_decodes
        if not n:
            return
        if self.h2d is None:
            f.attn_out[b.cpu_decode_start :].copy_(buf.o[:n].view(n, -1))
            return
        # The copy stream joins the compute stream first: the rows may be a buffer that it still
        # reads for the previous layer. attn_out ([T, Hq * D], contiguous) lives on until post
        # has waited for this.
        sync, out = self._sync[f.slot], f.attn_out
        row = out.stride(0) * out.element_size()
        cuda_ops.handoff(
            self._compute, sync.h2d_join, self.h2d.cuda_stream, sync.done + 4 * layer, self._seq,
            out.data_ptr() + b.cpu_decode_start * row, row, buf.o.data_ptr(), row, n * row, 1,
            sync.out_on_device, None, 0,
        )  # fmt: skip
        f.out_on_device = sync.out_on_device

    def _post_pre(self, f: _Flight, layer: int) -> None:
        """post(layer), then pre(layer + 1) unless it was the last layer."""
        # Past this wait the copy streams are done with this layer's tensors (the output arrives
        # after the CPU saw its inputs, which left before), so the compute stream may reuse them.
        if f.out_on_device is not None and f.batch.num_cpu_decodes:
            cuda_ops.stream_wait_event(self._compute, f.out_on_device)
        elif f.qkv_on_host is not None:
            cuda_ops.stream_wait_event(self._compute, f.qkv_on_host)
        f.q = f.k = f.v = None
        if f.graph_slot is None:
            f.hidden, f.residual = self.model.layer_post(layer, f.attn_out, f.residual)
            if layer < self.num_layers - 1:
                self._pre(f, layer + 1)
            return
        if layer < self.num_layers - 1:
            self._pre(f, layer + 1)  # one replay: post(layer) + pre(layer + 1)
            return
        self.stage_graphs.replay(f.graph_slot, f.graph_size, self.num_layers)
        n = f.batch.num_tokens
        f.hidden = self.stage_graphs.hidden[f.graph_slot][:n]
        f.residual = self.stage_graphs.residual[f.graph_slot][:n]

    def _start_flight(self, slot: int, batch: SubBatch) -> _Flight:
        buffers = self._buffers[slot] if self._buffers else None
        c, n = batch.cpu_decode_start, batch.num_cpu_decodes
        p0, p1 = batch.cpu_prefill_rows
        # The copies to and from the staging buffers are raw: the rows must be where they fit.
        if (n or p1 > p0) and (
            buffers is None
            or n > buffers.qkv.shape[0]
            or not 0 <= p0 <= p1 <= min(batch.num_tokens, p0 + buffers.prefill_k.shape[0])
        ):
            raise ValueError(
                f"sub-batch of {batch.num_tokens} rows: CPU decodes at {c}:{c + n}, CPU prefill "
                f"rows {p0}:{p1} do not fit this executor's staging buffers"
            )
        f = _Flight(batch, buffers, self.model.embed(batch.input_ids), slot=slot)
        graphs = self.stage_graphs
        size = None if graphs is None else graphs.bucket(batch.num_tokens)
        no_prefill = batch.gpu_meta.num_prefill_tokens == 0
        no_prefill = no_prefill and batch.cpu_prefill_rows[0] == batch.cpu_prefill_rows[1]
        if size is not None and no_prefill:
            n = batch.num_tokens
            graphs.hidden[slot][:n].copy_(f.hidden)
            graphs.positions[slot][:n].copy_(batch.positions)
            f.graph_slot, f.graph_size = slot, size
            f.attn_out = graphs.attn_out[slot][:n]
        return f

    # ---- the iteration ---------------------------------------------------------------------------
    @torch.inference_mode()
    def run(
        self, batches: list[SubBatch], while_waiting: Callable[[], None] | None = None
    ) -> list[torch.Tensor]:
        """Forward one or two sub-batches; returns fp32 logits [num seqs, vocab] per sub-batch.
        while_waiting runs once every GPU stage is issued, before the wait for the CPU's part."""
        compute = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        self._compute = 0 if compute is None else compute.cuda_stream
        if compute is not None:
            for event in self._pending_swaps:
                compute.wait_event(event)
        if self.graphs is not None and len(batches) == 1 and self.graphs.accepts(batches[0]):
            self._pending_swaps.clear()
            logits = [self.graphs.run(batches[0])]
            if while_waiting is not None:
                while_waiting()
            return logits
        flights = [self._start_flight(i, b) for i, b in enumerate(batches)]
        self._pending_swaps.clear()
        program = self._start_cpu_program(flights)
        start = time.perf_counter()
        try:
            self._layers(flights)
            logits = [self.model.final(f.hidden, f.residual, f.batch.sample_indices)
                      for f in flights]
        except BaseException:
            if program is not None:  # let the CPU side run out instead of waiting for its timeout
                for f in flights:
                    self._flags[f.slot][0].fill_(self._seq)
                with contextlib.suppress(Exception):
                    program.result()
            raise
        self.issue_s += time.perf_counter() - start
        if while_waiting is not None:
            while_waiting()
        if program is not None:
            busy = program.result()
            self.cpu_busy_s += busy.wall_s
            self.cpu_worker_s += busy.worker_s
            self.cpu_capacity_s += self.cpu_attention.num_threads * busy.wall_s
        return logits

    def _layers(self, flights: list[_Flight]) -> None:
        """Issue every layer's stages in the pipelined order (module docstring)."""
        f0 = flights[0]
        f1 = flights[1] if len(flights) > 1 else None
        last = self.num_layers - 1
        self._pre(f0, 0)
        if f1 is not None:
            self._pre(f1, 0)
        self._cpu_layer(f0, 0)
        self._gpu_attention(f0, 0)
        self._output_to_device(f0, 0)
        for i in range(self.num_layers):
            # Stage A. CPU: attention(i) of b1. GPU: post(i) + pre(i+1) of b0.
            if f1 is not None:
                self._cpu_layer(f1, i)
            self._post_pre(f0, i)
            if f1 is not None:
                self._output_to_device(f1, i)
            # Stage B. CPU: b0's CPU rows of layer i+1 (from the moment their Q/K/V land).
            # GPU: post(i) + pre(i+1) of b1, then GPU attention(i+1) of b0.
            if i < last:
                self._cpu_layer(f0, i + 1)
            if f1 is not None:
                self._post_pre(f1, i)
            if i < last:
                self._gpu_attention(f0, i + 1)
                self._output_to_device(f0, i + 1)
