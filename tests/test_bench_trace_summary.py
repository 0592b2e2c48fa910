"""The trace summary on a hand-made trace: kinds, shares, rates and the pipelined medians."""

from __future__ import annotations

import json

import pytest

from neod.bench import trace_summary
from neod.engine.guard import MIN_SAMPLES


def record(g=0, b0=0, b1=0, pipelined=False, prefill=0, chunked=0, swap=0, ms=10.0, pred=10.0,
           cpu=0.0, cpu_pred=0.0, issue=0.0, host=1.0, work=0.0):  # fmt: skip
    return {
        "pipelined": pipelined, "prefill_gpu": prefill, "prefill_cpu": 0, "chunked": chunked,
        "decode_gpu": g, "decode_cpu_b0": b0, "decode_cpu_b1": b1, "swap_in": swap,
        "swap_out": 0, "cpu_batches": [], "measured_ms": ms, "predicted_ms": pred,
        "gpu_alone_ms": 5.0, "predicted_cpu_ms": cpu_pred, "cpu_busy_ms": cpu,
        "cpu_work_ms": work, "issue_ms": issue, "host_ms": host,
    }  # fmt: skip


def test_kinds_rates_and_pipelined_medians(tmp_path, capsys):
    trace = {
        "auto": [
            record(prefill=2, chunked=1, ms=29.0),  # one prompt done, one chunk under way
            record(g=2, swap=1, ms=9.0),
            record(g=3, b0=2, b1=2, pipelined=True, ms=20.0, pred=16.0, cpu=18.0, cpu_pred=12.0,
                   issue=5.0, work=13.2),
            record(g=3, b0=2, b1=2, pipelined=True, ms=15.0, pred=15.0, cpu=12.0, cpu_pred=12.0,
                   issue=6.0, work=10.8),
            record(g=3, b0=3, b1=2, pipelined=True, ms=12.0, pred=12.0, cpu=6.0, cpu_pred=6.0,
                   issue=3.0, work=5.4),
            record(g=1, b0=1, ms=4.0, pred=5.0),
            record(g=4, ms=9.0, pred=9.0),
        ]
    }  # fmt: skip
    path = tmp_path / "trace.json"
    path.write_text(json.dumps(trace))
    s = trace_summary.main([str(path), "--splits", "1"])["auto"]
    assert s["iterations"] == 7 and s["total_s"] == pytest.approx((98.0 + 7.0) / 1e3)
    kinds = s["kinds"]
    assert list(kinds) == list(trace_summary.KINDS)
    assert kinds["prefill"]["tokens"] == 1 and kinds["swap"]["tokens"] == 2
    pipe = kinds["pipelined"]
    assert pipe["iterations"] == 3 and pipe["tokens"] == 7 + 7 + 8
    assert pipe["tokens_per_s"] == pytest.approx(22 / 0.050)  # 47 ms measured + 3 ms own time
    assert pipe["time_share"] == pytest.approx(50.0 / 105.0)
    assert kinds["sequential+cpu"]["tokens"] == 2 and kinds["gpu"]["tokens"] == 4
    # Against the GPU decodes alone (5 ms predicted each, GPU-only iterations on time): the
    # pipelined ones made 22 tokens in 47 ms where the GPU alone makes 9 in 15 ms; the sequential
    # one 2 in 4 ms where the GPU alone makes 1 in 5 ms. Kinds without CPU decodes have none.
    assert pipe["over_gpu_alone"] == pytest.approx((22 / 47) / (9 / 15))
    assert kinds["sequential+cpu"]["over_gpu_alone"] == pytest.approx((2 / 4) / (1 / 5))
    assert kinds["gpu"]["over_gpu_alone"] is None and kinds["prefill"]["over_gpu_alone"] is None
    p = s["pipelined"]
    assert p["measured_over_predicted"] == pytest.approx(1.0)  # medians of 1.25, 1.0, 1.0
    assert p["cpu_busy_share"] == pytest.approx(0.8)  # of 0.9, 0.8, 0.5
    assert p["cpu_over_predicted"] == pytest.approx(1.0)
    assert p["cpu_work_over_predicted"] == pytest.approx(0.9)  # of 1.1, 0.9, 0.9
    assert p["issue_share"] == pytest.approx(0.25)  # of 0.25, 0.4, 0.25
    assert p["splits"] == [{
        "split": [3, 2, 2], "iterations": 2, "measured_ms": 17.5, "predicted_ms": 15.5,
        "gpu_alone_ms": 5.0, "cpu_busy_ms": 15.0, "cpu_work_ms": 12.0, "cpu_predicted_ms": 12.0,
    }]  # fmt: skip
    out = capsys.readouterr().out
    assert "auto: 7 iterations" in out and "3 GPU + 2/2 CPU:     2 it" in out
    assert "0.78x the GPU alone's rate" in out and "2.50x the GPU alone's rate" in out
    assert s["planned_ahead_share"] == 0.0 and s["median_ahead_ms"] is None  # an older trace


def test_plans_made_ahead_and_the_time_they_took(tmp_path, capsys):
    records = [record(g=2), record(g=2), record(g=2), record(g=2)]
    for r, ahead, ms in zip(records, (False, True, True, False), (0.5, 0.7, 0.0, 0.9), strict=True):
        r["planned_ahead"], r["ahead_ms"] = ahead, ms
    path = tmp_path / "trace.json"
    path.write_text(json.dumps({"neo": records}))
    s = trace_summary.main([str(path)])["neo"]
    assert s["planned_ahead_share"] == 0.5
    assert s["median_ahead_ms"] == pytest.approx(0.7)  # of the steps that planned: 0.5, 0.7, 0.9
    out = capsys.readouterr().out
    assert "planned ahead 50% of them, 0.70 ms in the previous one's wait" in out


def test_the_gain_over_the_gpu_alone_is_corrected_as_the_guard_corrects_it(tmp_path):
    """GPU-only iterations that ran 1.25x their prediction make the GPU alone's time 1.25x its
    prediction too; iterations of a kind without CPU decodes do not dilute the kind's gain."""
    trace = {"auto": [
        record(g=4, ms=10.0, pred=8.0),
        record(g=2, b0=2, ms=10.0),  # 4 tokens in 10 ms; alone: 2 in 5 * 1.25 ms
        record(g=2, b0=2, swap=1, ms=10.0),
        record(g=2, swap=1, ms=2.0),
    ]}  # fmt: skip
    path = tmp_path / "trace.json"
    path.write_text(json.dumps(trace))
    kinds = trace_summary.main([str(path)])["auto"]["kinds"]
    assert kinds["sequential+cpu"]["over_gpu_alone"] == pytest.approx((4 / 10) / (2 / 6.25))
    assert kinds["swap"]["over_gpu_alone"] == pytest.approx((4 / 10) / (2 / 6.25))


def test_a_trace_without_pipelined_iterations_has_no_medians(tmp_path, capsys):
    path = tmp_path / "trace.json"
    path.write_text(json.dumps({"gpu-only": [record(g=2), record(g=2, ms=12.0)]}))
    s = trace_summary.main([str(path)])["gpu-only"]
    assert list(s["kinds"]) == ["gpu"] and s["kinds"]["gpu"]["tokens_per_s"] == pytest.approx(
        4 / 0.024
    )
    assert s["pipelined"]["splits"] == [] and s["pipelined"]["issue_share"] is None
    assert "pipelined decodes" not in capsys.readouterr().out


def test_the_guard_replayed_on_a_trace_stops_where_chosen_offloading_loses(
    tmp_path, capsys, caplog
):
    """Iterations of 2 GPU decodes (5 ms alone) + 2 CPU decodes in 20 ms lose (0.5x): the guard,
    fed them as the engine feeds it, stops at the MIN_SAMPLES-th, and the summary gives the gain
    of the iterations before it; the same iterations made while sending the CPU's requests home,
    or with prompts, are not judged."""
    losing = record(g=2, b0=2, ms=20.0, pred=20.0)
    trace = {
        "auto": [record(g=2, ms=5.0, pred=5.0)] + [losing] * (MIN_SAMPLES + 5),
        "home": [{**losing, "sends_home": True}] * (MIN_SAMPLES + 5),
        "prompts": [record(g=2, b0=2, prefill=1, ms=20.0, pred=20.0)] * (MIN_SAMPLES + 5),
    }
    path = tmp_path / "trace.json"
    path.write_text(json.dumps(trace))
    report = trace_summary.main([str(path)])
    assert report["auto"]["guard_stops"] == [
        {"iteration": 1 + MIN_SAMPLES, "gain_before": pytest.approx((4 / 20) / (2 / 5))}
    ]
    assert f"stops offloading at: {1 + MIN_SAMPLES} (0.50x)" in capsys.readouterr().out
    assert not caplog.records  # the replayed stop is reported, not logged as the engine's
    assert report["home"]["guard_stops"] == [] and report["prompts"]["guard_stops"] == []
