"""The scheduler driven by neod.sched.simulate's engine on counters: blocks, tokens, arrivals.

Every plan is checked with `check_plan` (budgets, block replay in the documented order, residences),
then applied the way the engine applies it. Properties: no plan is ever invalid, blocks are
conserved, every request finishes within a bound, running requests are never starved, admission is
FCFS, gpu-only never touches the CPU. Regression tests replay the reference scheduler's known
failures.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from neod.sched import (
    BatchLoad,
    CacheView,
    Limits,
    Plan,
    Residence,
    Scheduler,
    SeqView,
    SplitRule,
    ZeroCostModel,
    blocks_for,
    check_plan,
    pipelined_s,
    sequential_s,
)
from neod.sched.simulate import SimRequest, SimSeq, Simulation, step_bound


class ScriptedCost:
    """Weight-bound projections (a fixed cost per sub-batch), attention linear in context: the
    regime where pipelining pays if the CPU is fast enough. Seconds per layer."""

    def __init__(
        self,
        lin: float = 1e-3,
        cpu_per_token: float = 1e-6,
        transfer: float = 0.0,
        swap: float = 0.0,
        gpu_per_token: float = 1e-8,
    ) -> None:
        self.lin, self.cpu_per_token, self.transfer, self.swap = lin, cpu_per_token, transfer, swap
        self.gpu_per_token = gpu_per_token

    def linear_s(self, num_tokens: int) -> float:
        return self.lin + 1e-7 * num_tokens if num_tokens else 0.0

    def prefill_attn_s(self, prompt_lens) -> float:
        return 1e-8 * sum(n * n for n in prompt_lens)

    def gpu_decode_attn_s(self, num_seqs: int, num_ctx_tokens: int) -> float:
        return self.gpu_per_token * num_ctx_tokens if num_seqs else 0.0

    def cpu_decode_attn_s(self, num_seqs: int, num_ctx_tokens: int) -> float:
        return 1e-5 + self.cpu_per_token * num_ctx_tokens if num_seqs else 0.0

    def transfer_s(self, num_cpu_seqs: int) -> float:
        return self.transfer * num_cpu_seqs

    def swap_s(self, num_blocks: int) -> float:
        return self.swap * num_blocks

    def iteration_overhead_s(self, num_seqs: int) -> float:
        return 1e-4 if num_seqs else 0.0

    def pipeline_handoff_s(self) -> float:
        return 0.0


COSTS = {
    "zero": ZeroCostModel(),
    "cheap-cpu": ScriptedCost(cpu_per_token=1e-6),
    "balanced": ScriptedCost(cpu_per_token=1e-5, transfer=2e-5, swap=1e-6),
    "slow-cpu": ScriptedCost(cpu_per_token=1e-3),
}


Req = SimRequest  # (arrival_step, prompt, output)


class Sim(Simulation):
    """The simulation with every plan recorded, and what the properties below check besides."""

    def __init__(self, sched, num_gpu, num_cpu, block_size, limits, reqs) -> None:
        super().__init__(sched, num_gpu, num_cpu, block_size, limits, reqs, record=True)
        self.cpu_used_ever = False
        self.max_running_gap = 0

    def run_step(self) -> Plan:
        plan = super().run_step()
        assert self.held(Residence.GPU) <= self.num_gpu and self.held(Residence.CPU) <= self.num_cpu
        self.cpu_used_ever |= bool(
            plan.prefill_cpu or plan.decode_cpu_b0 or plan.decode_cpu_b1 or plan.swap_out
        )
        for s in self.seqs.values():
            if s.residence != Residence.WAITING:
                self.max_running_gap = max(self.max_running_gap, self.step - s.last_progress)
        return plan


@st.composite
def workloads(
    draw,
    policies=("auto", "gpu-only", "neo"),
    ample_budget=False,
    crowded=False,
    tight=False,
    host_only=False,
):
    """crowded: many requests, a small GPU and a large CPU pool, where offloading and pipelining
    happen often; tight: a token budget down to 1, below prompts and blocks (chunked prefills);
    host_only: a GPU pool smaller than the longest request, which only the CPU pool can hold."""
    block_size = draw(st.sampled_from([1, 2, 4, 16]))
    max_len = draw(st.integers(4 * block_size if host_only else 4, 64))
    per_seq = blocks_for(max_len, block_size)
    if host_only:
        num_gpu = draw(st.integers(1, per_seq - 1))
        num_cpu = draw(st.integers(per_seq, 6 * per_seq))
    else:
        num_gpu = draw(st.integers(per_seq, (2 if crowded else 4) * per_seq))
        num_cpu = draw(
            st.integers(10 * per_seq, 40 * per_seq) if crowded else st.integers(0, 6 * per_seq)
        )
    policy = draw(st.sampled_from(policies))
    reqs = []
    for _ in range(draw(st.integers(10, 40) if crowded else st.integers(1, 12))):
        prompt = draw(st.integers(1, max_len - 1))
        reqs.append(Req(draw(st.integers(1, 20)), prompt, draw(st.integers(1, max_len - prompt))))
    if ample_budget:
        limits = Limits(len(reqs), len(reqs) + max_len, policy)
    elif tight:
        limits = Limits(draw(st.integers(1, 8)), draw(st.integers(1, max_len)), policy)
    else:
        limits = Limits(draw(st.integers(1, 8)), draw(st.integers(max_len, 4 * max_len)), policy)
    names = ["balanced", "cheap-cpu"] if crowded else sorted(COSTS)
    cost = COSTS[draw(st.sampled_from(names))]
    return num_gpu, num_cpu, block_size, limits, reqs, cost


def served(case) -> tuple[Sim, Scheduler]:
    """The case's requests through the simulation, which must finish every one of them, none
    unservable (every request is servable by construction)."""
    num_gpu, num_cpu, bs, limits, reqs, cost = case
    sched = Scheduler(cost, num_layers=4)
    sim = Sim(sched, num_gpu, num_cpu, bs, limits, reqs)
    sim.run(step_bound(reqs, sched.age_limit))
    assert len(sim.done) == len(reqs) and not any(s.unservable for s in sim.done.values())
    assert all(s.num_tokens == s.max_total for s in sim.done.values())
    return sim, sched


FAST = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(workloads())
def test_every_plan_valid_and_every_request_finishes(case):
    sim, _ = served(case)
    if case[3].policy == "gpu-only":
        assert not sim.cpu_used_ever


@FAST
@given(workloads(tight=True))
def test_a_budget_below_the_prompts_prefills_them_in_chunks_and_every_request_finishes(case):
    sim, _ = served(case)
    limits, reqs = case[3], case[4]
    chunks = [n for plan in sim.plans for n in plan.chunked.values()]
    assert all(0 < n <= limits.max_tokens_in_batch for n in chunks)
    if any(r.prompt > limits.max_tokens_in_batch for r in reqs):
        assert chunks


@FAST
@given(workloads(policies=("auto", "neo"), tight=True, host_only=True))
def test_prompts_only_the_host_pool_holds_go_there_in_chunks_and_every_request_finishes(case):
    sim, _ = served(case)
    num_gpu, bs, limits, reqs = case[0], case[2], case[3], case[4]
    cpu_chunks = [n for plan in sim.plans for sid, n in plan.chunked.items()
                  if sid in plan.prefill_cpu]  # fmt: skip
    assert all(0 < n <= limits.max_tokens_in_batch for n in cpu_chunks)
    if any(
        r.prompt > limits.max_tokens_in_batch and blocks_for(r.prompt, bs) > num_gpu for r in reqs
    ):
        assert cpu_chunks
    for plan, (waiting, running) in zip(sim.plans, sim.views, strict=True):
        predicted = replay_prediction(plan, waiting, running, case[5], bs)
        assert plan.predicted_iter_s == pytest.approx(predicted)


@FAST
@given(workloads(policies=("neo",), tight=True, host_only=True), st.integers(1, 30))
def test_turning_to_gpu_only_midway_ends_what_only_the_host_holds_and_finishes_the_rest(
    case, switch_step
):
    """Prompts part-way in on the CPU, requests decoding there and queued ones: once the policy
    is gpu-only, what the GPU pool cannot hold ends (as unservable), everything else finishes, and
    no plan touches the CPU again."""
    num_gpu, num_cpu, bs, limits, reqs, cost = case
    sched = Scheduler(cost, num_layers=4)
    sim = Sim(sched, num_gpu, num_cpu, bs, limits, reqs)
    while sim.step < switch_step and (sim.seqs or sim.pending):
        sim.run_step()
    sim.limits = dataclasses.replace(limits, policy="gpu-only")
    switched = len(sim.plans)
    sim.run(switch_step + step_bound(reqs, sched.age_limit))
    assert len(sim.done) == len(reqs)
    assert sim.held(Residence.GPU) == sim.held(Residence.CPU) == 0
    for plan in sim.plans[switched:]:
        assert not (plan.prefill_cpu or plan.swap_out or plan.decode_cpu_b0 or plan.decode_cpu_b1)
    for s in sim.done.values():
        if s.unservable:  # only what the GPU pool could never hold
            assert blocks_for(s.num_tokens, bs) > num_gpu
        else:
            assert s.num_tokens == s.max_total


@FAST
@given(workloads(policies=("auto", "neo"), crowded=True))
def test_crowded_offloading_stays_valid_and_predictions_match_the_plans(case):
    sim, sched = served(case)
    bs, cost = case[2], case[5]
    for step, (plan, (waiting, running)) in enumerate(zip(sim.plans, sim.views, strict=True), 1):
        predicted = replay_prediction(plan, waiting, running, cost, bs)
        assert plan.predicted_iter_s == pytest.approx(predicted)
        # Unless an aged request forced it, CPU work is only ever taken where it raises the rate.
        aged = [v for v in running if step - v.last_progress_step >= sched.age_limit]
        if not any(v.residence == Residence.CPU for v in aged) and plan.num_seqs:
            bare = dataclasses.replace(plan, decode_cpu_b0=[], decode_cpu_b1=[], pipelined=False)
            bare_s = replay_prediction(bare, waiting, running, cost, bs)
            assert plan.num_seqs * bare_s >= bare.num_seqs * predicted * (1 - 1e-9)


def replay_prediction(plan: Plan, waiting, running, cost, bs: int) -> float:
    """The plan's iteration time from the public formulas, rebuilt from the plan alone."""
    views = {v.seq_id: v for v in (*waiting, *running)}
    prefills = [views[i] for i in (*plan.prefill_gpu, *plan.prefill_cpu)]
    tokens = [plan.chunked.get(v.seq_id) or v.prefill_left for v in prefills]
    # A chunk after a prefix of c attends like a whole prompt of sqrt(n^2 + 2 n c) tokens.
    attn = [
        math.isqrt(n * n + 2 * n * v.num_computed_tokens)
        for v, n in zip(prefills, tokens, strict=True)
    ]
    prefill_s = cost.prefill_attn_s(attn) if attn else 0.0
    # A chunk on the CPU reads the earlier chunks' KV from the host pool before its attention.
    host_prefix = sum(v.held_blocks(bs) for v in prefills if v.residence == Residence.CPU)
    prefill_s += cost.swap_s(host_prefix) if host_prefix else 0.0
    base = BatchLoad(sum(tokens), prefill_s, len(attn))
    gpu = [views[i] for i in plan.decode_gpu]
    b0 = base.plus_gpu_decodes(len(gpu), sum(v.decode_ctx_tokens for v in gpu))
    for ids, into in ((plan.decode_cpu_b0, "b0"), (plan.decode_cpu_b1, "b1")):
        ctx = sum(views[i].decode_ctx_tokens for i in ids)
        if into == "b0":
            b0 = b0.plus_cpu_decodes(len(ids), ctx)
        else:
            b1 = BatchLoad().plus_cpu_decodes(len(ids), ctx)
    swap = sum(views[i].held_blocks(bs) for i in (*plan.swap_out, *plan.swap_in))
    swap += sum(
        blocks_for(plan.chunked.get(i) or views[i].prefill_left, bs) for i in plan.prefill_cpu
    )
    if plan.pipelined:
        return pipelined_s(cost, 4, b0, b1, swap)
    return sequential_s(cost, 4, b0, swap)


@FAST
@given(workloads(ample_budget=True))
def test_running_requests_never_starve(case):
    num_gpu, num_cpu, bs, limits, reqs, cost = case
    sched = Scheduler(cost, num_layers=4, age_limit=3)
    sim = Sim(sched, num_gpu, num_cpu, bs, limits, reqs)
    sim.run(step_bound(reqs, sched.age_limit))
    assert sim.max_running_gap <= sched.age_limit


@FAST
@given(workloads(("auto", "neo"), ample_budget=True, crowded=True), st.sampled_from([1, 2, 3, 64]))
def test_the_cpu_taking_the_queue_keeps_every_plan_valid_and_every_request_progressing(
    case, round_robin
):
    """Whatever scheduler.cpu_round_robin lets the CPU take from the queue while the GPU
    prefills, every request finishes and none waits longer than the age limit between tokens."""
    num_gpu, num_cpu, bs, limits, reqs, cost = case
    rule = SplitRule(round_robin=round_robin)
    sched = Scheduler(cost, num_layers=4, age_limit=3, split_rule=rule)
    sim = Sim(sched, num_gpu, num_cpu, bs, limits, reqs)
    sim.run(step_bound(reqs, sched.age_limit))
    assert len(sim.done) == len(reqs) and not any(s.unservable for s in sim.done.values())
    assert sim.max_running_gap <= sched.age_limit


@pytest.mark.parametrize("cost", sorted(COSTS))
def test_a_prefill_under_way_keeps_the_room_it_was_admitted_with(cost):
    """A 30-token prompt goes in chunks into a 39-block pool, then an older request's decodes
    grow into the rest of its room: the prefill must not wait for them to finish (it did, 4 steps
    with an age limit of 3)."""
    reqs = [Req(1, 1, 11), Req(1, 10, 11), Req(3, 1, 13), Req(1, 30, 1)]
    sched = Scheduler(COSTS[cost], num_layers=4, age_limit=3)
    sim = Sim(sched, 39, 0, 1, Limits(4, 35, "auto"), reqs)
    sim.run(step_bound(reqs, sched.age_limit))
    assert len(sim.done) == len(reqs) and sim.max_running_gap <= sched.age_limit


@FAST
@given(
    st.integers(1, 40),
    st.integers(1, 12),
    st.sampled_from(["auto", "gpu-only", "neo"]),
    st.sampled_from(sorted(COSTS)),
    st.integers(1, 5),
)
def test_equal_prompts_are_admitted_in_arrival_order(prompt, num_reqs, policy, cost, num_gpu_seqs):
    bs, output = 4, 6
    per_seq = blocks_for(prompt + output, bs)
    reqs = [Req(1 + i // 3, prompt, output) for i in range(num_reqs)]
    sim = Sim(
        Scheduler(COSTS[cost], 4),
        num_gpu_seqs * per_seq,
        2 * per_seq,
        bs,
        Limits(4, 64 + prompt, policy),
        reqs,
    )
    sim.run(step_bound(reqs, 4))
    assert sim.admissions == sorted(sim.admissions)


def test_gpu_memory_pressure_offloads_under_neo_and_recomputes_under_gpu_only():
    reqs = [Req(1, 30, 20) for _ in range(8)]
    for policy in ("neo", "gpu-only"):
        sim = Sim(Scheduler(COSTS["cheap-cpu"], 4), 20, 200, 4, Limits(16, 512, policy), reqs)
        sim.run(2000)
        swapped = sum(len(p.swap_out) + len(p.prefill_cpu) for p in sim.plans)
        preempted = sum(len(p.preempt) for p in sim.plans)
        if policy == "neo":
            assert swapped > 0 and preempted == 0
        else:
            assert swapped == 0 and not sim.cpu_used_ever


def test_pipelining_happens_when_the_cpu_can_hide_behind_the_projections():
    # 2 GPU requests fill the GPU; 18 decode on a CPU fast enough to hide behind projections.
    reqs = [Req(1, 100, 40) for _ in range(20)]
    sim = Sim(
        Scheduler(ScriptedCost(lin=1e-3, cpu_per_token=1e-6), 4),
        2 * 36,
        20000,
        4,
        Limits(32, 4096, "neo"),
        reqs,
    )
    sim.run(5000)
    assert sum(p.pipelined for p in sim.plans) > 10


@pytest.mark.parametrize("policy", ["auto", "neo"])
def test_offloading_that_pays_is_chosen_not_a_way_home(policy):
    """Where the CPU hides behind the projections, auto's CPU decodes are chosen offloading (the
    guard judges them); neo never sends the CPU's requests home."""
    reqs = [Req(1, 100, 40) for _ in range(20)]
    sched = Scheduler(ScriptedCost(lin=1e-3, cpu_per_token=1e-6), 4)
    sim = Sim(sched, 2 * 36, 20000, 4, Limits(32, 4096, policy), reqs)
    sim.run(5000)
    offloaded = [p for p in sim.plans if p.decode_cpu_b0 or p.decode_cpu_b1]
    assert len(offloaded) > 10
    if policy == "neo":
        assert not any(p.sends_home for p in sim.plans)
    assert sum(not p.sends_home for p in offloaded) > 0.9 * len(offloaded)


@pytest.mark.parametrize("policy", ["auto", "neo"])
def test_lone_long_cpu_request_finishes(policy):
    """The reference hung: a lone CPU request longer than the swap-in threshold never ran."""
    bs, num_gpu = 4, 5  # 95% of 5 blocks = 4 blocks = 16 tokens
    sched = Scheduler(COSTS["slow-cpu"], 4)
    sim = Sim(sched, num_gpu, 100, bs, Limits(4, 128, policy), [])
    sim.seqs[0] = SimSeq(0, 30, 60, 31, computed=30, residence=Residence.CPU, last_progress=0)
    sim.run(200)
    assert 0 in sim.done and not sim.done[0].unservable
    assert all(p.decode_cpu_b0 == [0] and not p.pipelined for p in sim.plans)


def test_prompt_that_never_fits_does_not_block_the_queue():
    """Head-of-line livelock in the reference: a prompt over the token budget blocked all."""
    sched = Scheduler(ZeroCostModel(), 4)
    waiting = [
        SeqView(0, 0, 500, 0, 510, Residence.WAITING, 0),
        SeqView(1, 1, 10, 0, 20, Residence.WAITING, 0),
        SeqView(2, 2, 2000, 0, 2010, Residence.WAITING, 0),
    ]
    cache = CacheView(16, 100, 100, 0, 0)
    plan = sched.schedule(waiting, [], cache, Limits(8, 256, "gpu-only"), 1)
    assert plan.unservable == {
        2: "2000 tokens to prefill need 125 KV blocks, more than the largest pool the policy may "
        "use (100 blocks)",
    }
    # The GPU pool holds 500 tokens: that prompt starts in chunks, and takes the whole budget.
    assert plan.prefill_gpu == [0] and plan.chunked == {0: 256}
    started = dataclasses.replace(waiting[0], num_computed_tokens=256, residence=Residence.GPU,
                                  num_prefill_left=244)  # fmt: skip
    plan = sched.schedule(waiting[1:], [started], CacheView(16, 100, 84, 0, 0),
                          Limits(8, 256, "gpu-only"), 2)  # fmt: skip
    assert plan.prefill_gpu == [0, 1] and plan.chunked == {}  # its last chunk, then the next
    # With the budget raised, the pool binds: 2000 tokens need 125 blocks, the GPU has 100.
    plan = sched.schedule(waiting, [], cache, Limits(8, 4096, "gpu-only"), 1)
    assert plan.unservable == {
        2: "2000 tokens to prefill need 125 KV blocks, more than the largest pool the policy may "
        "use (100 blocks)"
    }


def test_prompt_that_does_not_fit_now_is_skipped_then_gets_its_turn():
    # The GPU holds 40 tokens; a running request grows to 24 of them. The 20-token head cannot fit,
    # the 4-token requests behind it can; after wait_age_limit steps the head stops being overtaken
    # and gets in.
    reqs = [Req(1, 16, 8), Req(2, 20, 2)] + [Req(2 + i, 4, 2) for i in range(40)]
    sched = Scheduler(ZeroCostModel(), 4, wait_age_limit=6)
    sim = Sim(sched, 10, 0, 4, Limits(8, 64, "gpu-only"), reqs)
    sim.run(2000)
    order = sim.admissions
    assert order.index(2) < order.index(1)  # a smaller, younger prompt went first...
    assert sim.done[1].first_admitted <= 2 + 6 + 8  # ...but the head was not starved


def test_cpu_requests_progress_even_when_the_cpu_never_pays():
    """CPU starvation in the reference: a CPU request failing the balance check never ran."""
    # The CPU request outgrows the GPU (30 blocks): only the CPU, which never pays here, can run it.
    sched = Scheduler(COSTS["slow-cpu"], 4, age_limit=5)
    sim = Sim(sched, 30, 200, 4, Limits(16, 512, "auto"), [Req(1, 8, 16) for _ in range(4)])
    sim.seqs[99] = SimSeq(99, 120, 160, 121, computed=120, residence=Residence.CPU, last_progress=0)
    sim.run(2000)
    assert 99 in sim.done
    assert sim.max_running_gap <= 5
    cpu_steps = [i for i, p in enumerate(sim.plans) if 99 in p.decode_cpu_b0]
    assert len(cpu_steps) >= 3 and all(
        b - a <= 5 for a, b in zip(cpu_steps, cpu_steps[1:], strict=False)
    )


def test_running_request_outgrowing_every_pool_is_reported_not_hung():
    sched = Scheduler(ZeroCostModel(), 4)
    running = [
        SeqView(0, 0, 10, 16, 40, Residence.GPU, 0)
    ]  # needs a 5th block, the GPU has 4, no CPU pool
    plan = sched.schedule([], running, CacheView(4, 4, 0, 0, 0), Limits(4, 64, "gpu-only"), 1)
    assert list(plan.unservable) == [0] and not plan.decode_gpu


@FAST
@given(workloads(policies=("auto",), crowded=True), st.integers(1, 12))
def test_pausing_offloading_on_and_off_keeps_every_request(case, period):
    """The engine's guard pauses `auto`'s offloading for stretches: every plan stays valid, every
    request finishes, and while paused nothing the GPU pool can hold goes to the CPU, and what
    the CPU holds comes home (swapped in or recomputed) unless recomputing it is impossible or
    costs more than waiting on the CPU for GPU room."""
    num_gpu, num_cpu, bs, limits, reqs, cost = case
    sched = Scheduler(cost, num_layers=4)
    sim = Sim(sched, num_gpu, num_cpu, bs, limits, reqs)
    bound = step_bound(reqs, sched.age_limit)
    paused_steps = 0
    while sim.seqs or sim.pending:
        assert sim.step < bound, f"not finished: {list(sim.seqs.values())[:4]}"
        paused = (sim.step // period) % 2 == 1
        sim.limits = dataclasses.replace(limits, offload_paused=paused)
        plan = sim.run_step()
        if not paused:
            continue
        paused_steps += 1
        waiting, running = sim.views[-1]
        prompts_fit = {w.seq_id for w in waiting if blocks_for(w.num_prompt_tokens, bs) <= num_gpu}
        assert not prompts_fit & {*plan.prefill_cpu}
        assert not plan.swap_out  # every running request fits this GPU pool
        left = {*plan.swap_in, *plan.preempt, *plan.unservable}
        for v in running:
            if v.residence != Residence.CPU or v.seq_id in left:
                continue
            # It stays only where it cannot be recomputed, or a prefill costs more than the least
            # that waiting on the CPU for GPU room adds: one decode there, forced by its age.
            n = v.decode_ctx_tokens
            prefill_s = cost.linear_s(n) + cost.prefill_attn_s([n])
            stay_s = cost.cpu_decode_attn_s(1, n) + cost.transfer_s(1)
            assert n > limits.max_tokens_in_batch or prefill_s >= stay_s
    assert len(sim.done) == len(reqs) and not any(s.unservable for s in sim.done.values())


def test_a_paused_pass_keeps_what_only_the_cpu_can_hold():
    """While the guard pauses offloading, a request larger than the GPU pool stays on the CPU and
    decodes there once aged, and a prompt larger than the GPU pool is still admitted to the CPU:
    neither is dropped nor left waiting for the pause to end."""
    sched = Scheduler(COSTS["slow-cpu"], 4)
    big = SeqView(1, 0, 120, 120, 160, Residence.CPU, 0)  # 30 blocks of 4, the GPU has 20
    prompt = SeqView(2, 1, 100, 0, 110, Residence.WAITING, 0)
    cache = CacheView(4, 20, 20, 400, 370)
    limits = Limits(16, 512, "auto", offload_paused=True)
    plan = sched.schedule([prompt], [big], cache, limits, 10)
    assert check_plan(plan, [prompt], [big], cache, limits) == []
    assert not plan.unservable and not plan.preempt and not plan.swap_in
    assert plan.decode_cpu_b0 + plan.decode_cpu_b1 == [1]
    assert plan.prefill_cpu == [2]
    with pytest.raises(ValueError, match="only policy auto pauses offloading"):
        Limits(16, 512, "neo", offload_paused=True)


def test_auto_sends_cpu_requests_home_when_the_cpu_does_not_pay():
    """A slow CPU: requests left on it (an earlier verdict, a profile since corrected) come home,
    by swap-in where the GPU has room and by recompute where it has not, instead of being forced
    onto the CPU every few steps."""
    sched = Scheduler(COSTS["slow-cpu"], 4)
    gpu_seqs = [SeqView(i, i, 40, 40, 48, Residence.GPU, 9) for i in range(2)]
    # Aged: the fairness rule would force them onto the CPU this step.
    cpu_seqs = [SeqView(10 + i, 10 + i, 40, 40, 48, Residence.CPU, 0) for i in range(3)]
    running = gpu_seqs + cpu_seqs
    # 40 GPU blocks of 4 tokens: 20 held, 2 for the GPU decodes' growth; under the swap-in
    # threshold (38) there is room for one CPU request (11 blocks with its growth).
    cache = CacheView(4, 40, 20, 400, 370)
    auto = Limits(16, 512, "auto")
    plan = sched.schedule([], running, cache, auto, 10)
    assert check_plan(plan, [], running, cache, auto) == []
    assert plan.swap_in == [10] and sorted(plan.preempt) == [11, 12]
    assert not plan.decode_cpu_b0 and not plan.decode_cpu_b1
    assert 10 in plan.decode_gpu
    assert plan.sends_home  # what the engine's guard is told: no offloading was chosen
    # Under neo the one with GPU room comes home too; the others stay and, aged, decode on the CPU.
    neo = sched.schedule([], running, cache, Limits(16, 512, "neo"), 10)
    assert neo.swap_in == [10] and not neo.preempt
    assert sorted(neo.decode_cpu_b0 + neo.decode_cpu_b1) == [11, 12]
    assert not neo.sends_home


def _two_cpu_requests_no_gpu_room(gpu_left: int, paused: bool = True) -> Plan:
    """Three GPU decodes with `gpu_left` tokens to go, no GPU room, and two CPU requests the split
    does not take (pipelining, two weight passes, cannot pay for them): 8 and 2 tokens to go.
    paused: the engine's guard measured offloading lose."""
    sched = Scheduler(COSTS["balanced"], 4)
    gpu_seqs = [SeqView(i, i, 40, 40, 40 + gpu_left, Residence.GPU, 9) for i in range(3)]
    cpu_seqs = [SeqView(10, 10, 40, 40, 48, Residence.CPU, 0),
                SeqView(11, 11, 40, 40, 42, Residence.CPU, 0)]  # fmt: skip
    running = gpu_seqs + cpu_seqs
    cache = CacheView(4, 36, 6, 400, 380)  # 36 GPU blocks: 30 held, 3 for growth, no room
    auto = Limits(16, 512, "auto", offload_paused=paused)
    plan = sched.schedule([], running, cache, auto, 10)
    assert check_plan(plan, [], running, cache, auto) == []
    assert not plan.swap_in
    return plan


def test_auto_leaves_on_the_cpu_what_costs_less_to_finish_there_than_to_recompute():
    """Offloading paused, the GPU frees room only in 48 steps: the request with 8 tokens to go is
    recomputed (a prefill, ~1 ms per layer, against 8 x 0.44 ms on the CPU meanwhile), the one
    with 2 to go stays on the CPU (and, aged, decodes there)."""
    plan = _two_cpu_requests_no_gpu_room(48)
    assert plan.preempt == [10]
    assert plan.decode_cpu_b0 + plan.decode_cpu_b1 == [11]  # aged: forced, on the CPU
    assert plan.sends_home  # so the guard does not judge offloading by this decode


def test_auto_keeps_on_the_cpu_what_finds_gpu_room_soon_rather_than_recompute_it():
    """The same requests, but the GPU decodes finish in 2 steps: waiting costs one aged decode on
    the CPU (0.44 ms per layer) and a swap-in, less than a prefill; nothing is thrown away."""
    plan = _two_cpu_requests_no_gpu_room(2)
    assert not plan.preempt
    assert sorted(plan.decode_cpu_b0 + plan.decode_cpu_b1) == [10, 11]


def test_auto_throws_no_cpu_work_away_on_a_prediction_alone():
    """Not paused, offloading is only predicted not to pay, which near break-even flips from one
    iteration to the next: a request whose decode on the CPU costs less than its prefill stays
    there, however long the GPU stays full (the slow CPU above is recomputed at once)."""
    plan = _two_cpu_requests_no_gpu_room(48, paused=False)
    assert not plan.preempt
    assert sorted(plan.decode_cpu_b0 + plan.decode_cpu_b1) == [10, 11]
    assert plan.sends_home  # aged decodes, not chosen: the guard leaves them out
