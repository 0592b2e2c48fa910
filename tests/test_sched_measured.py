"""The cost model against iterations measured on GPU hosts (docs/perf.md, hosts E and F,
2026-12-06): their stored profiles, and what the iteration bench (`neod.bench.pipeline
--preset llama-3.1-8b --gpu-decodes 4 --cpu-decodes 0,1,2,4,8,16 --context 1100`) measured on
the same hosts, in ms per iteration. A change to the formulas that no longer fits them fails
here, before it reaches a GPU."""

from __future__ import annotations

import json
import statistics
from dataclasses import replace
from pathlib import Path

import pytest

from neod.sched import Profile, TableCostModel
from neod.sched.cost import BatchLoad, pipelined_s, sequential_s
from neod.sched.split import CpuCandidate, split_candidates, split_cpu_decodes

DATA = Path(__file__).parent / "data"
LAYERS, CONTEXT, GPU_DECODES = 32, 1100, 4
# Host F profiled the hand-off itself; host E's profile timed it under the earlier form (on the
# round trips alone, 154 us), refitted here to its own probe point (K = 4, 2/2) as 39 us.
HOSTS = {
    "F": ("profile-h100-8b-host-f.json", None, {
        "gpu_only": 7.11,
        "sequential": {1: 10.17, 2: 12.30, 4: 15.97, 8: 23.24, 16: 39.69},
        "pipelined": {1: 14.36, 2: 14.95, 4: 15.12, 8: 19.21, 16: 34.42},
    }),
    "E": ("profile-h100-8b-host-e.json", 39e-6, {
        "gpu_only": 7.10,
        "sequential": {1: 10.33, 2: 12.03, 4: 13.38, 8: 18.64, 16: 29.71},
        "pipelined": {1: 14.36, 2: 14.99, 4: 15.11, 8: 15.53, 16: 23.13},
    }),
}  # fmt: skip


def measured_profile(name: str) -> Profile:
    """A GPU host's stored profile with the hand-off it was stored with: timed against its own
    unpaced CPU table (these profiles predate `cpu_paced`), which a profile of the current form
    would time again at its next start."""
    data = json.loads((DATA / name).read_text())
    return replace(Profile.from_json(data), pipeline_handoff=data["pipeline_handoff"])


def _cost(host: str) -> TableCostModel:
    name, handoff, _ = HOSTS[host]
    profile = measured_profile(name)
    if handoff is not None:
        profile = replace(profile, pipeline_handoff=handoff)
    return TableCostModel(profile)


def _base() -> BatchLoad:
    return BatchLoad().plus_gpu_decodes(GPU_DECODES, GPU_DECODES * CONTEXT)


@pytest.mark.parametrize("host", sorted(HOSTS))
def test_iterations_are_predicted_within_the_targets_bound(host):
    """Every pipelined split within 8% and every point within 15% (host E's lone sequential CPU
    decodes, whose fixed costs the serving engine learns, are the worst), the median within 5%
    (the issue's target: 10%)."""
    cost, measured = _cost(host), HOSTS[host][2]
    errors = [sequential_s(cost, LAYERS, _base(), 0) * 1e3 / measured["gpu_only"] - 1]
    for k in measured["pipelined"]:
        forced = [CpuCandidate(i, CONTEXT) for i in range(k)]
        seq, pipe = split_candidates(cost, LAYERS, _base(), forced, (), 0, 0)
        errors.append(seq.iter_s * 1e3 / measured["sequential"][k] - 1)
        # The bench times the pipelined split the model chose for these forced decodes.
        b0, b1 = len(pipe.b0_ids), len(pipe.b1_ids)
        load0 = _base().plus_cpu_decodes(b0, b0 * CONTEXT) if b0 else _base()
        load1 = BatchLoad().plus_cpu_decodes(b1, b1 * CONTEXT)
        pipelined = pipelined_s(cost, LAYERS, load0, load1, 0) * 1e3 / measured["pipelined"][k]
        assert abs(pipelined - 1) < 0.08, (k, pipelined)
        errors.append(pipelined - 1)
    assert max(map(abs, errors)) < 0.15, errors
    assert statistics.median(map(abs, errors)) < 0.05, errors


@pytest.mark.parametrize("host,taken", [("F", 6), ("E", 8)])
def test_the_split_takes_the_cpu_decodes_that_paid_on_the_host(host, taken):
    """With 8 optional CPU decodes beside 4 GPU decodes, the split pipelines as many as beat the
    GPU alone on that host: host E measured 1.37x at 4/4, host F 1.11x at 4/4."""
    cost = _cost(host)
    optional = [CpuCandidate(100 + i, CONTEXT) for i in range(8)]
    split = split_cpu_decodes(cost, LAYERS, _base(), (), optional, 8, 0)
    assert split.pipelined
    assert len(split.b0_ids) + len(split.b1_ids) == taken
    alone = sequential_s(cost, LAYERS, _base(), 0)
    assert split.num_tokens_out / split.iter_s > GPU_DECODES / alone


def test_a_host_whose_cpu_runs_carry_a_fixed_cost_still_gets_its_cpu_batch():
    """Host S (H100, 2026-12-07) profiled its paced CPU program at 0.64x its table + 94 us per
    sub-batch layer: a lone CPU decode costs ~154 us a layer, more than it buys beside 3 GPU
    decodes, and a split judging one decode at a time took none of 29. The pipelined iterations
    that serving's aged requests forced on it measured 14 CPU + 3 GPU decodes in 30.6 ms against
    7.0 ms for the 3 alone (1.39x the rate); the split must find such a batch itself."""
    cost = TableCostModel(Profile.from_json(json.loads(
        (DATA / "profile-h100-8b-host-s.json").read_text())))  # fmt: skip
    base = BatchLoad().plus_gpu_decodes(3, 3 * CONTEXT)
    optional = [CpuCandidate(100 + i, CONTEXT) for i in range(29)]
    split = split_cpu_decodes(cost, LAYERS, base, (), optional, 29, 0)
    assert split.pipelined and len(split.b0_ids) + len(split.b1_ids) >= 12
    alone = sequential_s(cost, LAYERS, base, 0)
    assert split.num_tokens_out / split.iter_s > 1.25 * 3 / alone
