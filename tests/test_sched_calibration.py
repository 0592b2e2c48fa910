"""The CPU attention cost follows what the engine measures, within bounds, and moves the split."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from test_profile import make_profile
from test_sched_units import FlatCost, cpu, gpu

from neod.sched import (
    CacheView,
    CalibratedCostModel,
    Limits,
    Residence,
    Scheduler,
    SeqView,
    TableCostModel,
    corrections_path,
    load_corrections,
    profile_path,
    save_corrections,
)
from neod.sched.calibration import (
    CPU_FIXED_MAX_S,
    HANDOFF_FADE,
    HANDOFF_MAX_S,
    HANDOFF_STEP_FLOOR_S,
    SCALE_BOUNDS,
)


def test_every_cost_but_the_cpu_attention_is_the_profiles():
    base = FlatCost(cpu_per_seq=0.3)
    model = CalibratedCostModel(base, cpu_fixed_s=0.05)
    model.cpu_scale = 2.0
    assert model.linear_s(8) == base.linear_s(8)
    assert model.prefill_attn_s([10, 20]) == base.prefill_attn_s([10, 20])
    assert model.gpu_decode_attn_s(3, 300) == base.gpu_decode_attn_s(3, 300)
    assert model.transfer_s(3) == base.transfer_s(3)
    assert model.swap_s(5) == base.swap_s(5)
    assert model.iteration_overhead_s(4) == base.iteration_overhead_s(4)
    assert model.pipeline_handoff_s() == base.pipeline_handoff_s() == 0.0
    assert model.cpu_decode_attn_s(3, 300) == pytest.approx(2.0 * 0.9 + 0.05)
    assert model.cpu_decode_attn_s(0, 0) == 0.0  # no run, no fixed cost


def _iteration(model, truth_scale, truth_fixed, sizes, layers=4):
    """One CPU program over `layers` layers of sub-batches of `sizes` decodes, measured as the
    truth says a run costs."""
    batches = [(n, 100 * n) for n in sizes]
    runs = [truth_scale * model.base.cpu_decode_attn_s(n, t) + truth_fixed for n, t in batches]
    model.record_cpu(layers * sum(runs), batches, layers)


@pytest.mark.parametrize("truth", [0.7, 1.0, 1.4])
def test_the_scale_converges_to_measured_over_profiled(truth):
    model = CalibratedCostModel(FlatCost(cpu_per_seq=0.3))
    for _ in range(200):
        _iteration(model, truth, 0.0, [4])
    assert model.cpu_scale == pytest.approx(truth, rel=1e-3)
    assert model.cpu_fixed_s == 0.0  # one batch size cannot tell a fixed cost from the scale
    assert model.cpu_samples == 200


@pytest.mark.parametrize("truth_scale,truth_fixed", [(1.0, 20e-6), (0.8, 50e-6), (1.3, 0.0)])
def test_batches_of_several_sizes_tell_the_fixed_cost_from_the_scale(truth_scale, truth_fixed):
    """A run's fixed cost (each layer's CPU work paced by the GPU) weighs on a lone decode as
    much as the profile's whole time; one scale cannot fit both it and a full batch."""
    model = CalibratedCostModel(FlatCost(cpu_per_seq=30e-6))
    sizes = [[1], [2, 1], [8], [16, 8], [1, 1], [4]]
    for i in range(400):
        _iteration(model, truth_scale, truth_fixed, sizes[i % len(sizes)])
    assert model.cpu_scale == pytest.approx(truth_scale, rel=1e-2)
    assert model.cpu_fixed_s == pytest.approx(truth_fixed, rel=1e-2, abs=1e-7)
    # The fitted model predicts every size as measured: a lone decode and a batch of 16.
    for n in (1, 16):
        assert model.cpu_decode_attn_s(n, 100 * n) == pytest.approx(
            truth_scale * 30e-6 * n + truth_fixed, rel=1e-2
        )


def test_the_fixed_cost_stays_within_its_bound_and_never_negative():
    low = CalibratedCostModel(FlatCost(cpu_per_seq=1e-4))
    for i in range(400):  # a fixed saving per run: none is fitted, the scale takes it
        _iteration(low, 1.0, -2e-5, [[1], [8], [4, 2]][i % 3])
    assert low.cpu_fixed_s == 0.0
    high = CalibratedCostModel(FlatCost(cpu_per_seq=1e-4))
    for i in range(400):
        _iteration(high, 1.0, 5e-3, [[1], [8], [4, 2]][i % 3])
    assert high.cpu_fixed_s == CPU_FIXED_MAX_S


def test_one_outlier_moves_the_scale_a_little_and_never_past_the_bounds():
    model = CalibratedCostModel(FlatCost(cpu_per_seq=0.3))
    _iteration(model, 10.0, 0.0, [4])  # one iteration 10x slow: counted as 2x, a window of 20
    assert model.cpu_scale == pytest.approx((19 + 2) / 20)
    for _ in range(200):
        _iteration(model, 10.0, 0.0, [4])
    assert model.cpu_scale == SCALE_BOUNDS[1]
    for _ in range(400):
        _iteration(model, 0.01, 0.0, [4])
    assert model.cpu_scale == SCALE_BOUNDS[0]


def test_iterations_without_cpu_work_leave_it_alone():
    model = CalibratedCostModel(FlatCost())
    model.record_cpu(0.0, [(1, 100)], 4)
    model.record_cpu(1.0, [], 4)
    model.record_cpu(1.0, [(0, 0)], 4)  # nothing profiled to scale
    assert (model.cpu_scale, model.cpu_fixed_s, model.cpu_samples) == (1.0, 0.0, 0)


def plan_with(model):
    """Policy neo, a full GPU with two decodes, and eight idle CPU requests the split may take or
    leave."""
    running = [gpu(0, 100), gpu(1, 100)] + [cpu(10 + i, 100) for i in range(8)]
    cache = CacheView(16, 14, 0, 100, 44)
    return Scheduler(model, 4).schedule([], running, cache, Limits(16, 512, "neo"), 1)


def test_the_plan_carries_its_predicted_cpu_time_and_a_slower_cpu_takes_fewer_decodes():
    base = FlatCost(lin=1.0, gpu_attn=0.5, cpu_per_seq=0.3, transfer_per_seq=0.0)
    model = CalibratedCostModel(base)
    plan = plan_with(model)
    on_cpu = len(plan.decode_cpu_b0) + len(plan.decode_cpu_b1)
    assert on_cpu > 0
    sides = [n for n in (len(plan.decode_cpu_b0), len(plan.decode_cpu_b1)) if n]
    assert plan.predicted_cpu_s == pytest.approx(4 * sum(0.3 * n for n in sides))
    model.cpu_scale = 2.0
    slower = plan_with(model)
    assert len(slower.decode_cpu_b0) + len(slower.decode_cpu_b1) < on_cpu
    assert slower.predicted_cpu_s == pytest.approx(
        4 * sum(0.6 * n for n in (len(slower.decode_cpu_b0), len(slower.decode_cpu_b1)) if n)
    )


def test_a_plan_without_cpu_decodes_predicts_no_cpu_time():
    running = [SeqView(0, 0, 100, 100, 1100, Residence.GPU, 0)]
    plan = Scheduler(CalibratedCostModel(FlatCost()), 4).schedule(
        [], running, CacheView(16, 100, 90, 0, 0), Limits(16, 512, "gpu-only"), 1
    )
    assert plan.decode_gpu == [0] and plan.predicted_cpu_s == 0.0


def test_the_handoff_converges_to_the_pipelined_excess_per_layer():
    """Pipelined iterations of 32 layers running 0.25 ms per layer over their bound (the slow-CPU
    H100 host's 8B iterations) teach the model that excess, and the prediction then matches."""
    model = CalibratedCostModel(FlatCost())
    bound_s, layers = 0.0136, 32
    for _ in range(100):
        predicted = bound_s + layers * model.pipeline_handoff_s()
        model.record_iteration(True, bound_s + layers * 250e-6, predicted, layers)
    assert model.handoff_s == pytest.approx(250e-6, rel=1e-3)
    assert model.handoff_samples == 100


def test_iterations_the_cpu_paced_leave_the_handoff_alone():
    """An iteration whose CPU pool was busy 95% of it ran over because of the CPU's own work (the
    CPU correction's job); one where the pool idled 40% of it over-ran on the hand-off side."""
    model = CalibratedCostModel(FlatCost(), handoff_s=40e-6)
    model.record_iteration(True, 0.030, 0.024, 32, cpu_busy_s=0.0285)
    assert model.handoff_s == 40e-6 and model.handoff_samples == 0
    model.record_iteration(True, 0.0252, 0.024, 32, cpu_busy_s=0.018)
    assert model.handoff_s == pytest.approx(40e-6 + 0.1 * 0.0012 / 32)
    assert model.handoff_samples == 1


def test_a_lone_stall_moves_the_handoff_by_a_tenth_at_most_a_lasting_excess_all_the_way():
    """One pipelined iteration 100 ms over (an allocation, a neighbour's burst) counts as an excess
    of the hand-off itself, 40 us per layer; the EWMA alone would have added 0.1 x 3.1 ms = 312 us
    per layer and kept the scheduler off pipelining for hundreds of iterations. A lasting excess
    of 210 us per layer is still learned, a tenth more per iteration at first."""
    model = CalibratedCostModel(FlatCost(), handoff_s=40e-6)
    model.record_iteration(True, 0.120, 0.020, 32)
    assert model.handoff_s == pytest.approx(44e-6)
    for _ in range(60):
        predicted = 0.020 + 32 * model.pipeline_handoff_s()
        model.record_iteration(True, 0.020 + 32 * 250e-6, predicted, 32)
    assert model.handoff_s == pytest.approx(250e-6, rel=1e-2)
    # The floor lets a hand-off that starts at nothing grow too.
    zero = CalibratedCostModel(FlatCost())
    zero.record_iteration(True, 0.120, 0.020, 32)
    assert zero.handoff_s == pytest.approx(HANDOFF_STEP_FLOOR_S * 0.1)


def test_the_handoff_stays_within_its_bounds():
    model = CalibratedCostModel(FlatCost())
    model.record_iteration(True, 0.010, 0.020, 32)  # faster than the bound: the CPU scale's job
    assert model.handoff_s == 0.0 and model.handoff_samples == 1
    for _ in range(200):
        model.record_iteration(True, 1.0, 0.010, 32)
    assert model.handoff_s == HANDOFF_MAX_S
    model.record_iteration(True, 0.0, 0.010, 32)  # nothing measured
    model.record_iteration(True, 0.02, 0.010, 0)
    assert model.handoff_samples == 201


def test_the_handoff_fades_while_nothing_pipelines_so_pipelining_is_tried_again():
    model = CalibratedCostModel(FlatCost(), handoff_s=400e-6)
    for _ in range(1400):
        model.record_iteration(False, 0.02, 0.01, 32)  # a sequential iteration's error is not it
    assert model.handoff_s == pytest.approx(400e-6 * (1 - HANDOFF_FADE) ** 1400)
    assert 190e-6 < model.handoff_s < 210e-6  # about halved in 1400 iterations
    assert model.handoff_samples == 0


class ProfiledHandoff(FlatCost):
    def pipeline_handoff_s(self) -> float:
        return 80e-6  # as the profiler timed one pipelined iteration at start


def test_the_handoff_starts_from_the_profiles_and_returns_to_it():
    """The profile's timed hand-off is where the model starts; measurements move it either way
    (a host faster than at profiling time lowers it, never below 0), and while nothing
    pipelines it drifts back to the profile's."""
    model = CalibratedCostModel(ProfiledHandoff())
    assert model.pipeline_handoff_s() == model.profiled_handoff_s == 80e-6
    for _ in range(100):
        predicted = 0.0136 + 32 * model.pipeline_handoff_s()
        model.record_iteration(True, 0.0136 + 32 * 20e-6, predicted, 32)
    assert model.handoff_s == pytest.approx(20e-6, rel=1e-3)
    for _ in range(1400):
        model.record_iteration(False, 0.02, 0.01, 32)
    assert model.handoff_s == pytest.approx(80e-6 - 60e-6 * (1 - HANDOFF_FADE) ** 1400, rel=1e-3)
    assert model.handoff_samples == 100


def test_a_measured_handoff_turns_the_split_from_pipelined_to_sequential():
    base = FlatCost(lin=1.0, gpu_attn=0.5, cpu_per_seq=0.3, transfer_per_seq=0.0)
    model = CalibratedCostModel(base)
    plan = plan_with(model)
    assert plan.pipelined and plan.decode_cpu_b1
    # Pipelined: 2 + 8 tokens in 4 layers of (2.5 + 2 x handoff) units; sequential: 2 + 2 tokens in
    # 4 layers of 1.6. At 3 units of hand-off per layer, sequential is the faster.
    model.handoff_s = 3.0
    slow = plan_with(model)
    assert not slow.pipelined and not slow.decode_cpu_b1
    assert slow.decode_cpu_b0  # the CPU still decodes, in the sequential mode


def _measured(
    cpu_scale: float = 1.3, handoff_s: float = 2e-4, cpu_fixed_s: float = 3e-5
) -> CalibratedCostModel:
    model = CalibratedCostModel(FlatCost(), cpu_scale, handoff_s, cpu_fixed_s)
    model.cpu_samples, model.handoff_samples = 40, 25
    return model


def test_corrections_come_back_for_the_same_profile_only(tmp_path):
    profile = make_profile()
    path = corrections_path(profile_path(tmp_path, profile.key))
    assert path.parent == tmp_path and path.name.endswith(".corrections.json")
    save_corrections(_measured(), profile, path)
    restored = CalibratedCostModel(FlatCost())
    assert load_corrections(restored, profile, path)
    assert restored.state() == _measured().state()
    # The same setup measured again (a refreshed profile), or its hand-off timed again, starts
    # over.
    again = make_profile()
    again.meta["measured_at"] = "2026-12-07T09:00:00+0000"
    fresh = CalibratedCostModel(FlatCost())
    assert not load_corrections(fresh, again, path)
    retimed = make_profile()
    retimed.meta["handoff_measured_at"] = "2026-12-07T09:00:00+0000"
    assert not load_corrections(fresh, retimed, path)
    assert fresh.state() == CalibratedCostModel(FlatCost()).state()
    assert not load_corrections(fresh, profile, tmp_path / "absent.json")


@pytest.mark.parametrize(
    "edit",
    [
        lambda d: d.update(cpu_scale=float("nan")),
        lambda d: d.update(cpu_fixed_s=float("inf")),
        lambda d: d.pop("handoff_s"),
        lambda d: d.update(cpu_samples="many"),
        lambda d: d.update(format=0),
    ],
)
def test_a_damaged_corrections_file_leaves_the_model_as_profiled(tmp_path, edit):
    profile = make_profile()
    path = tmp_path / "c.json"
    save_corrections(_measured(), profile, path)
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))
    model = CalibratedCostModel(FlatCost())
    assert not load_corrections(model, profile, path)
    assert model.state() == CalibratedCostModel(FlatCost()).state()
    path.write_text("{not json")
    assert not load_corrections(model, profile, path)


def test_restored_corrections_stay_within_the_bounds(tmp_path):
    profile = make_profile()
    path = tmp_path / "c.json"
    save_corrections(_measured(cpu_scale=9.0, handoff_s=1.0, cpu_fixed_s=1.0), profile, path)
    model = CalibratedCostModel(FlatCost())
    assert load_corrections(model, profile, path)
    assert (model.cpu_scale, model.handoff_s) == (SCALE_BOUNDS[1], HANDOFF_MAX_S)
    assert model.cpu_fixed_s == CPU_FIXED_MAX_S


def test_corrections_stored_before_the_fixed_cpu_cost_restore_with_none(tmp_path):
    profile = make_profile()
    path = tmp_path / "c.json"
    save_corrections(_measured(cpu_scale=1.2), profile, path)
    data = json.loads(path.read_text())
    del data["cpu_fixed_s"]
    path.write_text(json.dumps(data))
    model = CalibratedCostModel(FlatCost(), cpu_fixed_s=1e-5)
    assert load_corrections(model, profile, path)
    assert (model.cpu_scale, model.cpu_fixed_s) == (1.2, 0.0)


def test_a_paced_profile_keeps_every_size_right_where_the_window_holds_one():
    """Sub-batches of one size cannot tell a fixed cost from the scale: the fit over the table
    alone gives it to the scale and prices a lone decode too cheap and a larger sub-batch too
    dear (the split then keeps too few decodes on the CPU), while over the profile's paced
    program it stays right at every size."""
    table = make_profile()
    truth = {n: 0.9 * table.cpu_decode_attn(n, 1000 * n) + 55e-6 for n in (1, 3, 8)}

    def after_window(profile):
        model = CalibratedCostModel(TableCostModel(profile))
        for _ in range(200):  # sub-batches of 3 decodes at 1000 tokens each, 4 layers
            model.record_cpu(4 * 2 * truth[3], [(3, 3000), (3, 3000)], 4)
        return {n: model.cpu_decode_attn_s(n, 1000 * n) / t for n, t in truth.items()}

    unpaced = after_window(table)
    assert unpaced[3] == pytest.approx(1.0, rel=1e-3)
    assert unpaced[1] < 0.8 and unpaced[8] > 1.1
    paced = after_window(replace(table, cpu_paced=(0.9, 55e-6)))
    assert all(r == pytest.approx(1.0, rel=1e-3) for r in paced.values())
