"""CUDA graphs of the per-layer projections of decode sub-batches, for the pipelined mode.

A pipelined iteration cannot be one graph: the host must run CPU attention between the stages.
But the work of a stage on the GPU, `post(i)` then `pre(i + 1)` of one sub-batch, is a fixed chain
of a dozen kernels whose host cost (~200 us per layer from Python) exceeds the GPU's when batches
are small, the very case NEO serves. So each (sub-batch slot, batch bucket, layer) chain is
captured once: it reads the slot's static hidden/residual/attention-output buffers and leaves the
next layer's Q/K/V in graph-owned tensors. Rows are independent in every projection, so a batch is
padded to its bucket and the padding rows are ignored. Batches with prefills run eagerly.
"""

from __future__ import annotations

import bisect
import logging
import time

import torch

from neod.engine.graphs import batch_buckets

logger = logging.getLogger(__name__)

MAX_ROWS = 64  # larger decode sub-batches are GPU-bound already; capturing them would cost memory


class StageGraphs:
    def __init__(self, model, max_rows: int, num_slots: int = 2) -> None:
        cfg = model.config
        self.model = model
        self.num_layers = cfg.num_hidden_layers
        self.buckets = batch_buckets(min(max_rows, MAX_ROWS))
        rows, device, dtype = self.buckets[-1], model.device, model.dtype
        self.hidden = [torch.zeros(rows, cfg.hidden_size, device=device, dtype=dtype)
                       for _ in range(num_slots)]
        self.residual = [torch.zeros_like(h) for h in self.hidden]
        self.attn_out = [torch.zeros(rows, cfg.q_size, device=device, dtype=dtype)
                         for _ in range(num_slots)]
        self.positions = [torch.zeros(rows, dtype=torch.int64, device=device)
                          for _ in range(num_slots)]
        self._graphs: dict[tuple[int, int, int], tuple[torch.cuda.CUDAGraph, tuple]] = {}
        self._pool = torch.cuda.graph_pool_handle()

    def bucket(self, num_rows: int) -> int | None:
        if not 0 < num_rows <= self.buckets[-1]:
            return None
        return self.buckets[bisect.bisect_left(self.buckets, num_rows)]

    def _chain(self, slot: int, size: int, layer: int) -> tuple:
        """layer 0: pre(0); 0 < layer < L: post(layer-1) + pre(layer); layer L: post(L-1)."""
        h, r = self.hidden[slot][:size], self.residual[slot][:size]
        pos = self.positions[slot][:size]
        if layer == 0:
            q, k, v, res = self.model.layer_pre(0, h, None, pos)
            r.copy_(res)
            return q, k, v
        hidden, _ = self.model.layer_post(layer - 1, self.attn_out[slot][:size], r)
        if layer == self.num_layers:
            h.copy_(hidden)
            return ()
        q, k, v, _ = self.model.layer_pre(layer, hidden, r, pos)
        return q, k, v

    @torch.inference_mode()
    def capture_all(self) -> None:
        start = time.perf_counter()
        side = torch.cuda.Stream(self.model.device)
        for slot in range(len(self.hidden)):
            for size in reversed(self.buckets):
                for layer in range(self.num_layers + 1):
                    side.wait_stream(torch.cuda.current_stream())
                    with torch.cuda.stream(side):
                        self._chain(slot, size, layer)  # warm-up outside the graph
                    torch.cuda.current_stream().wait_stream(side)
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, pool=self._pool):
                        outputs = self._chain(slot, size, layer)
                    self._graphs[(slot, size, layer)] = (graph, outputs)
        logger.info("captured %d pipelined-stage graphs in %.1f s", len(self._graphs),
                    time.perf_counter() - start)

    def replay(self, slot: int, size: int, layer: int) -> tuple:
        """Runs the chain ending in pre(layer) (or the last post); returns its Q/K/V (padded)."""
        graph, outputs = self._graphs[(slot, size, layer)]
        graph.replay()
        return outputs
