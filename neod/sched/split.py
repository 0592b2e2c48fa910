"""Which CPU-resident sequences decode this iteration, in which sub-batch, and in which mode.

The GPU work (prefills, GPU decodes) is fixed before this runs; only the CPU decodes vary, so every
candidate plan is rated on the same requests and the rates compare honestly. Two candidates are
built a CPU decode at a time:

- sequential: one batch; the CPU attention overlaps the GPU attention of the same layer;
- pipelined: each CPU decode goes to the sub-batch that keeps the most slack; b1 only ever holds
  CPU decodes, b0 holds the GPU work.

Each is built twice. One decode at a time: a CPU decode is taken when its work hides under the
GPU work it overlaps (NEO's balance rule, PCIe copies included), or past that balance point when
it raises the candidate's tokens per second by at least `SplitRule.min_gain` without stretching
its GPU-bound time (the same candidate without CPU attention and copies) by more than
`SplitRule.stretch`; once one is refused, none at least as long is tried (attention cost grows
with context). By prefixes: from where one decode at a time first refuses a decode for its rate,
every further decode is added in staleness order and each prefix so made is judged by the same
rule against the best shorter one, the gain counted per decode it adds, until one is past the
stretch bound. A
fixed cost per CPU run (what a GPU-paced CPU program has) makes the first decode of a batch lower
the rate where the whole batch raises it: one decode at a time refuses that batch, the prefixes
find it; one decode at a time, in turn, skips long decodes the prefixes must carry. The build with
more tokens per second is the candidate. The gain, not the stretch, is what stops the CPU batch: a
stretch bound alone would admit fewer CPU decodes the cheaper the hand-offs are, since they are
part of the GPU-bound time. With no GPU work at all there is nothing to slow down, and CPU decodes
are taken while they do not lower the rate. The faster candidate wins; ties go to sequential.

Forced sequences (aged CPU requests) are in both candidates whatever they cost, so a CPU request
always progresses, alone or not.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from neod.sched.cost import (
    BatchLoad,
    CostModel,
    gpu_attn_s,
    linear_s,
    pipelined_gpu_layer_s,
    pipelined_layer_s,
    rate_beats,
    sequential_layer_s,
)

Trial = tuple[float, float, float]  # a side's (projections, CPU path, transfer) seconds per layer
MAX_ROUND_ROBIN = 64  # SplitRule.round_robin: past this a CPU request waits too long for a token


@dataclass(frozen=True)
class SplitRule:
    """How far past the balance point the CPU's work goes (scheduler.cpu_min_gain,
    scheduler.cpu_stretch and scheduler.cpu_round_robin in neod.toml)."""

    min_gain: float = 0.01  # least rise of the iteration's tokens/s that one more CPU decode buys
    stretch: float = 1.0  # most the iteration may exceed its GPU-bound time (1.0: twice it)
    # Most requests the CPU holds per decode it keeps up with, when it takes prompts while the GPU
    # prefills the queue (neod.sched.outlook); 1: no more than it decodes every iteration.
    round_robin: int = 3

    def __post_init__(self) -> None:
        # The ranges neod.toml and the control protocol allow (a gain over 100% is never bought).
        if not (0.0 <= self.min_gain <= 1.0 and 0.0 <= self.stretch <= 100.0):
            raise ValueError(
                f"min_gain must be in [0, 1] and stretch in [0, 100], got {self.min_gain}, "
                f"{self.stretch}"
            )
        if isinstance(self.round_robin, bool) or not isinstance(self.round_robin, int) or not (
            1 <= self.round_robin <= MAX_ROUND_ROBIN
        ):
            raise ValueError(
                f"round_robin must be an integer in [1, {MAX_ROUND_ROBIN}], got "
                f"{self.round_robin!r}"
            )

    @classmethod
    def of(cls, scheduler_config: Any) -> SplitRule:
        """From neod.toml's [scheduler] section (neod.config.SchedulerConfig)."""
        return cls(
            scheduler_config.cpu_min_gain,
            scheduler_config.cpu_stretch,
            scheduler_config.cpu_round_robin,
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


class _Side:
    """One sub-batch under construction, with its per-layer stage times kept current. A pass
    tries every candidate on it: what one more CPU decode costs but its attention (projections,
    copies) is the same for all of them and is looked up once per commit."""

    __slots__ = ("cost", "num_tokens", "num_seqs", "num_cpu", "cpu_ctx", "now", "gpu_attn", "ids",
                 "next_linear", "next_xfer")  # fmt: skip

    def __init__(self, cost: CostModel, load: BatchLoad) -> None:
        self.cost = cost
        self.num_tokens, self.num_seqs = load.num_tokens, load.num_seqs
        self.num_cpu, self.cpu_ctx = 0, 0
        self.now: Trial = (linear_s(cost, load.num_tokens), 0.0, 0.0)
        self.gpu_attn = gpu_attn_s(cost, load)
        self.ids: list[int] = []
        self._look_ahead()

    def _look_ahead(self) -> None:
        self.next_linear = self.cost.linear_s(self.num_tokens + 1)
        self.next_xfer = self.cost.transfer_s(self.num_cpu + 1)

    def trial(self, ctx_tokens: int) -> Trial:
        """The stage times with one more CPU decode."""
        xfer = self.next_xfer
        cpu = self.cost.cpu_decode_attn_s(self.num_cpu + 1, self.cpu_ctx + ctx_tokens) + xfer
        return self.next_linear, cpu, xfer

    def fork(self) -> _Side:
        """A copy to build on apart."""
        other = object.__new__(_Side)
        for name in self.__slots__:
            setattr(other, name, getattr(self, name))
        other.ids = list(self.ids)
        return other

    def commit(self, c: CpuCandidate, trial: Trial) -> None:
        self.now = trial
        self.num_tokens += 1
        self.num_seqs += 1
        self.num_cpu += 1
        self.cpu_ctx += c.ctx_tokens
        self.ids.append(c.seq_id)
        self._look_ahead()


class _Builder:
    def __init__(self, cost: CostModel, num_layers: int, swap_blocks: int, rule: SplitRule) -> None:
        self.cost = cost
        self.num_layers = num_layers
        self.swap = cost.swap_s(swap_blocks) if swap_blocks else 0.0
        self.rule = rule
        self.handoff = cost.pipeline_handoff_s()

    def _totals(self, full_s: float, ref_s: float, num_seqs: int) -> tuple[float, float]:
        """Two per-layer times as iteration times: `num_layers` of them plus the overhead."""
        if not num_seqs:
            return 0.0, 0.0
        overhead = self.cost.iteration_overhead_s(num_seqs)
        return self.num_layers * full_s + overhead, self.num_layers * ref_s + overhead

    def seq_times(self, s: _Side, t: Trial, num_seqs: int) -> tuple[float, float]:
        """(iteration, its GPU-bound part) of the sequential candidate."""
        full = sequential_layer_s(t[0], s.gpu_attn, t[1], t[2] + self.swap)
        ref = sequential_layer_s(t[0], s.gpu_attn, 0.0, self.swap)
        return self._totals(full, ref, num_seqs)

    def pipe_times(self, s0: _Side, t0: Trial, t1: Trial, num_seqs: int) -> tuple[float, float]:
        """(iteration, its GPU-bound part) of the pipelined candidate. The GPU-bound part carries
        the hand-offs of the sub-batches with CPU work, as it carries sub-batch 1's projections:
        both are the price of the pipelined form itself, which the choice between the forms
        weighs (split_cpu_decodes), not the price of one more CPU decode."""
        handoff = self.handoff
        copy = t0[2] + t1[2] + self.swap
        full = pipelined_layer_s(t0[0], t1[0], s0.gpu_attn, t0[1], t1[1], copy, handoff)
        gpu = pipelined_gpu_layer_s(t0[0], t1[0], s0.gpu_attn, t0[1], t1[1], handoff)
        return self._totals(full, max(gpu, self.swap), num_seqs)

    def verdict(
        self, gpu_work: bool, best_n: int, best_t: float, n: int, t: float, ref: float
    ) -> bool | None:
        """Whether a candidate of n tokens in t seconds (ref its GPU-bound part) beats the best
        shorter one (best_n tokens in best_t); None: it is past the stretch bound, which more CPU
        decodes only widen."""
        if t <= ref * (1.0 + 1e-9):
            return True  # hidden under the GPU work
        if not gpu_work:
            return not rate_beats(best_n, best_t, n, t)
        if t > (1.0 + self.rule.stretch) * ref:
            return None
        return rate_beats(n, t, best_n, best_t, self.rule.min_gain * (n - best_n))

    def sequential(
        self,
        base: BatchLoad,
        forced: Sequence[CpuCandidate],
        optional: Sequence[CpuCandidate],
        max_optional: int,
    ) -> DecodeSplit:
        s = _Side(self.cost, base)
        for c in forced:
            s.commit(c, s.trial(c.ctx_tokens))

        def attempt(sides: tuple[_Side, ...], c: CpuCandidate) -> tuple[_Side, Trial, float, float]:
            (side,) = sides
            trial = side.trial(c.ctx_tokens)
            return side, trial, *self.seq_times(side, trial, side.num_seqs + 1)

        t = self.seq_times(s, s.now, s.num_seqs)[0]
        splits = [
            DecodeSplit(side.ids[:n0], [], False, t, n)
            for t, n, (n0,), (side,) in self._builds(base, (s,), attempt, t, optional, max_optional)
        ]
        return _faster(splits)

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
        t = self.pipe_times(s0, s0.now, s1.now, s0.num_seqs + s1.num_seqs)[0]
        builds = self._builds(
            base, (s0, s1), lambda sides, c: self._best_side(*sides, c), t, optional, max_optional
        )
        splits = [
            DecodeSplit(b0.ids[:n0], b1.ids[:n1], True, t, n)
            for t, n, (n0, n1), (b0, b1) in builds
            if n1 and n > n1  # CPU decodes in b1, and something in b0
        ]
        return _faster(splits) if splits else None

    def _builds(
        self,
        base: BatchLoad,
        sides: tuple[_Side, ...],
        attempt: Callable[[tuple[_Side, ...], CpuCandidate], tuple[_Side, Trial, float, float]],
        t: float,
        optional: Sequence[CpuCandidate],
        max_optional: int,
    ) -> list[tuple[float, int, tuple[int, ...], tuple[_Side, ...]]]:
        """The builds of one candidate (module docstring), each as (iteration, tokens, CPU decodes
        per side, counted from the start of each side's ids, the sides). attempt: the side a
        decode goes to, its trial, the iteration and its GPU-bound part with it. The prefixes
        start from one decode at a time's state at its first refusal for the rate, on copies of
        the sides; where nothing is refused for its rate they cannot differ and are not built."""
        gpu_work = base.num_seqs > 0
        n = sum(s.num_seqs for s in sides)
        best = (t, n, tuple(len(s.ids) for s in sides))
        fork = None
        taken, shortest_refused = 0, math.inf
        for i, c in enumerate(optional):
            if taken == max_optional:
                break
            if c.ctx_tokens >= shortest_refused:
                continue
            side, trial, t_new, ref_new = attempt(sides, c)
            better = self.verdict(gpu_work, best[1], best[0], n + 1, t_new, ref_new)
            if better:
                side.commit(c, trial)
                n, taken = n + 1, taken + 1
                best = (t_new, n, tuple(len(s.ids) for s in sides))
                continue
            if fork is None and better is not None:  # past the stretch, prefixes stop too
                fork = (tuple(s.fork() for s in sides), n, best, i)
            shortest_refused = c.ctx_tokens
        builds = [(*best, sides)]
        if fork is None:
            return builds
        sides, n, best, first = fork
        for c in optional[first:max_optional]:
            side, trial, t_new, ref_new = attempt(sides, c)
            side.commit(c, trial)
            n += 1
            better = self.verdict(gpu_work, best[1], best[0], n, t_new, ref_new)
            if better is None:
                break
            if better:
                best = (t_new, n, tuple(len(s.ids) for s in sides))
        return [*builds, (*best, sides)]

    def _best_side(
        self, s0: _Side, s1: _Side, c: CpuCandidate
    ) -> tuple[_Side, Trial, float, float]:
        """The sub-batch keeping most slack with c: (side, trial, iteration, its GPU-bound part)."""
        best = None
        for side in (s0, s1):
            trial = side.trial(c.ctx_tokens)
            t0, t1 = (trial, s1.now) if side is s0 else (s0.now, trial)
            slack_b1 = t0[0] - t1[1]  # b0's projections cover b1's CPU path
            slack_b0 = (
                t1[0] + s0.gpu_attn - t0[1]
            )  # b1's projections, b0's GPU attention cover b0's
            slack = min(slack_b0, slack_b1)
            if best is None or slack > best[0]:
                best = (slack, side, trial, t0, t1)
        _, side, trial, t0, t1 = best
        return (side, trial, *self.pipe_times(s0, t0, t1, s0.num_seqs + s1.num_seqs + 1))


def split_candidates(
    cost: CostModel,
    num_layers: int,
    base: BatchLoad,
    forced: Sequence[CpuCandidate],
    optional: Sequence[CpuCandidate],
    max_optional: int,
    swap_blocks: int,
    rule: SplitRule = SplitRule(),
) -> tuple[DecodeSplit, DecodeSplit | None]:
    """The sequential and the pipelined candidate (None when no pipelined split exists); see
    `split_cpu_decodes` for the arguments."""
    builder = _Builder(cost, num_layers, swap_blocks, rule)
    seq = builder.sequential(base, forced, optional, max_optional)
    if not forced and not optional:
        return seq, None
    return seq, builder.pipelined(base, forced, optional, max_optional)


def _faster(splits: list[DecodeSplit]) -> DecodeSplit:
    """The one with the most tokens per second, the first on a tie."""
    best = splits[0]
    for s in splits[1:]:
        if rate_beats(s.num_tokens_out, s.iter_s, best.num_tokens_out, best.iter_s):
            best = s
    return best


def split_cpu_decodes(
    cost: CostModel,
    num_layers: int,
    base: BatchLoad,
    forced: Sequence[CpuCandidate],
    optional: Sequence[CpuCandidate],
    max_optional: int,
    swap_blocks: int,
    rule: SplitRule = SplitRule(),
) -> DecodeSplit:
    """Best plan for the CPU decodes around the fixed GPU work `base` (sub-batch 0's).

    forced are always decoded; optional are in priority order, at most max_optional of them are
    taken; swap_blocks are the blocks copied per layer this iteration (swaps, CPU-bound prefills).
    """
    seq, pipe = split_candidates(
        cost, num_layers, base, forced, optional, max_optional, swap_blocks, rule
    )
    if pipe is not None and rate_beats(
        pipe.num_tokens_out, pipe.iter_s, seq.num_tokens_out, seq.iter_s
    ):
        return pipe
    return seq
