"""The soak command (`python -m neod.bench.soak`) as a test: a short run by default, the long one
on request (`pytest -m slow`)."""

from __future__ import annotations

import asyncio
import collections
import os
import random
import subprocess
import sys

import orjson
import pytest

from neod.bench.soak import _leftovers, retune


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


def test_a_lost_control_endpoint_is_a_problem_of_the_run_not_a_crash(tmp_path) -> None:
    async def run() -> list[str]:
        done, problems = asyncio.Event(), []
        done.set()
        await retune(f"ipc://{tmp_path}/gone.sock", 0.01, random.Random(0), done,
                     collections.Counter(), problems)
        return problems

    [problem] = asyncio.run(run())
    assert problem.startswith(f"retuning stopped: no neod socket at {tmp_path}/gone.sock")


def test_leftovers_of_an_idle_daemon_are_named() -> None:
    idle = {"server": {"active_requests": 0}, "engine": {"kv_gpu": {"blocks_used": 0}}}
    assert _leftovers(idle) == []
    busy = {"server": {"active_requests": 2},
            "engine": {"kv_gpu": {"blocks_used": 0}, "kv_cpu": {"blocks_used": 3}}}
    assert _leftovers(busy) == ["2 requests still in flight", "3 kv_cpu blocks leaked"]


@pytest.mark.slow
def test_long_soak() -> None:
    report = soak("--requests", "5000", "--concurrency", "64", timeout_s=3600)
    assert sum(report["outcomes"].values()) == 5000 and not report["problems"]
