"""The scheduling-pass benchmark: every policy timed on the same backed-up queue, with what it
decided."""

from __future__ import annotations

from pathlib import Path

from neod.bench import schedule


def test_each_policy_is_timed_on_the_same_state(tmp_path, capsys):
    out = tmp_path / "report.json"
    report = schedule.main([
        "--running", "6", "--on-cpu", "2", "--waiting", "10", "--context", "300",
        "--seconds", "0.05", "--json", str(out),
    ])  # fmt: skip
    assert set(report["policies"]) == {"auto", "gpu-only", "neo"}
    for result in report["policies"].values():
        assert result["us_per_pass"] > 0 and result["passes"] >= 20
    gpu_only = report["policies"]["gpu-only"]
    # The GPU is full: gpu-only decodes its 4 and admits nothing (the 2 on the CPU come home or
    # wait); neo keeps the 2 CPU decodes on the CPU.
    assert gpu_only["decode_cpu"] == 0 and gpu_only["prefill"] == 0
    assert report["policies"]["neo"]["decode_cpu"] == 2
    assert out.exists()
    assert "one scheduling pass: 6 running (2 on the CPU)" in capsys.readouterr().out


def test_timed_passes_force_only_the_cpu_requests_that_aged(capsys):
    """Each timed pass sees the CPU's requests last decoded 1 to age_limit passes before, as in
    serving: a quarter of them forced into the batch, not all (which a pass that aged everyone
    timed before)."""
    profile = Path(__file__).parent / "data" / "profile-h100-8b-host-e.json"
    report = schedule.main([
        "--running", "32", "--on-cpu", "29", "--waiting", "0", "--context", "1100",
        "--seconds", "0.05", "--policies", "neo", "--profile", str(profile),
    ])  # fmt: skip
    timed = report["policies"]["neo"]["timed_cpu_decodes"]
    assert 29 // 4 <= timed < 29
    assert "timed passes:" in capsys.readouterr().out
