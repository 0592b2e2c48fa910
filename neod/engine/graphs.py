"""CUDA graphs of whole decode steps, so that a GPU-only decode iteration costs one launch on the
host.

A decode step of B requests issues about a dozen kernels per layer; from Python that is ~200 us of
host time per layer, longer than the GPU needs at small and medium batches. Each batch-size bucket
is captured once at start: the model reads its inputs from static buffers (token ids, positions,
KV slots, a block table as wide as the longest context, lengths) and writes fp32 logits to a
static output. A step pads its batch to the next bucket: padding rows store nothing (slot -1) and
attend to one token of a valid block, so they are harmless and their logits are dropped. The paged
decode kernel sizes its splits on the device from each row's real length, so one captured graph
serves every context length.
"""

from __future__ import annotations

import bisect
import logging
import time

import torch

from neod.engine.batch import SubBatch
from neod.model.attention import AttentionMetadata

logger = logging.getLogger(__name__)


def batch_buckets(max_rows: int) -> list[int]:
    """1, 2, 4, 8, then steps of 8 up to 64, then steps of 32: padding stays small where it costs
    most."""
    sizes = [1, 2, 4] + list(range(8, 65, 8)) + list(range(96, max_rows + 32, 32))
    return sorted({min(s, max_rows) for s in sizes})


class DecodeGraphs:
    def __init__(self, model, gpu_pool: torch.Tensor, max_rows: int, max_model_len: int) -> None:
        self.model = model
        self.gpu_pool = gpu_pool  # [L, N, 2, Hkv, bs, D]
        device = gpu_pool.device
        block_size = gpu_pool.shape[4]
        width = -(-max_model_len // block_size)
        self.buckets = batch_buckets(max_rows)
        top = self.buckets[-1]
        self.input_ids = torch.zeros(top, dtype=torch.int64, device=device)
        self.positions = torch.zeros(top, dtype=torch.int64, device=device)
        self.slot_ids = torch.full((top,), -1, dtype=torch.int64, device=device)
        self.block_tables = torch.zeros((top, width), dtype=torch.int32, device=device)
        self.seq_lens = torch.ones(top, dtype=torch.int32, device=device)
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool = torch.cuda.graph_pool_handle()

    @torch.inference_mode()
    def capture_all(self) -> None:
        start = time.perf_counter()
        for size in reversed(self.buckets):  # largest first: smaller graphs reuse its memory
            self._capture(size)
        logger.info(
            "captured %d decode graphs (batch 1..%d) in %.1f s",
            len(self._graphs),
            self.buckets[-1],
            time.perf_counter() - start,
        )

    def _forward(self, size: int) -> torch.Tensor:
        device = self.input_ids.device
        meta = AttentionMetadata(
            0,
            torch.zeros(1, dtype=torch.int32, device=device),
            0,
            self.slot_ids[:size],
            self.block_tables[:size],
            self.seq_lens[:size],
        )
        return self.model.forward(self.input_ids[:size], self.positions[:size], meta, self.gpu_pool)

    def _capture(self, size: int) -> None:
        side = torch.cuda.Stream(self.input_ids.device)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._forward(size)  # warm-up outside the graph: lazy initialisation, workspace sizes
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            logits = self._forward(size)
        self._graphs[size] = (graph, logits)

    def accepts(self, batch: SubBatch) -> bool:
        """Only pure GPU decode batches: prefills and CPU rows change the shape of the work."""
        meta = batch.gpu_meta
        return (
            meta.num_prefill_tokens == 0
            and batch.num_cpu_decodes == 0
            and batch.num_gpu_rows == batch.num_tokens
            and 0 < batch.num_tokens <= self.buckets[-1]
        )

    def run(self, batch: SubBatch) -> torch.Tensor:
        """fp32 logits [B, vocab] of a pure decode batch, by replaying the captured graph of its
        bucket."""
        n = batch.num_tokens
        size = self.buckets[bisect.bisect_left(self.buckets, n)]
        meta = batch.gpu_meta
        self.input_ids[:n].copy_(batch.input_ids)
        self.positions[:n].copy_(batch.positions)
        self.slot_ids[:n].copy_(meta.slot_ids)
        self.seq_lens[:n].copy_(meta.seq_lens)
        self.block_tables[:n, : meta.block_tables.shape[1]].copy_(meta.block_tables)
        if size > n:
            self.slot_ids[n:size].fill_(-1)
            self.seq_lens[n:size].fill_(1)
        graph, logits = self._graphs[size]
        graph.replay()
        return logits[:n]
