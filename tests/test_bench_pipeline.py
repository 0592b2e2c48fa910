"""The pipeline benchmark on the tiny model, on CPU: every mode is measured and set against its
prediction, the CPU pool's busy time against the profile's CPU attention time."""

from __future__ import annotations

from neod.bench import pipeline


def test_each_mode_is_measured_against_its_prediction(tmp_path, capsys):
    report = pipeline.main([
        "--preset", "tiny", "--gpu-decodes", "2", "--cpu-decodes", "0,3", "--context", "40",
        "--repeats", "2", "--cpu-threads", "1", "--set", f"profile.dir={tmp_path}",
        "--isolation", "on,off",
    ])  # fmt: skip
    assert len(report["rows"]) == 4  # each K once per isolation setting
    assert report["rows"][2]["other_cpus"] is None  # off: the other threads run anywhere
    without, with_cpu = report["rows"][:2]
    assert (without["cpu_decodes"], with_cpu["cpu_decodes"]) == (0, 3)
    assert without["sequential"]["cpu_busy_ms"] == without["sequential"]["cpu_predicted_ms"] == 0
    assert without["sequential"]["cpu_pool_share"] is None
    assert "pipelined" not in without  # nothing to split
    for mode in ("sequential", "pipelined"):
        r = with_cpu[mode]
        assert r["cpu_busy_ms"] > 0 and r["cpu_predicted_ms"] > 0
        assert 0 < r["cpu_pool_share"] <= 1
        assert r["predicted_ms"] > 0 and r["x_gpu_only"] > 0
        assert r["workers_wait_ms"] >= 0 and r["others_wait_ms"] >= 0
        assert r["workers_preempted"] >= 0
        assert 0 < r["issue_ms"] <= r["wall_ms"]  # on CPU, the layers are issued and run inline
    assert sum(with_cpu["pipelined"]["split"]) == 3
    out = capsys.readouterr().out
    assert "CPU pool busy ms measured / predicted" in out and out.count(" cpu ") == 6
    assert out.count(" wait ") == 6 and out.count(" issue ") == 6
    assert "other threads anywhere" in out
