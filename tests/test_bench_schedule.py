"""The scheduling-pass benchmark: every policy timed on the same backed-up queue, with what it
decided."""

from __future__ import annotations

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
