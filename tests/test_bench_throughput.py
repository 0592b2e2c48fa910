"""The throughput benchmark on the tiny model, on CPU: each policy is measured on the same
requests, and the advisor's prediction for the same workload, pools and profile is reported next
to the measured gains."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from neod.bench import throughput
from neod.config import SchedulerConfig
from neod.model.presets import PRESETS
from neod.sched import Profile, SplitRule, TableCostModel


def test_policies_are_measured_and_set_against_the_advisor(tmp_path, capsys):
    report = throughput.main([
        "--preset", "tiny", "--policies", "gpu-only,neo", "--num-requests", "12",
        "--input-len", "40", "--output-len", "6", "--gpu-kv-gib", "0.0005",
        "--cpu-kv-gib", "0.01", "--cpu-threads", "1", "--set", f"profile.dir={tmp_path}",
        "--trace-out", str(tmp_path / "trace.json"),
    ])  # fmt: skip
    gpu_only, neo = report["results"]["gpu-only"], report["results"]["neo"]
    assert gpu_only["errors"] == neo["errors"] == 0
    # Every request produced exactly its output length (EOS ignored), 6 +- 10%: 5 to 7 tokens.
    assert gpu_only["output_tokens"] == neo["output_tokens"]
    assert 12 * 5 <= neo["output_tokens"] <= 12 * 7
    assert report["speedup_vs_gpu_only"]["gpu-only"] == 1.0
    # GPU-only measured no CPU work; NEO's offloaded iterations corrected the CPU cost.
    assert gpu_only["cpu_cost_scale"]["samples"] == 0
    assert neo["cpu_cost_scale"]["samples"] > 0
    # ... and binned its CPU programs by their CPU decodes, none for GPU-only.
    assert gpu_only["cpu_fit"] == []
    assert sum(b["iterations"] for b in neo["cpu_fit"]) > 0
    assert all(b["median_ratio"] > 0 for b in neo["cpu_fit"])
    # NEO's run woke the pool's worker, whose time the kernel accounted.
    assert neo["pool_wait_share"] is not None and 0 <= neo["pool_wait_share"] < 1
    # GPU-only holds ~5 of the 12 requests: finished ones are replaced from the queue for a while
    # (the steady window); NEO's host pool may take them all at once and have none.
    assert gpu_only["steady_tokens_per_s"] > 0
    advice = report["advisor"]
    blocks = report["gpu_kv_blocks"]
    assert advice["input_len"] == 40 and advice["output_len"] == 6
    # The GPU-only batch is bounded by this run's GPU pool: ~43 tokens a request, 16 per block.
    assert 0 < advice["gpu_only"]["gpu_batch"] <= blocks * 16 // 40
    assert advice["gpu_only"]["tokens_per_s"] > 0 and advice["neo"]["tokens_per_s"] > 0
    assert advice["mode"] in ("neo", "gpu-only")
    # The same advice with the CPU cost corrected as the run measured it (neo's final scale).
    corrected = report["advisor_as_measured"]
    assert corrected["cpu_scale"] == neo["cpu_cost_scale"]["measured_over_profiled"]
    assert corrected["cpu_fixed_us"] == neo["cpu_cost_scale"]["fixed_us"]
    assert corrected["handoff_us"] == neo["pipeline_handoff"]["per_layer_us"]
    assert corrected["gpu_only"] == advice["gpu_only"]  # the GPU side is the profile's alone
    # The same batch played through the scheduler on the profile's costs, per policy run.
    sims = report["simulated"]
    assert list(sims) == ["gpu-only", "neo"]
    for sim in sims.values():
        assert sim["output_tokens_per_s"] > 0 and sim["unservable"] == 0
    # ... and with the costs as the run corrected them: the CPU's dearer or cheaper, the GPU's not.
    as_run = report["simulated_as_measured"]
    assert list(as_run) == ["gpu-only", "neo"]
    assert as_run["gpu-only"] == sims["gpu-only"]
    out = capsys.readouterr().out
    assert "simulated (this batch at once, the profile's costs and each run's host time per " \
        "iteration): gpu-only " in out
    assert "simulated (this batch at once, the costs as the run corrected them" in out
    # The engine's own time around each iteration's forward was measured, and the simulation
    # charged it.
    assert gpu_only["median_host_ms"] > 0
    # Every iteration of each run is in the trace, with its plan's shape and its times.
    traces = json.loads((tmp_path / "trace.json").read_text())
    for policy, result in (("gpu-only", gpu_only), ("neo", neo)):
        trace = traces[policy]
        assert len(trace) == result["iterations"]
        assert sum(t["pipelined"] for t in trace) == round(
            result["pipelined_share"] * result["iterations"]
        )
        assert all(t["measured_ms"] > 0 and t["host_ms"] > 0 for t in trace)
        assert all(0 < t["issue_ms"] <= t["measured_ms"] for t in trace)  # no CUDA graphs on CPU
        assert sum(t["prefill_gpu"] + t["prefill_cpu"] - t["chunked"] for t in trace) >= 12
    assert all(t["decode_cpu_b0"] + t["decode_cpu_b1"] == 0 for t in traces["gpu-only"])
    offloaded = [t for t in traces["neo"] if t["decode_cpu_b0"] + t["decode_cpu_b1"]]
    assert offloaded and all(t["cpu_batches"] and t["cpu_busy_ms"] > 0 for t in offloaded)
    # The pool's work over its size fits within the time some step computed.
    assert all(0 < t["cpu_work_ms"] <= t["cpu_busy_ms"] * 1.001 for t in offloaded)
    # Each record carries the CPU correction its prediction was made with: with the stored
    # profile it gives the prediction back, run by run (what a replay of the fit starts from).
    (stored,) = tmp_path.glob("profile-*.json")
    base = TableCostModel(Profile.from_json(json.loads(stored.read_text())))
    layers = PRESETS["tiny"].num_hidden_layers
    for t in offloaded:
        runs = [base.cpu_decode_attn_s(n, ctx) for n, ctx in t["cpu_batches"]]
        expected_s = layers * sum(t["cpu_scale"] * p + t["cpu_fixed_us"] * 1e-6 for p in runs)
        assert t["predicted_cpu_ms"] == pytest.approx(expected_s * 1e3)
    assert (offloaded[0]["cpu_scale"], offloaded[0]["cpu_fixed_us"]) == (1.0, 0.0)  # no samples
    assert len({(t["cpu_scale"], t["cpu_fixed_us"]) for t in offloaded}) > 1  # then it learned
    assert "neo: measured over predicted CPU time, by CPU decodes: " in out
    assert "gpu-only: measured over" not in out
    assert "advisor (steady state): gpu-only" in out and "measured in the steady window" in out
    assert (f"advisor, CPU cost x{corrected['cpu_scale']:.2f} + {corrected['cpu_fixed_us']:g} us "
            f"and hand-off "
            f"{corrected['handoff_us']:g} us as the run measured them: ") in out


def test_the_advisor_line_prices_pipelining_with_the_profiles_hand_off(monkeypatch):
    """Alone, the advisor decides from the profile as stored, its timed hand-off included; with
    the run's corrections, from those."""
    from dataclasses import replace
    from types import SimpleNamespace

    import torch
    from test_profile import make_profile

    from neod.cache.pool import KVLayout

    seen = []
    rules = []
    monkeypatch.setattr(
        throughput,
        "predict_workload",
        lambda cost, *a, **k: (seen.append(cost), rules.append(k["split_rule"])),
    )
    runtime = SimpleNamespace(
        profile=replace(make_profile(), pipeline_handoff=85e-6),
        layout=KVLayout(2, 1, 64, 16, torch.bfloat16), num_gpu_blocks=8, num_cpu_blocks=64,
    )  # fmt: skip
    cfg = SimpleNamespace(scheduler=SchedulerConfig(max_batch_size=8, max_tokens_in_batch=512,
                                                    cpu_min_gain=0.02, cpu_stretch=0.5))
    throughput.advisor_prediction(runtime, cfg, 1000, 200)
    throughput.advisor_prediction(
        runtime, cfg, 1000, 200, cpu_scale=1.3, handoff_s=20e-6, cpu_fixed_s=15e-6
    )
    assert seen[0].pipeline_handoff_s() == 85e-6 and seen[0].cpu_scale == 1.0
    assert seen[0].cpu_fixed_s == 0.0
    assert seen[1].pipeline_handoff_s() == 20e-6 and seen[1].cpu_scale == 1.3
    assert seen[1].cpu_fixed_s == 15e-6
    assert rules == [SplitRule(min_gain=0.02, stretch=0.5)] * 2  # the engine's rule, as configured


def test_the_benchmark_runs_where_no_client_library_is_installed():
    """GPU hosts get torch and the wheels in .whl/ only: the benchmark must not import pyzmq."""
    code = "import sys; sys.modules['zmq'] = None; import neod.bench.throughput"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_every_policy_starts_from_the_same_cost_corrections(tmp_path, monkeypatch):
    """The first policy's run corrects the CPU cost; the next one must not start from that."""
    starts = []

    class Recording(throughput.Engine):
        def tune(self, **knobs):
            starts.append(self.rt.scheduler.cost.state())
            return super().tune(**knobs)

    monkeypatch.setattr(throughput, "Engine", Recording)
    report = throughput.main([
        "--preset", "tiny", "--policies", "neo,auto", "--num-requests", "8",
        "--input-len", "40", "--output-len", "4", "--gpu-kv-gib", "0.0005",
        "--cpu-kv-gib", "0.01", "--cpu-threads", "1", "--set", f"profile.dir={tmp_path}",
    ])  # fmt: skip
    assert report["results"]["neo"]["cpu_cost_scale"]["samples"] > 0  # neo's run moved them
    assert len(starts) == 2 and starts[0] == starts[1]


def test_a_trace_file_that_cannot_be_written_is_refused_before_the_run(tmp_path, capsys):
    with pytest.raises(SystemExit):
        throughput.main(["--trace-out", str(tmp_path / "no-such-dir" / "trace.json")])
    assert "--trace-out" in capsys.readouterr().err


def test_prompts_gpu_only_refuses_are_counted_and_leave_no_gain_to_divide(tmp_path, capsys):
    """Prompts longer than the GPU pool and the token budget: GPU-only refuses them all, NEO
    prefills them on the CPU in chunks; the table says so instead of failing on a zero rate."""
    report = throughput.main([
        "--preset", "tiny", "--policies", "gpu-only,neo", "--num-requests", "3",
        "--input-len", "300", "--output-len", "4", "--gpu-kv-gib", "0.00025",
        "--max-tokens-in-batch", "64", "--cpu-kv-gib", "0.01", "--cpu-threads", "1",
        "--set", "model.dtype=float16", "--set", f"profile.dir={tmp_path}",
    ])  # fmt: skip
    gpu_only, neo = report["results"]["gpu-only"], report["results"]["neo"]
    assert gpu_only["errors"] == 3 and gpu_only["output_tokens"] == 0
    assert neo["errors"] == 0 and neo["output_tokens"] >= 3 * 3
    assert all(x != x for x in report["speedup_vs_gpu_only"].values())  # nan: nothing to divide
    out = capsys.readouterr().out
    assert "gpu-only: 3 of 3 requests ended in an error" in out
