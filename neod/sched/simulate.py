"""A batch of requests served by the scheduler on predicted costs alone.

The advisor (neod.sched.advisor) prices the steady state of a stream of requests. A batch sent all
at once, as the throughput benchmark sends it, holds that state only part of the time: it starts
with every prompt queued and ends with a tail of a few requests. This module plays such a batch
through the real scheduler instead, applying each plan the way the engine does, on counters: a
running sequence holds `blocks_for(computed tokens)` blocks on its device, a prefill computes its
chunk or all that is left, each step that samples adds a token, a preempted sequence prefills its
whole history again. Time advances by each plan's predicted iteration time.
"""

from __future__ import annotations

import random
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from neod.sched.cost import CostModel
from neod.sched.plan import Plan, check_plan
from neod.sched.scheduler import Scheduler
from neod.sched.split import SplitRule
from neod.sched.views import CacheView, Limits, Residence, SeqView, blocks_for


@dataclass(frozen=True)
class SimRequest:
    arrival_step: int
    prompt: int  # tokens
    output: int  # tokens to generate


@dataclass
class SimSeq:
    seq_id: int
    prompt: int
    max_total: int
    num_tokens: int  # prompt + generated
    computed: int = 0
    residence: Residence = Residence.WAITING
    last_progress: int = 0
    first_admitted: int | None = None  # step of its first prefill
    first_token_s: float | None = None  # simulated time of its first sampled token
    unservable: bool = False

    def view(self) -> SeqView:
        """As neod.engine.sequence.Sequence.view."""
        waiting = self.residence == Residence.WAITING
        chunking = not waiting and self.computed < self.num_tokens - 1
        return SeqView(
            self.seq_id,
            self.seq_id,
            self.num_tokens if waiting or chunking else self.prompt,
            self.computed,
            self.max_total,
            self.residence,
            self.last_progress,
            self.num_tokens - self.computed if chunking else 0,
        )


class Simulation:
    def __init__(
        self,
        sched: Scheduler,
        num_gpu_blocks: int,
        num_cpu_blocks: int,
        block_size: int,
        limits: Limits,
        requests: Sequence[SimRequest],
        host_s: float = 0.0,
        record: bool = False,
    ) -> None:
        """host_s: time added to every iteration beyond its prediction; record: keep every plan
        and the views it was made from (`plans`, `views`)."""
        self.sched, self.limits, self.bs = sched, limits, block_size
        self.num_gpu, self.num_cpu = num_gpu_blocks, num_cpu_blocks
        self.pending = sorted(enumerate(requests), key=lambda p: (p[1].arrival_step, p[0]))
        self.seqs: dict[int, SimSeq] = {}
        self.done: dict[int, SimSeq] = {}
        self.step = 0
        self.elapsed_s = 0.0
        self.tokens_out = 0
        self.num_pipelined = 0
        self.host_s = host_s
        self.record = record
        self.plans: list[Plan] = []
        self.views: list[tuple[list[SeqView], list[SeqView]]] = []
        self.admissions: list[int] = []  # seq_ids in the order of their first prefill

    def held(self, where: Residence) -> int:
        return sum(
            blocks_for(s.computed, self.bs) for s in self.seqs.values() if s.residence == where
        )

    def cache(self) -> CacheView:
        return CacheView(
            self.bs,
            self.num_gpu,
            self.num_gpu - self.held(Residence.GPU),
            self.num_cpu,
            self.num_cpu - self.held(Residence.CPU),
        )

    def _finish(self, s: SimSeq) -> None:
        del self.seqs[s.seq_id]
        self.done[s.seq_id] = s

    def run_step(self) -> Plan:
        """One iteration: arrivals, the scheduler's plan (checked as the engine would apply it),
        then the plan applied."""
        self.step += 1
        while self.pending and self.pending[0][1].arrival_step <= self.step:
            i, r = self.pending.pop(0)
            self.seqs[i] = SimSeq(i, r.prompt, r.prompt + r.output, r.prompt,
                                  last_progress=self.step)  # fmt: skip
        waiting = [s.view() for s in self.seqs.values() if s.residence == Residence.WAITING]
        running = [s.view() for s in self.seqs.values() if s.residence != Residence.WAITING]
        cache = self.cache()
        plan = self.sched.schedule(waiting, running, cache, self.limits, self.step)
        errors = check_plan(plan, waiting, running, cache, self.limits)
        if errors:
            raise RuntimeError(f"the scheduler planned what the engine cannot apply: {errors}")
        if self.record:
            self.plans.append(plan)
            self.views.append((waiting, running))
        self._apply(plan)
        return plan

    def _apply(self, plan: Plan) -> None:
        for sid in plan.unservable:
            self.seqs[sid].unservable = True
            self._finish(self.seqs[sid])
        for sid in plan.preempt:
            s = self.seqs[sid]
            s.residence, s.computed = Residence.WAITING, 0
        for sid in plan.swap_out:
            self.seqs[sid].residence = Residence.CPU
        for sid in plan.swap_in:
            self.seqs[sid].residence = Residence.GPU
        for ids, where in ((plan.prefill_gpu, Residence.GPU), (plan.prefill_cpu, Residence.CPU)):
            for sid in ids:
                s = self.seqs[sid]
                s.residence = where
                s.computed = min(s.num_tokens, s.computed + plan.chunked.get(sid, s.num_tokens))
                if s.first_admitted is None:
                    s.first_admitted = self.step
                    self.admissions.append(sid)
        for sid in (*plan.decode_gpu, *plan.decode_cpu_b0, *plan.decode_cpu_b1):
            self.seqs[sid].computed += 1
        self.elapsed_s += plan.predicted_iter_s + self.host_s
        self.num_pipelined += plan.pipelined
        for sid in (*plan.prefill_gpu, *plan.prefill_cpu, *plan.decode_gpu, *plan.decode_cpu_b0,
                    *plan.decode_cpu_b1):  # fmt: skip
            s = self.seqs[sid]
            s.last_progress = self.step
            if sid in plan.chunked:
                continue  # a chunk of its prompt: nothing sampled yet
            s.num_tokens += 1
            self.tokens_out += 1
            if s.first_token_s is None:
                s.first_token_s = self.elapsed_s
            if s.num_tokens >= s.max_total:
                self._finish(s)

    def run(self, max_steps: int) -> None:
        while self.seqs or self.pending:
            if self.step >= max_steps:
                raise RuntimeError(f"not finished after {max_steps} steps")
            self.run_step()


def step_bound(requests: Sequence[SimRequest], age_limit: int) -> int:
    """Steps within which every request must finish (the scheduler's progress guarantees)."""
    return (
        50
        + max((r.arrival_step for r in requests), default=0)
        + 4 * (age_limit + 1) * sum(r.output + 1 for r in requests)
        + sum(r.prompt for r in requests)  # a budget of 1 prefills one token per step
    )


def batch_lengths(
    num_requests: int, input_len: int, output_len: int, seed: int = 0
) -> list[tuple[int, int]]:
    """(prompt, output) tokens of each request, uniform within +-10% of the means: the throughput
    benchmark's workload, so a prediction and a run with the same seed play the same lengths."""
    rng = random.Random(seed)

    def around(mean: int) -> int:
        return max(1, round(mean * rng.uniform(0.9, 1.1)))

    return [(around(input_len), around(output_len)) for _ in range(num_requests)]


def simulate_batch(
    cost_model: CostModel,
    num_layers: int,
    num_gpu_blocks: int,
    num_cpu_blocks: int,
    block_size: int,
    limits: Limits,
    requests: Sequence[tuple[int, int]],
    host_s: float = 0.0,
    split_rule: SplitRule = SplitRule(),
) -> dict[str, Any]:
    """Predicted output tokens/s of these (prompt, output) requests, all sent at once, under
    `limits.policy`; JSON-ready. host_s: the engine's own time per iteration around the predicted
    part (scheduling, batches, outputs), as measured (`median_host_ms` of the engine's stats). The
    engine's offload guard is not simulated (it only acts on measurements). Requests that cannot
    be served are counted ("unservable"), not logged as a serving scheduler would."""
    sched = Scheduler(cost_model, num_layers, split_rule=split_rule, log_drops=False)
    reqs = [SimRequest(1, prompt, output) for prompt, output in requests]
    sim = Simulation(sched, num_gpu_blocks, num_cpu_blocks, block_size, limits, reqs, host_s)
    sim.run(step_bound(reqs, sched.age_limit))
    ttfts = [s.first_token_s for s in sim.done.values() if s.first_token_s is not None]
    return {
        "policy": limits.policy,
        "output_tokens_per_s": sim.tokens_out / sim.elapsed_s if sim.elapsed_s > 0 else 0.0,
        "elapsed_s": sim.elapsed_s,
        "iterations": sim.step,
        "pipelined_share": sim.num_pipelined / sim.step if sim.step else 0.0,
        "ttft_p50_s": statistics.median(ttfts) if ttfts else None,
        "unservable": sum(s.unservable for s in sim.done.values()),
    }


def simulate_policies(
    cost_model: CostModel,
    num_layers: int,
    num_gpu_blocks: int,
    num_cpu_blocks: int,
    block_size: int,
    limits: Limits,
    requests: Sequence[tuple[int, int]],
    host_s: Mapping[str, float],
    split_rule: SplitRule = SplitRule(),
) -> dict[str, dict[str, Any]]:
    """simulate_batch under each policy of host_s (policy: its host time per iteration)."""
    return {
        policy: simulate_batch(
            cost_model, num_layers, num_gpu_blocks, num_cpu_blocks, block_size,
            replace(limits, policy=policy), requests, host, split_rule,
        )  # fmt: skip
        for policy, host in host_s.items()
    }
