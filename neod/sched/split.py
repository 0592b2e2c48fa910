"""Which CPU-resident sequences decode this iteration, in which sub-batch, and in which mode.

The GPU work (prefills, GPU decodes) is fixed before this runs; only the CPU decodes vary, so every
candidate plan is rated on the same requests and the rates compare honestly. Two candidates are
built greedily:

- sequential: one batch; a CPU decode is added while it does not lower tokens per second;
- pipelined: CPU decodes are dealt to the sub-batch with more slack, accepted while the CPU work
  stays hidden under the GPU work it overlaps (NEO's balance rule, with transfers included) or while
  it still raises the rate. b1 only ever holds CPU decodes.

The faster one wins; ties go to sequential. Forced sequences (aged CPU requests) are in both
candidates whatever they cost, so a CPU request always progresses, alone or not. A candidate at
least as long as one already rejected is skipped without being costed: attention cost grows with
context.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from neod.sched.cost import (
    BatchLoad,
    CostModel,
    gpu_attn_s,
    linear_s,
    pipelined_layer_s,
    rate_beats,
    sequential_layer_s,
)


@dataclass(frozen=True)
class CpuCandidate:
    seq_id: int
    ctx_tokens: int  # context its attention reads, the new token included


@dataclass
class DecodeSplit:
    b0_ids: list[int]  # CPU decodes in sub-batch 0 (the only batch when sequential)
    b1_ids: list[int]
    pipelined: bool
    iter_s: float
    num_tokens_out: int  # sequences that produce a token, GPU work included
    num_left_out: int  # optional candidates not taken


class _Side:
    """One sub-batch under construction, with its per-layer stage times kept current."""

    __slots__ = (
        "num_tokens",
        "num_seqs",
        "num_cpu",
        "cpu_ctx",
        "lin",
        "gpu_attn",
        "cpu",
        "xfer",
        "ids",
    )

    def __init__(self, cost: CostModel, load: BatchLoad) -> None:
        self.num_tokens, self.num_seqs = load.num_tokens, load.num_seqs
        self.num_cpu, self.cpu_ctx = 0, 0
        self.lin = linear_s(cost, load.num_tokens)
        self.gpu_attn = gpu_attn_s(cost, load)
        self.cpu = self.xfer = 0.0
        self.ids: list[int] = []

    def trial(self, cost: CostModel, ctx_tokens: int) -> tuple[float, float, float]:
        """(projections, CPU path, transfer) with one more CPU decode."""
        n = self.num_cpu + 1
        xfer = cost.transfer_s(n)
        return (
            cost.linear_s(self.num_tokens + 1),
            cost.cpu_decode_attn_s(n, self.cpu_ctx + ctx_tokens) + xfer,
            xfer,
        )

    def commit(self, c: CpuCandidate, trial: tuple[float, float, float]) -> None:
        self.lin, self.cpu, self.xfer = trial
        self.num_tokens += 1
        self.num_seqs += 1
        self.num_cpu += 1
        self.cpu_ctx += c.ctx_tokens
        self.ids.append(c.seq_id)


class _Builder:
    def __init__(self, cost: CostModel, num_layers: int, swap_blocks: int) -> None:
        self.cost = cost
        self.num_layers = num_layers
        self.swap = cost.swap_s(swap_blocks) if swap_blocks else 0.0

    def seq_time(self, s: _Side, lin: float, cpu: float, xfer: float, num_seqs: int) -> float:
        if not num_seqs:
            return 0.0
        layer = sequential_layer_s(lin, s.gpu_attn, cpu, xfer + self.swap)
        return self.num_layers * layer + self.cost.iteration_overhead_s(num_seqs)

    def pipe_time(
        self,
        s0: _Side,
        s1: _Side,
        t0: tuple[float, float, float],
        t1: tuple[float, float, float],
        num_seqs: int,
    ) -> float:
        layer = pipelined_layer_s(
            t0[0], t1[0], s0.gpu_attn, t0[1], t1[1], t0[2] + t1[2] + self.swap
        )
        return self.num_layers * layer + self.cost.iteration_overhead_s(num_seqs)

    def sequential(
        self,
        base: BatchLoad,
        forced: Sequence[CpuCandidate],
        optional: Sequence[CpuCandidate],
        max_optional: int,
    ) -> DecodeSplit:
        s = _Side(self.cost, base)
        for c in forced:
            s.commit(c, s.trial(self.cost, c.ctx_tokens))
        t = self.seq_time(s, s.lin, s.cpu, s.xfer, s.num_seqs)
        taken, shortest_rejected = 0, math.inf
        for c in optional:
            if taken == max_optional:
                break
            if c.ctx_tokens >= shortest_rejected:
                continue
            trial = s.trial(self.cost, c.ctx_tokens)
            t_new = self.seq_time(s, *trial, s.num_seqs + 1)
            if rate_beats(s.num_seqs, t, s.num_seqs + 1, t_new):
                shortest_rejected = c.ctx_tokens
                continue
            s.commit(c, trial)
            t, taken = t_new, taken + 1
        return DecodeSplit(s.ids, [], False, t, s.num_seqs, len(optional) - taken)

    def pipelined(
        self,
        base: BatchLoad,
        forced: Sequence[CpuCandidate],
        optional: Sequence[CpuCandidate],
        max_optional: int,
    ) -> DecodeSplit | None:
        s0, s1 = _Side(self.cost, base), _Side(self.cost, BatchLoad())
        for c in forced:
            side, trial, _, _ = self._best_side(s0, s1, c)
            side.commit(c, trial)
        t = self.pipe_time(
            s0, s1, (s0.lin, s0.cpu, s0.xfer), (s1.lin, s1.cpu, s1.xfer), s0.num_seqs + s1.num_seqs
        )
        taken, shortest_rejected = 0, math.inf
        for c in optional:
            if taken == max_optional:
                break
            if c.ctx_tokens >= shortest_rejected:
                continue
            side, trial, hidden, t_new = self._best_side(s0, s1, c)
            n = s0.num_seqs + s1.num_seqs
            if not hidden and rate_beats(n, t, n + 1, t_new):
                shortest_rejected = c.ctx_tokens
                continue
            side.commit(c, trial)
            t, taken = t_new, taken + 1
        if not s1.ids or not s0.num_seqs:
            return None
        return DecodeSplit(
            s0.ids, s1.ids, True, t, s0.num_seqs + s1.num_seqs, len(optional) - taken
        )

    def _best_side(
        self, s0: _Side, s1: _Side, c: CpuCandidate
    ) -> tuple[_Side, tuple[float, float, float], bool, float]:
        """The sub-batch keeping most slack with c added: (side, trial, CPU hidden, new time)."""
        now0, now1 = (s0.lin, s0.cpu, s0.xfer), (s1.lin, s1.cpu, s1.xfer)
        best = None
        for side, other_now in ((s0, now1), (s1, now0)):
            trial = side.trial(self.cost, c.ctx_tokens)
            t0, t1 = (trial, other_now) if side is s0 else (other_now, trial)
            slack_b1 = t0[0] - t1[1]  # b0's projections cover b1's CPU path
            slack_b0 = (
                t1[0] + s0.gpu_attn - t0[1]
            )  # b1's projections and b0's GPU attention cover b0's
            stages = max(t0[0], t1[1]) + max(t1[0] + s0.gpu_attn, t0[1])
            slack = min(slack_b0, slack_b1, stages - (t0[2] + t1[2] + self.swap))
            if best is None or slack > best[0]:
                best = (slack, side, trial, t0, t1)
        slack, side, trial, t0, t1 = best
        t_new = self.pipe_time(s0, s1, t0, t1, s0.num_seqs + s1.num_seqs + 1)
        return side, trial, slack >= 0.0, t_new


def split_cpu_decodes(
    cost: CostModel,
    num_layers: int,
    base: BatchLoad,
    forced: Sequence[CpuCandidate],
    optional: Sequence[CpuCandidate],
    max_optional: int,
    swap_blocks: int,
) -> DecodeSplit:
    """Best plan for the CPU decodes around the fixed GPU work `base` (sub-batch 0's).

    forced are always decoded; optional are in priority order, at most max_optional of them are
    taken; swap_blocks are the blocks copied per layer this iteration (swaps, CPU-bound prefills).
    """
    builder = _Builder(cost, num_layers, swap_blocks)
    seq = builder.sequential(base, forced, optional, max_optional)
    if not forced and not optional:
        return seq
    pipe = builder.pipelined(base, forced, optional, max_optional)
    if pipe is not None and rate_beats(
        pipe.num_tokens_out, pipe.iter_s, seq.num_tokens_out, seq.iter_s
    ):
        return pipe
    return seq
