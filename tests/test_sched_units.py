"""Scheduler decisions one iteration at a time: the iteration-time formulas, the mode and split
choice, the auto policy's offloading decision, hysteresis, budgets, policy switches, and the plan
checker itself."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from neod.sched import (
    BatchLoad,
    CacheView,
    Limits,
    Plan,
    Residence,
    Scheduler,
    SeqView,
    ZeroCostModel,
    check_plan,
    pipelined_s,
    sequential_s,
)
from neod.sched.cost import pipelined_layer_s, rate_beats
from neod.sched.split import CpuCandidate, SplitRule, split_cpu_decodes


class FlatCost:
    """Hand-checkable costs: a constant per stage, per sequence for CPU attention and transfers."""

    def __init__(
        self,
        lin=1.0,
        gpu_attn=0.5,
        cpu_per_seq=0.3,
        transfer_per_seq=0.1,
        swap_per_block=0.05,
        overhead=0.2,
    ):
        self.lin, self.gpu_attn, self.cpu_per_seq = lin, gpu_attn, cpu_per_seq
        self.transfer_per_seq, self.swap_per_block, self.overhead = (
            transfer_per_seq,
            swap_per_block,
            overhead,
        )

    def linear_s(self, num_tokens):
        return self.lin if num_tokens else 0.0

    def prefill_attn_s(self, prompt_lens):
        return 0.1 * len(prompt_lens)

    def gpu_decode_attn_s(self, num_seqs, num_ctx_tokens):
        return self.gpu_attn if num_seqs else 0.0

    def cpu_decode_attn_s(self, num_seqs, num_ctx_tokens):
        return self.cpu_per_seq * num_seqs

    def transfer_s(self, num_cpu_seqs):
        return self.transfer_per_seq * num_cpu_seqs

    def swap_s(self, num_blocks):
        return self.swap_per_block * num_blocks

    def iteration_overhead_s(self, num_seqs):
        return self.overhead if num_seqs else 0.0

    def pipeline_handoff_s(self):
        return 0.0


def gpu(sid, computed, last=0):
    return SeqView(sid, sid, computed, computed, computed + 1000, Residence.GPU, last)


def cpu(sid, computed, last=0):
    return SeqView(sid, sid, computed, computed, computed + 1000, Residence.CPU, last)


def wait(sid, prompt, last=0):
    return SeqView(sid, sid, prompt, 0, prompt + 1000, Residence.WAITING, last)


def test_sequential_formula():
    b = BatchLoad().plus_gpu_decodes(2, 100).plus_cpu_decodes(3, 300)
    # layer = lin + max(gpu attn 0.5, cpu 0.9 + transfer 0.3) = 2.2; copy = 0.3 + 4 * 0.05 = 0.5
    assert sequential_s(FlatCost(), 2, b, 4) == pytest.approx(2 * 2.2 + 0.2)
    # The copy engines bound the layer when the swaps dominate.
    assert sequential_s(FlatCost(swap_per_block=1.0), 2, b, 4) == pytest.approx(2 * 4.3 + 0.2)


def test_pipelined_formula():
    b0 = BatchLoad().plus_gpu_decodes(2, 100).plus_cpu_decodes(1, 50)
    b1 = BatchLoad().plus_cpu_decodes(3, 300)
    # GPU 1.0 + 1.0 + 0.5 = 2.5; CPU (0.3 + 0.1) + (0.9 + 0.3) = 1.6; round trips 1.4 and 2.2
    assert pipelined_s(FlatCost(), 2, b0, b1, 0) == pytest.approx(2 * 2.5 + 0.2)
    # The CPU's own work sets the period: 6 + 6 decodes, 0.6 + 1.8 each side.
    many = BatchLoad().plus_cpu_decodes(6, 600)
    b0 = BatchLoad().plus_gpu_decodes(2, 100).plus_cpu_decodes(6, 600)
    assert pipelined_s(FlatCost(), 2, b0, many, 0) == pytest.approx(2 * 4.8 + 0.2)
    # A round trip sets it: b1's CPU attention (2.4) after its projections (1.0), b0 light.
    b0 = BatchLoad().plus_gpu_decodes(2, 100)
    assert pipelined_s(FlatCost(), 2, b0, many, 0) == pytest.approx(2 * 3.4 + 0.2)
    assert pipelined_s(FlatCost(), 2, BatchLoad(), BatchLoad(), 0) == 0.0


def test_the_hand_off_lengthens_the_gpus_work_and_the_round_trips_with_cpu_work_only():
    """Its latency sits on a sub-batch's way to the CPU and back, and in the GPU's stream between
    that sub-batch's stages: where the CPU's own work sets the period, it hides behind it."""
    # lin0, lin1, gpu_attn0, cpu0, cpu1, copy: GPU 3.0 bound; round trips 1.0 + 0.5 and 1.0 + 0.8
    # (b0 has CPU work too).
    gpu_bound = (1.0, 1.0, 1.0, 0.5, 0.8, 0.1)
    assert pipelined_layer_s(*gpu_bound, handoff=0.0) == 3.0
    assert pipelined_layer_s(*gpu_bound, handoff=0.1) == pytest.approx(3.2)  # two sub-batches'
    # Only b1 has CPU work: the GPU's stream waits once per layer.
    b1_only = (1.0, 1.0, 1.0, 0.0, 0.8, 0.1)
    assert pipelined_layer_s(*b1_only, handoff=0.1) == pytest.approx(3.1)
    # The CPU's own work (1.5 + 1.5) sets the period; the GPU's 1.5 + 2 hand-offs and the round
    # trips 0.5 + 1.5 + hand-off stay under it up to 0.75.
    cpu_bound = (0.5, 0.5, 0.5, 1.5, 1.5, 0.1)
    assert pipelined_layer_s(*cpu_bound, handoff=0.0) == 3.0
    assert pipelined_layer_s(*cpu_bound, handoff=0.7) == 3.0
    assert pipelined_layer_s(*cpu_bound, handoff=0.9) == pytest.approx(3.3)  # the GPU's 1.5 + 1.8
    # No CPU work at all: no hand-off.
    assert pipelined_layer_s(1.0, 1.0, 1.0, 0.0, 0.0, 0.1, handoff=5.0) == 3.0


def test_rate_comparison_handles_free_plans():
    assert rate_beats(2, 1.0, 1, 1.0) and not rate_beats(1, 1.0, 2, 1.0)
    assert rate_beats(1, 0.0, 5, 1.0) and not rate_beats(5, 1.0, 1, 0.0)
    assert rate_beats(3, 0.0, 2, 0.0) and not rate_beats(2, 0.0, 2, 0.0)
    assert not rate_beats(103, 1.0, 100, 1.0, margin=0.05) and rate_beats(
        106, 1.0, 100, 1.0, margin=0.05
    )


def cands(n, ctx=100, start=100):
    return [CpuCandidate(start + i, ctx) for i in range(n)]


def test_split_pipelines_when_cpu_work_hides_behind_projections():
    # Each CPU decode costs 0.25 per layer; 4 hide under one sub-batch's projections (1.0).
    cost = FlatCost(lin=1.0, gpu_attn=0.0, cpu_per_seq=0.2, transfer_per_seq=0.05, overhead=0.0)
    base = BatchLoad().plus_gpu_decodes(2, 200)
    split = split_cpu_decodes(cost, 1, base, (), cands(8), 8, 0)
    assert split.pipelined and len(split.b0_ids) + len(split.b1_ids) == 8
    assert split.iter_s == pytest.approx(2.0)  # both sub-batches' projections, CPU fully hidden
    # With one CPU request a second weight pass does not pay. Run sequentially it stretches the
    # GPU's iteration by 25% and raises tokens/s by 20% (3 in 1.25 against 2 in 1.0): it is taken
    # unless the operator asks for a larger gain or allows less stretch.
    one = split_cpu_decodes(cost, 1, base, (), cands(1), 1, 0)
    assert not one.pipelined and one.b0_ids == [100] and one.iter_s == pytest.approx(1.25)
    for strict in (SplitRule(min_gain=0.25), SplitRule(stretch=0.2)):
        waits = split_cpu_decodes(cost, 1, base, (), cands(1), 1, 0, strict)
        assert not waits.pipelined and waits.b0_ids == [] and waits.num_tokens_out == 2


class HandoffCost(FlatCost):
    def __init__(self, handoff, **costs):
        super().__init__(**costs)
        self.handoff = handoff

    def pipeline_handoff_s(self):
        return self.handoff


def test_split_still_pipelines_when_every_sub_batch_pays_a_hand_off():
    """The hand-off, like sub-batch 1's projections, is the price of the pipelined form, which the
    choice between the forms weighs: one CPU decode must not be refused for paying it alone, or
    the split never reaches the batches where pipelining pays."""
    cost = HandoffCost(0.1, lin=1.0, gpu_attn=0.0, cpu_per_seq=0.2, transfer_per_seq=0.05,
                       overhead=0.0)  # fmt: skip
    base = BatchLoad().plus_gpu_decodes(2, 200)
    split = split_cpu_decodes(cost, 1, base, (), cands(8), 8, 0)
    assert split.pipelined and len(split.b0_ids) + len(split.b1_ids) == 8
    # Both sub-batches' projections and hand-offs; the CPU's 2.0 and the round trips hide.
    assert split.iter_s == pytest.approx(2.2)
    # A hand-off larger than what pipelining gains: sequential, as the GPU alone.
    dear = split_cpu_decodes(HandoffCost(5.0, lin=1.0, gpu_attn=0.0, cpu_per_seq=0.2,
                                         transfer_per_seq=0.05, overhead=0.0),
                             1, base, (), cands(8), 8, 0)  # fmt: skip
    assert not dear.pipelined


def test_past_the_balance_point_the_minimum_gain_and_the_stretch_bound_decide():
    """8 CPU decodes hide under two weight passes and their hand-offs (2.2 per layer). The 9th and
    10th make the CPU set the pace (2.35, then 2.5) and raise tokens/s by 3.0% and 2.5%; the 11th
    would unbalance the sub-batches and lower it. The default rule takes all 10; a larger minimum
    gain or the old 10% stretch bound stops at 9, although the 10th still pays."""
    cost = HandoffCost(0.1, lin=1.0, gpu_attn=0.0, cpu_per_seq=0.2, transfer_per_seq=0.05,
                       overhead=0.0)  # fmt: skip
    base = BatchLoad().plus_gpu_decodes(2, 200)

    def taken(rule):
        split = split_cpu_decodes(cost, 1, base, (), cands(30), 30, 0, rule)
        assert split.pipelined
        return len(split.b0_ids) + len(split.b1_ids), split.iter_s

    assert taken(SplitRule()) == (10, pytest.approx(2.5))
    assert taken(SplitRule(min_gain=0.028)) == (9, pytest.approx(2.35))
    assert taken(SplitRule(stretch=0.1)) == (9, pytest.approx(2.35))
    assert taken(SplitRule(min_gain=0.5)) == (8, pytest.approx(2.2))  # NEO's balance rule
    out_of_range = ({"min_gain": -0.01}, {"min_gain": 1.5}, {"stretch": 101.0},
                    {"round_robin": 0}, {"round_robin": 65}, {"round_robin": 2.0})  # fmt: skip
    for knobs in out_of_range:
        with pytest.raises(ValueError, match="must be"):
            SplitRule(**knobs)


class FixedRunCost(FlatCost):
    """CPU attention with a fixed cost per run (one sub-batch through one layer), as the CPU
    program has when GPU-paced iterations release its steps one at a time."""

    def __init__(self, fixed, **costs):
        super().__init__(**costs)
        self.fixed = fixed

    def cpu_decode_attn_s(self, num_seqs, num_ctx_tokens):
        return self.fixed + self.cpu_per_seq * num_seqs if num_seqs else 0.0


def test_split_takes_a_cpu_batch_whose_fixed_cost_one_decode_cannot_pay():
    """A fixed CPU cost of a weight pass per run: one CPU decode lowers the rate (3 tokens in 2.1
    against 2 in 1.0), twenty raise it 2.75x (22 in 4.0). Judged one decode at a time the split
    refuses the first and never gets there; judged by prefixes of the staleness order, against
    the best shorter one, it reaches the batch that pays."""
    cost = FixedRunCost(1.0, lin=1.0, gpu_attn=0.0, cpu_per_seq=0.1, transfer_per_seq=0.0,
                        overhead=0.0)  # fmt: skip
    base = BatchLoad().plus_gpu_decodes(2, 200)
    split = split_cpu_decodes(cost, 1, base, (), cands(20), 20, 0)
    assert split.pipelined and len(split.b0_ids) == len(split.b1_ids) == 10
    assert sorted(split.b0_ids + split.b1_ids) == [c.seq_id for c in cands(20)]
    assert split.iter_s == pytest.approx(4.0) and split.num_tokens_out == 22
    # The stalest come first: a slot limit of 12 takes the first 12.
    capped = split_cpu_decodes(cost, 1, base, (), cands(20), 12, 0)
    assert sorted(capped.b0_ids + capped.b1_ids) == [c.seq_id for c in cands(12)]
    # One alone does not pay; nor does a batch whose every decode buys less than the minimum gain.
    assert split_cpu_decodes(cost, 1, base, (), cands(1), 1, 0).num_tokens_out == 2
    strict = split_cpu_decodes(cost, 1, base, (), cands(20), 20, 0, SplitRule(min_gain=0.2))
    assert strict.num_tokens_out == 2


class ContextCost(FlatCost):
    def cpu_decode_attn_s(self, num_seqs, num_ctx_tokens):
        return self.cpu_per_seq * num_ctx_tokens


def test_split_skips_a_long_decode_that_prefixes_would_have_to_carry():
    """CPU attention at 0.003 a token hides three decodes of 100 tokens under the GPU's attention
    (1.0), not one of 1000 (3.0 more). One decode at a time skips the long one and takes the three
    short ones; the prefixes stop at the long one, past the stretch bound, with one short one."""
    cost = ContextCost(lin=1.0, gpu_attn=1.0, cpu_per_seq=0.003, transfer_per_seq=0.0,
                       overhead=0.0)  # fmt: skip
    base = BatchLoad().plus_gpu_decodes(2, 200)
    mixed = [CpuCandidate(100, 100), CpuCandidate(101, 1000), *cands(2, start=102)]
    split = split_cpu_decodes(cost, 1, base, (), mixed, 4, 0)
    assert not split.pipelined and split.b0_ids == [100, 102, 103]
    assert split.iter_s == pytest.approx(2.0)


def test_split_leaves_out_cpu_work_that_lowers_the_rate_but_keeps_forced():
    cost = FlatCost(lin=1.0, gpu_attn=0.0, cpu_per_seq=5.0, overhead=0.0)
    base = BatchLoad().plus_gpu_decodes(4, 400)
    split = split_cpu_decodes(cost, 1, base, (), cands(3), 3, 0)
    assert not split.pipelined and not split.b0_ids and split.num_tokens_out == 4
    forced = split_cpu_decodes(cost, 1, base, cands(1, start=7), cands(3), 3, 0)
    assert forced.b0_ids + forced.b1_ids == [7] and forced.num_tokens_out == 5


def test_split_respects_the_slot_limit():
    cost = FlatCost(lin=1.0, gpu_attn=0.0, cpu_per_seq=0.0, transfer_per_seq=0.0, overhead=0.0)
    split = split_cpu_decodes(cost, 1, BatchLoad().plus_gpu_decodes(1, 10), (), cands(10), 4, 0)
    assert len(split.b0_ids) + len(split.b1_ids) == 4 and split.num_tokens_out == 5


def test_pcie_cost_decides_against_offloading():
    # Two GPU requests fill the GPU (no growth this step); eight CPU requests, none aged.
    running = [gpu(0, 60), gpu(1, 60)] + [cpu(i, 60) for i in range(2, 10)]
    state = {
        "waiting": [],
        "running": running,
        "cache": CacheView(16, 10, 2, 100, 68),
        "limits": Limits(16, 256, "neo"),
        "step": 1,
    }
    cheap = Scheduler(FlatCost(lin=1.0, gpu_attn=0.0, cpu_per_seq=0.2, transfer_per_seq=0.01), 1)
    plan = cheap.schedule(**state)
    assert plan.pipelined and len(plan.decode_cpu_b0) + len(plan.decode_cpu_b1) == 8
    assert plan.predicted_iter_s == pytest.approx(2.2)
    dear = Scheduler(FlatCost(lin=1.0, gpu_attn=0.0, cpu_per_seq=0.2, transfer_per_seq=3.0), 1)
    plan = dear.schedule(**state)
    assert (
        not plan.pipelined and not plan.decode_cpu_b0
    )  # all four are idle this step (not aged yet)


@pytest.mark.parametrize("cpu_per_seq, offloads", [(0.01, True), (50.0, False)])
def test_auto_offloads_only_when_the_predictor_says_it_pays(cpu_per_seq, offloads):
    # The GPU is full (10 blocks of 16) with two requests about to need a new block each.
    running = [gpu(0, 80), gpu(1, 80)]
    cache = CacheView(16, 10, 0, 100, 100)
    sched = Scheduler(
        FlatCost(lin=1.0, gpu_attn=0.0, cpu_per_seq=cpu_per_seq, transfer_per_seq=0.0), 4
    )
    plan = sched.schedule([wait(2, 40), wait(3, 40)], running, cache, Limits(16, 512, "auto"), 1)
    assert (
        check_plan(plan, [wait(2, 40), wait(3, 40)], running, cache, Limits(16, 512, "auto")) == []
    )
    if offloads:
        assert plan.swap_out == [1] and plan.prefill_cpu and not plan.preempt
    else:
        assert plan.preempt == [1] and not plan.swap_out and not plan.prefill_cpu
    assert plan.decode_gpu == [0]


class GrowingCost(FlatCost):
    """FlatCost whose projections grow with the rows: a prefill lengthens the GPU's work."""

    def __init__(self, per_token, **kwargs):
        super().__init__(**kwargs)
        self.per_token = per_token

    def linear_s(self, num_tokens):
        return self.lin + self.per_token * num_tokens if num_tokens else 0.0


@pytest.mark.parametrize(
    "per_token, cpu_per_seq, num_waiting, admitted",
    [
        (0.0, 0.5, 10, 3),  # prefills cost the GPU nothing: what a decode iteration hides
        (0.01, 0.5, 10, 10),  # 1000 prompt tokens make the GPU's layer 11x longer: all of them
        # A decode iteration keeps up with 4 CPU decodes (the GPU decode that leaves, 3 prompts):
        # the CPU holds at most 3 requests per decode, the one that leaves and 11 prompts.
        (0.01, 0.5, 20, 11),
        (0.01, 5.0, 10, 0),  # offloading does not pay when decoding: no prefill makes it pay
    ],
)
def test_the_cpu_takes_the_prompts_it_keeps_up_with_while_the_gpu_prefills_them(
    per_token, cpu_per_seq, num_waiting, admitted
):
    """The GPU is full; prompts of 100 tokens wait. A decode iteration hides three of them as CPU
    decodes; the iteration that prefills the queue hides more, and those go to the CPU at once
    instead of waiting for the running requests to finish."""
    cost = GrowingCost(
        per_token, lin=1.0, gpu_attn=0.0, cpu_per_seq=cpu_per_seq, transfer_per_seq=0.0,
        overhead=0.0,
    )  # fmt: skip
    running = [gpu(0, 80), gpu(1, 80)]
    cache = CacheView(16, 10, 0, 1000, 1000)
    waiting = [wait(i, 100) for i in range(2, 2 + num_waiting)]
    limits = Limits(64, 4096, "neo")
    plan = Scheduler(cost, 1).schedule(waiting, running, cache, limits, 1)
    assert check_plan(plan, waiting, running, cache, limits) == []
    assert plan.swap_out == [1]
    assert plan.prefill_cpu == list(range(2, 2 + admitted))
    # scheduler.cpu_round_robin = 1: no more than the CPU decodes every iteration.
    once = Scheduler(cost, 1, split_rule=SplitRule(round_robin=1)).schedule(
        waiting, running, cache, limits, 1
    )
    assert once.prefill_cpu == list(range(2, 2 + min(admitted, 3)))


def test_where_offloading_only_just_pays_the_cpu_takes_no_more_than_a_decode_iteration_hides():
    """20 GPU decodes fill the GPU; one CPU decode hides under their attention (0.3 of 0.5 per
    layer): 21 tokens against 20, under the 10% that takes prompts while the GPU prefills."""
    cost = GrowingCost(
        0.01, lin=1.0, gpu_attn=0.5, cpu_per_seq=0.3, transfer_per_seq=0.0, overhead=0.0
    )
    running = [gpu(i, 70) for i in range(20)]
    cache = CacheView(16, 100, 0, 1000, 1000)
    waiting = [wait(i, 100) for i in range(20, 30)]
    limits = Limits(64, 4096, "neo")
    plan = Scheduler(cost, 1).schedule(waiting, running, cache, limits, 1)
    assert check_plan(plan, waiting, running, cache, limits) == []
    assert plan.prefill_cpu == [20]


def test_gpu_only_preempts_newest_and_never_touches_the_cpu():
    running = [gpu(0, 80), gpu(1, 80)]
    cache = CacheView(16, 10, 0, 100, 100)
    plan = Scheduler(ZeroCostModel(), 4).schedule(
        [wait(2, 40)], running, cache, Limits(16, 512, "gpu-only"), 1
    )
    assert plan.preempt == [1] and plan.decode_gpu == [0]
    assert not (plan.swap_out or plan.prefill_cpu or plan.decode_cpu_b0 or plan.decode_cpu_b1)


def test_swap_in_waits_for_the_lower_threshold():
    sched = Scheduler(ZeroCostModel(), 4, swap_in_frac=0.9)
    # 100 GPU blocks, 85 in use, the CPU request needs 6: 91% > 90%, it stays; with 84 in use it
    # comes in (90%).
    stays = sched.schedule(
        [],
        [gpu(0, 85 * 16 - 1), cpu(1, 80)],
        CacheView(16, 100, 15, 100, 94),
        Limits(16, 4096, "neo"),
        1,
    )
    assert not stays.swap_in and stays.decode_cpu_b0 == [1]
    comes = sched.schedule(
        [],
        [gpu(0, 84 * 16 - 1), cpu(1, 80)],
        CacheView(16, 100, 16, 100, 94),
        Limits(16, 4096, "neo"),
        1,
    )
    assert comes.swap_in == [1] and comes.decode_gpu == [0, 1]


def test_budget_is_filled_exactly():
    waiting = [wait(i, 10) for i in range(5)]
    cache = CacheView(16, 100, 100, 0, 0)
    sched = Scheduler(ZeroCostModel(), 4)
    assert sched.schedule(waiting, [], cache, Limits(3, 4096, "gpu-only"), 1).prefill_gpu == [
        0,
        1,
        2,
    ]
    assert sched.schedule(waiting, [], cache, Limits(16, 30, "gpu-only"), 1).prefill_gpu == [
        0,
        1,
        2,
    ]
    assert sched.schedule(waiting, [], cache, Limits(16, 29, "gpu-only"), 1).prefill_gpu == [0, 1]


def test_aged_cpu_requests_take_slots_before_gpu_decodes():
    running = [gpu(0, 10, last=9), gpu(1, 10, last=9), cpu(2, 10, last=2)]
    plan = Scheduler(FlatCost(cpu_per_seq=100.0), 4, age_limit=4).schedule(
        [], running, CacheView(16, 10, 1, 10, 9), Limits(2, 64, "neo"), 10
    )
    assert plan.decode_cpu_b0 == [2] and plan.decode_gpu == [0]


def test_switch_to_gpu_only_brings_cpu_requests_home_or_preempts_them():
    # 10 GPU blocks, 1 in use: seq 1 (2 blocks) fits, seq 2 (7) no longer does, seq 3 (19) never.
    running = [gpu(0, 16), cpu(1, 30), cpu(2, 100), cpu(3, 300)]
    cache = CacheView(16, 10, 9, 100, 72)
    plan = Scheduler(ZeroCostModel(), 4).schedule(
        [], running, cache, Limits(16, 4096, "gpu-only"), 5
    )
    assert plan.swap_in == [1] and plan.preempt == [2] and list(plan.unservable) == [3]
    assert plan.decode_gpu == [0, 1]
    assert check_plan(plan, [], running, cache, Limits(16, 4096, "gpu-only")) == []


def test_swap_out_frees_blocks_for_older_decodes_in_the_same_iteration():
    running = [gpu(0, 32), gpu(1, 32), gpu(2, 32)]  # all three need a third block; none is free
    cache = CacheView(16, 6, 0, 20, 20)
    plan = Scheduler(ZeroCostModel(), 4).schedule([], running, cache, Limits(16, 512, "neo"), 1)
    assert plan.swap_out == [2] and plan.decode_gpu == [0, 1] and plan.decode_cpu_b0 == [2]
    assert check_plan(plan, [], running, cache, Limits(16, 512, "neo")) == []


def test_check_plan_reports_violations():
    running = [gpu(0, 16), cpu(1, 16)]
    waiting = [wait(2, 40)]
    cache = CacheView(16, 4, 1, 4, 1)
    limits = Limits(2, 64, "neo")
    assert (
        check_plan(Plan(decode_gpu=[0], decode_cpu_b0=[1]), waiting, running, cache, limits) == []
    )
    assert any(
        "short" in e for e in check_plan(Plan(prefill_gpu=[2]), waiting, running, cache, limits)
    )
    assert any(
        "max_batch_size" in e
        for e in check_plan(
            Plan(decode_gpu=[0], decode_cpu_b0=[1], prefill_cpu=[2]),
            waiting,
            running,
            cache,
            Limits(2, 640, "neo"),
        )
    )
    assert any(
        "elsewhere" in e for e in check_plan(Plan(decode_gpu=[1]), waiting, running, cache, limits)
    )
    assert any(
        "twice" in e
        for e in check_plan(Plan(decode_gpu=[0], preempt=[0]), waiting, running, cache, limits)
    )
    assert any(
        "pipelined" in e
        for e in check_plan(Plan(decode_cpu_b1=[1]), waiting, running, cache, limits)
    )
    assert any(
        "gpu-only" in e
        for e in check_plan(
            Plan(decode_cpu_b0=[1]), waiting, running, cache, Limits(2, 64, "gpu-only")
        )
    )
    assert any(
        "unknown" in e for e in check_plan(Plan(decode_gpu=[9]), waiting, running, cache, limits)
    )


def test_check_plan_keeps_a_chunked_prefill_with_its_kv():
    """A prompt part-way in on the CPU goes on there, in chunks or to its end; not on the GPU,
    not decoded, not swapped."""
    part_way = SeqView(5, 5, 100, 48, 110, Residence.CPU, 0, num_prefill_left=52)
    cache = CacheView(16, 4, 4, 16, 10)
    limits = Limits(4, 32, "neo")

    def errors(plan: Plan) -> list[str]:
        return check_plan(plan, [], [part_way], cache, limits)

    assert errors(Plan(prefill_cpu=[5], chunked={5: 32})) == []
    assert any("away from its KV" in e for e in errors(Plan(prefill_gpu=[5], chunked={5: 32})))
    assert any("part-way" in e for e in errors(Plan(decode_cpu_b0=[5])))
    assert any("part-way" in e for e in errors(Plan(swap_in=[5])))
    assert any("a chunk of 52 tokens of 52 left" in e
               for e in errors(Plan(prefill_cpu=[5], chunked={5: 52})))  # fmt: skip
    assert any("max_tokens_in_batch" in e for e in errors(Plan(prefill_cpu=[5])))  # all 52 left


class AffineCost(FlatCost):
    """Costs with a fixed part and a part per token, as measured tables have them."""

    def __init__(self, lin0, lin1, attn1, cpu0, cpu1, transfer, overhead, handoff):
        super().__init__(transfer_per_seq=transfer, overhead=overhead)
        self.lin0, self.lin1, self.attn1, self.cpu0, self.cpu1 = lin0, lin1, attn1, cpu0, cpu1
        self.handoff = handoff

    def linear_s(self, num_tokens):
        return self.lin0 + self.lin1 * num_tokens if num_tokens else 0.0

    def gpu_decode_attn_s(self, num_seqs, num_ctx_tokens):
        return self.attn1 * num_ctx_tokens if num_seqs else 0.0

    def cpu_decode_attn_s(self, num_seqs, num_ctx_tokens):
        return self.cpu0 + self.cpu1 * num_ctx_tokens if num_seqs else 0.0

    def pipeline_handoff_s(self):
        return self.handoff


@settings(max_examples=300, deadline=None)
@given(
    costs=st.tuples(*(st.floats(0.0, 2.0) for _ in range(8))),
    num_gpu=st.integers(0, 12),
    contexts=st.lists(st.integers(1, 4000), max_size=24),
    rule=st.builds(SplitRule, st.floats(0.0, 0.2), st.floats(0.0, 3.0)),
)
def test_offloading_never_lowers_the_predicted_rate_of_the_gpu_work(
    costs, num_gpu, contexts, rule
):
    """Each CPU decode is taken only where it hides under the GPU work or raises tokens/s, and the
    faster candidate wins: whatever the costs and the rule, the plan is at least as fast, in tokens
    per second, as the GPU work without any CPU decode."""
    cost = AffineCost(*(c * 1e-3 for c in costs[:2]), costs[2] * 1e-6, costs[3] * 1e-3,
                      costs[4] * 1e-6, *(c * 1e-3 for c in costs[5:]))  # fmt: skip
    base = BatchLoad().plus_gpu_decodes(num_gpu, 1100 * num_gpu)
    cands = [CpuCandidate(100 + i, n) for i, n in enumerate(contexts)]
    split = split_cpu_decodes(cost, 4, base, (), cands, len(cands), 0, rule)
    alone = sequential_s(cost, 4, base, 0)
    assert split.num_tokens_out == num_gpu + len(split.b0_ids) + len(split.b1_ids)
    assert not rate_beats(num_gpu, alone, split.num_tokens_out, split.iter_s, 1e-9)
