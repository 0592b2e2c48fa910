"""The pipelined iteration is timed once per profile, at start, whole: the CPU program as it paces
it, and the hand-off against the bound the paced tables give it, both stored with the profile."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from neod.config import load_config
from neod.engine import profiler
from neod.engine.runtime import build_runtime
from neod.sched import Table1D, Table2D, TableCostModel, profile_path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    directory = tmp_path_factory.mktemp("profiles")
    cfg = load_config(None, env={}, overrides={
        "model.preset": "tiny", "model.device": "cpu", "scheduler.policy": "neo",
        "cpu.threads": 1, "profile.dir": str(directory), "cache.cpu_kv_gib": 0.02,
        "cache.gpu_kv_gib": 0.02,
    })  # fmt: skip
    runtime = build_runtime(cfg)
    yield cfg, runtime
    runtime.close()


def test_a_new_profile_is_stored_with_its_hand_off_and_reused(setup):
    cfg, runtime = setup
    profile = runtime.profile
    assert profile.pipeline_handoff is not None and profile.pipeline_handoff >= 0
    stored = json.loads(profile_path(cfg.profile.dir, profile.key).read_text())
    assert stored["pipeline_handoff"] == profile.pipeline_handoff
    assert stored["meta"]["handoff_measured_at"] == profile.meta["handoff_measured_at"]
    assert profile.cpu_paced is not None and stored["cpu_paced"] == list(profile.cpu_paced)
    # The scheduler starts from it; a second start reuses it without timing again.
    assert runtime.scheduler.cost.pipeline_handoff_s() == profile.pipeline_handoff
    assert TableCostModel(profile).pipeline_handoff_s() == profile.pipeline_handoff
    again = build_runtime(cfg)
    try:
        assert again.profile.meta["handoff_measured_at"] == profile.meta["handoff_measured_at"]
    finally:
        again.close()


def _flat(profile, seconds: float):
    """The profile with every stage costing `seconds` (per layer or iteration)."""
    one = Table1D.from_points({1: seconds})
    return replace(
        profile, linear=one, prefill_attn=one, transfer=one, swap=one, iteration_overhead=one,
        gpu_decode_attn=Table2D.from_points({(1, 16): seconds}),
        cpu_decode_attn=Table2D.from_points({(1, 16): seconds}),
    )  # fmt: skip


@pytest.fixture(scope="module")
def probes(setup):
    _, rt = setup
    return profiler._pipelined_probes(rt.executor, rt.layout, rt.vocab_size, rt.max_rows)


def test_the_probes_run_one_half_and_as_many_cpu_decodes_per_sub_batch_as_gpu_decodes(
    setup, probes
):
    n, runs = profiler.HANDOFF_PROBE_DECODES, 2 * setup[1].layout.num_layers
    assert [(p.gpu_decodes, p.per_side) for p in probes] == [(n, 1), (n, n // 2), (n, n)]
    for p in probes:
        assert p.context == profiler.HANDOFF_PROBE_CONTEXT and p.wall_s > 0
        assert 0 < p.cpu_run_s * runs < p.wall_s  # the CPU's runs fit in the iteration
    # More decodes per run read more KV.
    assert probes[0].cpu_run_s < probes[-1].cpu_run_s


@pytest.mark.parametrize("scale,fixed", [(0.8, 55e-6), (1.3, 0.0), (1.0, 20e-6)])
def test_the_paced_program_is_fitted_as_a_scale_of_the_table_and_a_fixed_cost(
    setup, probes, scale, fixed
):
    profile = setup[1].profile
    paced = [
        replace(p, cpu_run_s=scale * profile.cpu_decode_attn(p.per_side, p.per_side * p.context)
                + fixed)
        for p in probes
    ]  # fmt: skip
    assert profiler._cpu_paced(profile, paced) == pytest.approx((scale, fixed), rel=1e-6, abs=1e-9)
    # One size alone cannot tell a fixed cost from the scale: the scale takes it.
    one = profiler._cpu_paced(profile, paced[-1:])
    assert one[1] == 0.0 and one[0] > scale - 1e-9
    assert profiler._cpu_paced(profile, [replace(p, cpu_run_s=0.0) for p in paced]) is None


def test_the_hand_off_is_the_measured_time_over_the_tables_bound(setup, probes):
    _, runtime = setup
    layers = runtime.layout.num_layers

    def handoff(profile):
        return profiler._pipeline_handoff(profile, probes, layers)

    # Tables that promise a near-free iteration leave all of its real time over the bound.
    over = handoff(_flat(runtime.profile, 1e-9))
    assert 0 < over * layers < 5.0
    # Tables slower than any real iteration leave nothing over it: never negative.
    assert handoff(_flat(runtime.profile, 0.5)) == 0.0
    # A paced CPU program dearer than the iteration leaves nothing over it either.
    paced = replace(_flat(runtime.profile, 1e-9), cpu_paced=(1.0, 0.5))
    assert handoff(paced) == 0.0
