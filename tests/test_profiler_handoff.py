"""The pipeline hand-off is timed once per profile, at start, as a whole pipelined iteration
against the bound the profile's tables give it, and stored with the profile."""

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


def test_the_hand_off_is_the_measured_time_over_the_tables_bound(setup):
    _, runtime = setup
    layers = runtime.layout.num_layers

    def handoff(profile):
        return profiler._pipeline_handoff(
            profile, runtime.executor, runtime.layout, runtime.vocab_size, runtime.max_rows
        )

    # Tables that promise a near-free iteration leave all of its real time over the bound.
    over = handoff(_flat(runtime.profile, 1e-9))
    assert 0 < over * layers < 5.0
    # Tables slower than any real iteration leave nothing over it: never negative.
    assert handoff(_flat(runtime.profile, 0.5)) == 0.0
