"""Keeping the process's other threads off the CPU pool's cores, and the schedstat accounting
that shows how long pool workers waited for theirs."""

from __future__ import annotations

import logging
import os
import threading
import time

import pytest

from neod.config import load_config
from neod.cpu import threads as cpu_threads
from neod.cpu.threads import ThreadTimes, keep_off_pool, release_pool_cores, thread_times
from neod.engine.runtime import build_runtime

CPUS = sorted(os.sched_getaffinity(0))
needs_two_cpus = pytest.mark.skipif(len(CPUS) < 2, reason="needs 2 CPUs")


def _spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


class _Sleeper:
    """A thread that reports its kernel id, then waits to be told to go (it stands for a pool
    worker, or for a thread the process started before the pool)."""

    def __init__(self) -> None:
        self.started, self.stop = threading.Event(), threading.Event()
        self.affinity_seen: set[int] = set()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        self.started.wait()
        self.tid = self.thread.native_id

    def _run(self) -> None:
        self.started.set()
        self.stop.wait()
        self.affinity_seen = os.sched_getaffinity(0)

    def join(self) -> set[int]:
        self.stop.set()
        self.thread.join()
        return self.affinity_seen


def test_thread_times_count_this_threads_cpu_time():
    me = threading.get_native_id()
    before = thread_times([me])
    _spin(0.05)
    spent = thread_times([me]) - before
    assert 0.03 < spent.run_s < 1.0
    assert spent.wait_s >= 0 and spent.preempted >= 0
    assert thread_times([2**30]) == ThreadTimes()  # a thread that is gone (or never was) counts 0


def test_wait_share_is_the_waited_part_of_the_wanted_time():
    assert ThreadTimes(3.0, 1.0, 2).wait_share == 0.25
    assert ThreadTimes().wait_share is None
    assert ThreadTimes(1.0, 0.5, 1) + ThreadTimes(1.0, 0.5, 2) == ThreadTimes(2.0, 1.0, 3)


@needs_two_cpus
def test_other_threads_leave_the_pool_cores_and_come_back(monkeypatch):
    monkeypatch.setattr(cpu_threads, "MIN_OTHER_CPUS", 1)  # CI hosts have 2 CPUs
    process_cpus = set(CPUS)
    pool_cpu, others = CPUS[-1], set(CPUS[:-1])
    worker, bystander = _Sleeper(), _Sleeper()
    os.sched_setaffinity(worker.tid, {pool_cpu})  # as the pool pins its workers
    try:
        assert keep_off_pool([pool_cpu], [worker.tid], process_cpus) == others
        assert os.sched_getaffinity(0) == others
        assert os.sched_getaffinity(bystander.tid) == others
        assert os.sched_getaffinity(worker.tid) == {pool_cpu}
        later = _Sleeper()  # started by a confined thread: inherits it
        assert later.join() == others
        release_pool_cores([worker.tid], process_cpus)
        assert os.sched_getaffinity(0) == process_cpus
        assert bystander.join() == process_cpus
        assert os.sched_getaffinity(worker.tid) == {pool_cpu}
    finally:
        release_pool_cores([], process_cpus)
        worker.join()


def test_a_pool_that_leaves_too_few_cpus_confines_nothing(caplog):
    caplog.set_level(logging.INFO, logger="neod.cpu.threads")
    process_cpus = set(CPUS)
    before = os.sched_getaffinity(0)
    assert keep_off_pool(CPUS[:-1], [], process_cpus) is None  # one CPU left: below the minimum
    assert os.sched_getaffinity(0) == before
    assert "may then preempt pool workers" in caplog.text


@pytest.fixture(scope="module")
def profiles(tmp_path_factory):
    """One profile for the module (isolation is not part of its key)."""
    return tmp_path_factory.mktemp("profiles")


@needs_two_cpus
@pytest.mark.parametrize("isolate", [False, True])
def test_the_runtime_keeps_other_threads_off_its_pool(profiles, monkeypatch, isolate):
    monkeypatch.setattr(cpu_threads, "MIN_OTHER_CPUS", 1)
    cfg = load_config(None, env={}, overrides={
        "model.preset": "tiny", "model.device": "cpu", "scheduler.policy": "neo",
        "cpu.threads": 1, "cpu.isolate_pool": isolate, "profile.dir": str(profiles),
        "cache.cpu_kv_gib": 0.02, "cache.gpu_kv_gib": 0.02,
    })  # fmt: skip
    process_cpus = os.sched_getaffinity(0)
    runtime = build_runtime(cfg)
    try:
        pool = set(runtime.cpu_attention.cores)
        expected = process_cpus - pool if isolate else process_cpus
        assert runtime.other_cpus == (frozenset(expected) if isolate else None)
        assert os.sched_getaffinity(0) == expected
        for tid in runtime.cpu_attention.thread_ids():
            assert os.sched_getaffinity(tid) <= pool
        times = runtime.cpu_attention.thread_times()
        assert times.run_s >= 0 and times.wait_s >= 0
    finally:
        runtime.close()
    assert os.sched_getaffinity(0) == process_cpus
