"""The soak command (`python -m neod.bench.soak`) as a test: a short run by default, the long one
on request (`pytest -m slow`)."""

from __future__ import annotations

import os
import subprocess
import sys

import orjson
import pytest


def soak(*args: str, timeout_s: float) -> dict:
    # One torch thread: the soak's producers share this 2-core host with the engine thread.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "neod.bench.soak", *args], capture_output=True,
                         text=True, timeout=timeout_s, env=env)
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]
    return orjson.loads(out.stdout)


def test_short_soak_accounts_for_every_request() -> None:
    report = soak("--requests", "150", "--concurrency", "8", "--seed", "1", timeout_s=300)
    assert sum(report["outcomes"].values()) == 150 and not report["problems"]


def test_soak_while_retuned_at_random(tmp_path) -> None:
    """Policy flips, batch limits up and down, CPU pool resizes and short drains, all while
    requests run: every request still ends once, no block leaks, every tune is applied."""
    report = soak("--requests", "300", "--concurrency", "16", "--seed", "2", "--tune-every",
                  "0.1", "--drain", "--set", "cache.gpu_kv_gib=0.002",
                  "--set", "cache.cpu_kv_gib=0.25",
                  "--set", "cpu.reserve_cores=0", "--set", f"profile.dir={tmp_path}",
                  timeout_s=600)
    assert sum(report["outcomes"].values()) == 300 and not report["problems"]
    assert report["tunes"]["tunes"] >= 5


@pytest.mark.slow
def test_long_soak() -> None:
    report = soak("--requests", "5000", "--concurrency", "64", timeout_s=3600)
    assert sum(report["outcomes"].values()) == 5000 and not report["problems"]
