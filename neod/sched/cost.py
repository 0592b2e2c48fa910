"""The cost model the scheduler is given, and the iteration-time formulas built on it.

The scheduler never measures anything: it asks an injected `CostModel` (a profiled table in
production, a zero or scripted model in tests) for per-layer stage times and combines them with the
formulas below, which follow the order in which the engine issues work (docs/scheduler.md derives
them):

  sequential  layer = max(lin(b) + max(gpu_attn(b), cpu(b)),  copy)
  pipelined   layer = max(lin(b0) + lin(b1) + gpu_attn(b0),  cpu(b0) + cpu(b1),
                          lin(b0) + cpu(b0) + handoff,  lin(b1) + cpu(b1) + handoff,  copy)
  iteration   = num_layers * layer + overhead(all sequences)

with cpu(b) = cpu_attn(b) + transfer(b) when b has CPU decodes (their QKV must reach the host and
the output come back before the post-projection), and copy = the PCIe time of this layer's transfers
and block swaps, which share the copy engines and so bound the layer from below; handoff is the
latency of a sub-batch's round trip between the devices beyond its copies and its CPU work
(flags, wake-ups, the engine thread issuing the other sub-batch), on the round trips of
sub-batches with CPU decodes only: where the CPU's own work or the GPU's sets the period, the
round trips' latency hides behind it (neod.sched.calibration).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Protocol


class CostModel(Protocol):
    """Seconds per layer unless noted; zero work costs zero."""

    def linear_s(self, num_tokens: int) -> float:
        """Pre- and post-projections of a sub-batch of num_tokens rows."""

    def prefill_attn_s(self, prompt_lens: Sequence[int]) -> float:
        """Causal attention of these prompts, packed in one call."""

    def gpu_decode_attn_s(self, num_seqs: int, num_ctx_tokens: int) -> float:
        """Paged decode attention on the GPU."""

    def cpu_decode_attn_s(self, num_seqs: int, num_ctx_tokens: int) -> float:
        """Paged decode attention on the CPU pool, measured while host-device copies run."""

    def transfer_s(self, num_cpu_seqs: int) -> float:
        """QKV of CPU-decoded rows to the host plus their attention output back."""

    def swap_s(self, num_blocks: int) -> float:
        """One layer of num_blocks KV blocks between the pools."""

    def iteration_overhead_s(self, num_seqs: int) -> float:
        """Per iteration: embedding, LM head, sampling, host bookkeeping."""

    def pipeline_handoff_s(self) -> float:
        """Per pipelined layer, beyond the overlap formula."""


class ZeroCostModel:
    """Everything is free: plans then depend only on memory and budgets (tests, dry runs)."""

    def linear_s(self, num_tokens: int) -> float:
        return 0.0

    def prefill_attn_s(self, prompt_lens: Sequence[int]) -> float:
        return 0.0

    def gpu_decode_attn_s(self, num_seqs: int, num_ctx_tokens: int) -> float:
        return 0.0

    def cpu_decode_attn_s(self, num_seqs: int, num_ctx_tokens: int) -> float:
        return 0.0

    def transfer_s(self, num_cpu_seqs: int) -> float:
        return 0.0

    def swap_s(self, num_blocks: int) -> float:
        return 0.0

    def iteration_overhead_s(self, num_seqs: int) -> float:
        return 0.0

    def pipeline_handoff_s(self) -> float:
        return 0.0


@dataclass(frozen=True)
class BatchLoad:
    """What one sub-batch asks of each device (prefill attention pre-costed, to be amortised)."""

    num_tokens: int = 0  # rows through the projections: prompt tokens plus one per decode
    prefill_attn_s: float = 0.0  # per layer
    num_seqs: int = 0  # prefills and decodes
    num_gpu_seqs: int = 0  # GPU decodes
    gpu_ctx_tokens: int = 0
    num_cpu_seqs: int = 0  # CPU decodes
    cpu_ctx_tokens: int = 0

    def plus_gpu_decodes(self, num_seqs: int, ctx_tokens: int) -> BatchLoad:
        return replace(
            self,
            num_tokens=self.num_tokens + num_seqs,
            num_seqs=self.num_seqs + num_seqs,
            num_gpu_seqs=self.num_gpu_seqs + num_seqs,
            gpu_ctx_tokens=self.gpu_ctx_tokens + ctx_tokens,
        )

    def plus_cpu_decodes(self, num_seqs: int, ctx_tokens: int) -> BatchLoad:
        return replace(
            self,
            num_tokens=self.num_tokens + num_seqs,
            num_seqs=self.num_seqs + num_seqs,
            num_cpu_seqs=self.num_cpu_seqs + num_seqs,
            cpu_ctx_tokens=self.cpu_ctx_tokens + ctx_tokens,
        )


def linear_s(cost: CostModel, num_tokens: int) -> float:
    return cost.linear_s(num_tokens) if num_tokens else 0.0


def gpu_attn_s(cost: CostModel, b: BatchLoad) -> float:
    return b.prefill_attn_s + (
        cost.gpu_decode_attn_s(b.num_gpu_seqs, b.gpu_ctx_tokens) if b.num_gpu_seqs else 0.0
    )


def cpu_path_s(cost: CostModel, b: BatchLoad) -> float:
    """Host side of one layer: attention plus the copies it waits for."""
    if not b.num_cpu_seqs:
        return 0.0
    return cost.cpu_decode_attn_s(b.num_cpu_seqs, b.cpu_ctx_tokens) + cost.transfer_s(
        b.num_cpu_seqs
    )


def copy_s(cost: CostModel, loads: Sequence[BatchLoad], swap_blocks: int) -> float:
    total = sum(cost.transfer_s(b.num_cpu_seqs) for b in loads if b.num_cpu_seqs)
    return total + (cost.swap_s(swap_blocks) if swap_blocks else 0.0)


def sequential_layer_s(lin: float, gpu_attn: float, cpu: float, copy: float) -> float:
    return max(lin + max(gpu_attn, cpu), copy)


def pipelined_gpu_layer_s(
    lin0: float, lin1: float, gpu_attn0: float, cpu0: float, cpu1: float, handoff: float
) -> float:
    """The GPU's own work in a pipelined layer: both sub-batches' projections, b0's attention, and
    the hand-off of each sub-batch with CPU work (its copies and flag wait between its stages)."""
    return (
        lin0
        + lin1
        + gpu_attn0
        + (handoff if cpu0 > 0.0 else 0.0)
        + (handoff if cpu1 > 0.0 else 0.0)
    )


def pipelined_layer_s(
    lin0: float,
    lin1: float,
    gpu_attn0: float,
    cpu0: float,
    cpu1: float,
    copy: float,
    handoff: float,
) -> float:
    """Steady-state period of the two-sub-batch pipeline (docs/scheduler.md): the slowest of the
    GPU's own work, the CPU's own work, and each sub-batch's round trip between the devices
    (projections, then the CPU attention that the next layer's projections wait for). Each
    sub-batch with CPU work pays the hand-off once per layer on its round trip and once in the
    GPU's own stream (its copies and flag wait between its stages); the CPU's own work hides
    it."""
    gpu = pipelined_gpu_layer_s(lin0, lin1, gpu_attn0, cpu0, cpu1, handoff)
    trip0 = lin0 + cpu0 + (handoff if cpu0 > 0.0 else 0.0)
    trip1 = lin1 + cpu1 + (handoff if cpu1 > 0.0 else 0.0)
    return max(gpu, cpu0 + cpu1, trip0, trip1, copy)


def sequential_s(cost: CostModel, num_layers: int, b: BatchLoad, swap_blocks: int) -> float:
    if not b.num_seqs:
        return 0.0
    layer = sequential_layer_s(
        linear_s(cost, b.num_tokens),
        gpu_attn_s(cost, b),
        cpu_path_s(cost, b),
        copy_s(cost, (b,), swap_blocks),
    )
    return num_layers * layer + cost.iteration_overhead_s(b.num_seqs)


def pipelined_s(
    cost: CostModel, num_layers: int, b0: BatchLoad, b1: BatchLoad, swap_blocks: int
) -> float:
    if not b0.num_seqs + b1.num_seqs:
        return 0.0
    layer = pipelined_layer_s(
        linear_s(cost, b0.num_tokens),
        linear_s(cost, b1.num_tokens),
        gpu_attn_s(cost, b0),
        cpu_path_s(cost, b0),
        cpu_path_s(cost, b1),
        copy_s(cost, (b0, b1), swap_blocks),
        cost.pipeline_handoff_s(),
    )
    return num_layers * layer + cost.iteration_overhead_s(b0.num_seqs + b1.num_seqs)


def rate_beats(
    tokens_a: float, time_a: float, tokens_b: float, time_b: float, margin: float = 0.0
) -> bool:
    """Whether plan a beats plan b's tokens/s by more than margin; zero time is infinitely fast."""
    if time_a <= 0.0 and time_b <= 0.0:
        return tokens_a > tokens_b
    if time_a <= 0.0:
        return tokens_a > 0
    if time_b <= 0.0:
        return tokens_b == 0 and tokens_a > 0
    return tokens_a * time_b > (1.0 + margin) * tokens_b * time_a
