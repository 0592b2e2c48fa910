"""The CPU attention benchmark on a small grid: every point is validated against torch before it
is timed, and the share of the pool that computed is a share."""

from __future__ import annotations

import json

import psutil
import pytest
import torch

from neod.bench import cpu_attention


def test_a_small_grid_reports_rates_and_the_pools_busy_share(tmp_path):
    out = tmp_path / "report.json"
    code = cpu_attention.main([
        "--batch", "1,8", "--context", "100", "--threads", "1", "--q-heads", "8",
        "--kv-heads", "2", "--seconds", "0.05", "--probe-bytes", str(16 << 20),
        "--reserve-cores", "0", "--products", "fp32", "--torch-at", "1", "--out", str(out),
    ])  # fmt: skip
    assert code == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["batch"], r["context"], r["threads"], r["kv_memory"]) for r in rows] == [
        (1, 100, 1, "pageable"), (8, 100, 1, "pageable")]
    for r in rows:
        assert r["kernel_gbps"] > 0 and r["host_read_gbps"] > 0 and r["speedup_vs_torch"] > 0
        # Worker time lies within the timed span: at most all of the pool's thread time.
        assert 0 < r["pool_share"] <= 1


def test_kv_memory_kinds_are_checked():
    with pytest.raises(SystemExit):
        cpu_attention.main(["--kv-memory", "huge"])
    with pytest.raises(SystemExit):  # a CPU this process may not run on: no silent no-op
        cpu_attention.main(["--busy-cpus", "100000"])
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            cpu_attention.main(["--kv-memory", "pinned"])


def test_a_busy_neighbour_spins_only_while_the_kernel_is_timed(tmp_path):
    out = tmp_path / "report.json"
    code = cpu_attention.main([
        "--batch", "4", "--context", "256", "--threads", "2", "--q-heads", "8", "--kv-heads", "2",
        "--seconds", "0.2", "--probe-bytes", str(16 << 20), "--reserve-cores", "0",
        "--products", "fp32", "--no-torch", "--busy-cpus", "0", "--out", str(out),
    ])  # fmt: skip
    assert code == 0
    (row,) = json.loads(out.read_text())["rows"]
    assert row["busy_cpus"] == [0] and row["kernel_gbps"] > 0
    # The spinner is gone: no child of this process is left.
    assert not psutil.Process().children(recursive=True)


def test_spinning_keeps_its_cpus_busy_for_its_duration():
    with cpu_attention.spinning([0]):
        children = psutil.Process().children()
        assert len(children) == 1
        busy = children[0].cpu_percent(interval=0.3)
        assert busy > 50 and children[0].cpu_affinity() == [0]
    assert not psutil.Process().children()
