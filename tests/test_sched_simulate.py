"""A batch played through the scheduler on predicted costs (neod.sched.simulate): the counters,
the clock and the comparison between policies that the throughput benchmark prints."""

from __future__ import annotations

import pytest
from test_sched_measured import measured_profile
from test_sched_sim import COSTS

from neod.sched import (
    CacheView,
    CalibratedCostModel,
    Limits,
    Residence,
    Scheduler,
    SeqView,
    TableCostModel,
    sequential_s,
)
from neod.sched.cost import BatchLoad
from neod.sched.simulate import SimRequest, Simulation, batch_lengths, simulate_batch


def test_a_batch_the_gpu_holds_prefills_at_once_then_decodes_on_the_predicted_clock():
    cost = COSTS["balanced"]
    result = simulate_batch(cost, 4, 100, 0, 16, Limits(8, 512, "gpu-only"), [(10, 5)] * 4)
    assert result["iterations"] == 5  # the prefill samples the first token, then 4 decodes
    assert result["pipelined_share"] == 0.0 and result["unservable"] == 0
    prefill = sequential_s(cost, 4, BatchLoad(40, cost.prefill_attn_s([10] * 4), 4), 0)
    decodes = [
        sequential_s(cost, 4, BatchLoad().plus_gpu_decodes(4, 4 * (11 + i)), 0) for i in range(4)
    ]
    assert result["elapsed_s"] == pytest.approx(prefill + sum(decodes))
    assert result["output_tokens_per_s"] == pytest.approx(20 / result["elapsed_s"])
    assert result["ttft_p50_s"] == pytest.approx(prefill)
    # The engine's own time around each iteration, as measured, adds to every one of them.
    with_host = simulate_batch(cost, 4, 100, 0, 16, Limits(8, 512, "gpu-only"), [(10, 5)] * 4,
                               host_s=1e-3)  # fmt: skip
    assert with_host["elapsed_s"] == pytest.approx(result["elapsed_s"] + 5e-3)
    assert with_host["ttft_p50_s"] == pytest.approx(prefill + 1e-3)


def test_offloading_a_batch_the_gpu_cannot_hold_pays_where_the_cpu_is_cheap():
    """16 requests, a GPU pool for ~2 of them: the CPU takes the rest under neo and auto."""
    requests = [(30, 20)] * 16
    rates = {
        policy: simulate_batch(COSTS["cheap-cpu"], 4, 8, 400, 4, Limits(16, 512, policy),
                               requests)  # fmt: skip
        for policy in ("gpu-only", "auto", "neo")
    }
    base = rates["gpu-only"]["output_tokens_per_s"]
    assert rates["neo"]["output_tokens_per_s"] > 1.2 * base
    assert rates["auto"]["output_tokens_per_s"] > 1.2 * base
    assert rates["neo"]["ttft_p50_s"] < rates["gpu-only"]["ttft_p50_s"]
    # CPU attention this cheap hides under the GPU's in one batch: a second weight pass would
    # only cost time.
    assert rates["neo"]["pipelined_share"] == 0


def test_the_cpu_takes_the_queue_while_the_gpu_prefills_it():
    """Host K's 70B profile at the CPU cost its runs measured (docs/perf.md, 2 GiB of GPU KV, 32
    requests): every prompt is in before the first request finishes, instead of 15 of them
    waiting for the first ones to finish and then stalling the decodes a few prefills at a time
    (1.39x gpu-only before, 1.47x now)."""
    cost = CalibratedCostModel(TableCostModel(measured_profile("profile-h200-70b-host-k.json")),
                               0.86)  # fmt: skip
    lengths = batch_lengths(32, 1000, 200)
    sched = Scheduler(cost, 80, log_drops=False)
    sim = Simulation(sched, 409, 6553, 16, Limits(256, 8192, "neo"),
                     [SimRequest(1, p, o) for p, o in lengths], host_s=1.7e-3)  # fmt: skip
    while not sim.done:
        sim.run_step()
    assert len(sim.admissions) == 32
    sim.run(10_000)
    gpu_only = simulate_batch(cost, 80, 409, 6553, 16, Limits(256, 8192, "gpu-only"), lengths,
                              1.7e-3)  # fmt: skip
    assert sim.tokens_out / sim.elapsed_s > 1.45 * gpu_only["output_tokens_per_s"]


def test_a_plan_the_engine_could_not_apply_stops_the_simulation():
    class Overcommitting(Scheduler):
        def schedule(self, waiting, running, cache, limits, step):
            plan = super().schedule(waiting, running, cache, limits, step)
            plan.prefill_gpu += [s.seq_id for s in waiting if s.seq_id not in plan.prefill_gpu]
            return plan

    sim = Simulation(Overcommitting(COSTS["balanced"], 4), 2, 0, 4, Limits(8, 512, "gpu-only"),
                     [SimRequest(1, 8, 4)] * 3)  # fmt: skip
    with pytest.raises(RuntimeError, match="cannot apply"):
        sim.run(100)


def test_batch_lengths_spread_around_the_means_as_the_benchmark_sends_them():
    from neod.bench.throughput import make_workload

    lengths = batch_lengths(400, 1000, 200, seed=3)
    prompts, outputs = zip(*lengths, strict=True)
    assert 900 <= min(prompts) < 920 and 1080 < max(prompts) <= 1100
    assert 180 <= min(outputs) < 184 and 216 < max(outputs) <= 220
    assert lengths == batch_lengths(400, 1000, 200, seed=3) != batch_lengths(400, 1000, 200)
    assert batch_lengths(3, 1, 1) == [(1, 1)] * 3  # never below one token
    workload = make_workload(20, 100, 30, vocab_size=50, seed=3)
    assert [(len(p), o) for p, o in workload] == batch_lengths(20, 100, 30, seed=3)


def test_requests_no_pool_can_take_are_counted_not_logged(caplog):
    """A simulation reports what cannot be served in its result; only a serving scheduler warns."""
    cost, limits = COSTS["balanced"], Limits(8, 512, "gpu-only")
    with caplog.at_level("WARNING", logger="neod.sched.scheduler"):
        result = simulate_batch(cost, 4, 10, 0, 16, limits, [(10, 5), (1000, 5)])
    assert result["unservable"] == 1 and not caplog.records
    too_long = SeqView(1, 0, 1000, 0, 1005, Residence.WAITING, 0)
    with caplog.at_level("WARNING", logger="neod.sched.scheduler"):
        Scheduler(cost, 4).schedule([too_long], [], CacheView(16, 10, 10, 0, 0), limits, 1)
    assert "1 sequence(s) cannot be served" in caplog.text
