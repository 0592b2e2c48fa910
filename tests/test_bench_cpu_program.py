"""The CPU program benchmark on a small grid: each point checked against the reference, then timed
per (layer, flight) step, with the pool's busy share a share."""

from __future__ import annotations

import json

import pytest

from neod.bench import cpu_program


def test_a_small_grid_reports_steps_rates_and_the_pools_busy_share(tmp_path):
    out = tmp_path / "report.json"
    code = cpu_program.main([
        "--flights", "2", "--batch", "1,3", "--context", "20,300", "--threads", "2",
        "--reserve-cores", "0", "--q-heads", "8", "--kv-heads", "2", "--head-dim", "64",
        "--layers", "6", "--repeats", "2", "--products", "fp32", "--probe-bytes", str(16 << 20),
        "--out", str(out),
    ])  # fmt: skip
    assert code == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["batch"], r["context"]) for r in rows] == [(1, 20), (1, 300), (3, 20), (3, 300)]
    for r in rows:
        assert r["flights"] == 2 and 1 <= r["layers"] <= 6
        assert r["step_us"] > 0 and r["gbps"] > 0 and r["host_read_gbps"] > 0
        assert 0 < r["pool_share"] <= 1
        # MiB per step: batch x context tokens of K and V, 2 KV heads of 64 bf16 elements.
        assert r["step_mib"] == pytest.approx(r["batch"] * r["context"] * 2 * 2 * 64 * 2 / 2**20)


def test_one_flight_and_amx_products_run(tmp_path):
    out = tmp_path / "report.json"
    assert cpu_program.main([
        "--flights", "1", "--batch", "2", "--context", "100", "--threads", "1",
        "--reserve-cores", "0", "--q-heads", "8", "--kv-heads", "1", "--head-dim", "128",
        "--layers", "3", "--repeats", "1", "--probe-bytes", str(16 << 20), "--out", str(out),
    ]) == 0  # fmt: skip
    (row,) = json.loads(out.read_text())["rows"]
    assert row["flights"] == 1 and row["step_us"] > 0


def test_bad_arguments_are_refused():
    with pytest.raises(SystemExit):
        cpu_program.main(["--flights", "0"])


def test_a_program_that_writes_nothing_fails_the_check(monkeypatch):
    monkeypatch.setattr(cpu_program.CpuAttention, "decode_layers", lambda *args, **kw: None)
    with pytest.raises(AssertionError):
        cpu_program.main([
            "--batch", "2", "--context", "64", "--threads", "1", "--reserve-cores", "0",
            "--q-heads", "4", "--kv-heads", "2", "--head-dim", "64", "--products", "fp32",
            "--probe-bytes", str(16 << 20),
        ])  # fmt: skip


def test_paced_steps_are_released_one_at_a_time_and_timed_apart(tmp_path):
    out = tmp_path / "report.json"
    assert cpu_program.main([
        "--flights", "2", "--batch", "4", "--context", "4000", "--threads", "1",
        "--reserve-cores", "0", "--q-heads", "8", "--kv-heads", "2", "--head-dim", "64",
        "--layers", "4", "--repeats", "2", "--products", "fp32", "--probe-bytes", str(16 << 20),
        "--paced", "--out", str(out),
    ]) == 0  # fmt: skip
    (row,) = json.loads(out.read_text())["rows"]
    assert row["pace_us"] == pytest.approx(cpu_program.PACE_OVER_STEP * row["step_us"])
    assert row["busy_step_us"] > 0 and row["paced_busy_step_us"] > 0
    # The paced program waited for its last step's release (step 7 of 8, at 7 paces): steps of
    # ~1 ms, long enough that all 8 released at once would end well before.
    assert row["layers"] == 4 and row["step_us"] > 200
    assert row["paced_step_us"] * 8 >= row["pace_us"] * 7
