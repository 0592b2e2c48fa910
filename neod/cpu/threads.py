"""The CPU attention pool's cores kept for its workers, and how long the workers waited for them.

The pool's workers claim shares of every layer's KV blocks until none is left, so a layer ends
when the worker holding its last share does: one worker that the kernel's scheduler pauses to run
another thread in the middle of a share holds up every step that waits on that layer. The engine
thread, the thread that drives the CPU program, CUDA's and torch's threads are otherwise free to
land on a worker's core, most of all while both devices work at once (pipelined iterations),
which is when every core is busy. Keeping them on the cores the pool leaves, and reading how long
the workers sat runnable but not running (the kernel's schedstat), makes that visible and
avoidable.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass

logger = logging.getLogger(__name__)

# The engine thread and the thread that drives the CPU program each need a core of their own: on
# one shared core each would wait a scheduler time slice (milliseconds) for the other.
MIN_OTHER_CPUS = 2


@dataclass(frozen=True)
class ThreadTimes:
    """Summed over threads: time on a CPU, time runnable but waiting for one, and how often the
    kernel's scheduler took the CPU away from a thread that still wanted it."""

    run_s: float = 0.0
    wait_s: float = 0.0
    preempted: int = 0

    def __add__(self, other: ThreadTimes) -> ThreadTimes:
        return ThreadTimes(
            self.run_s + other.run_s, self.wait_s + other.wait_s, self.preempted + other.preempted
        )

    def __sub__(self, other: ThreadTimes) -> ThreadTimes:
        return ThreadTimes(
            self.run_s - other.run_s, self.wait_s - other.wait_s, self.preempted - other.preempted
        )

    @property
    def wait_share(self) -> float | None:
        """Share of the time the threads wanted a CPU that they waited for one."""
        total = self.run_s + self.wait_s
        return self.wait_s / total if total > 0 else None


def thread_times(tids: Iterable[int]) -> ThreadTimes:
    """The kernel's accounting for these threads of this process, summed; threads that have
    exited, or a kernel without schedstat, count as zero."""
    total = ThreadTimes()
    for tid in tids:
        try:
            with open(f"/proc/self/task/{tid}/schedstat") as f:
                run_ns, wait_ns, _ = f.read().split()
            with open(f"/proc/self/task/{tid}/status") as f:
                preempted = next(
                    int(line.split()[1]) for line in f if line.startswith("nonvoluntary_ctxt")
                )
        except (OSError, ValueError, StopIteration):
            continue
        total += ThreadTimes(int(run_ns) * 1e-9, int(wait_ns) * 1e-9, preempted)
    return total


def process_threads() -> list[int]:
    try:
        return [int(tid) for tid in os.listdir("/proc/self/task")]
    except OSError:
        return [os.getpid()]


def keep_off_pool(
    pool_cpus: Iterable[int], workers: Iterable[int], process_cpus: set[int]
) -> set[int] | None:
    """Confine every thread of this process but the pool's `workers` to the CPUs of
    `process_cpus` (what the process may use) outside `pool_cpus`; threads started later inherit
    that from their creators. Returns those CPUs, or None where fewer than MIN_OTHER_CPUS remain:
    then every thread keeps its affinity (a pool that takes nearly every core was asked for, and
    the engine may not starve)."""
    others = set(process_cpus) - set(pool_cpus)
    if len(others) < MIN_OTHER_CPUS:
        logger.info(
            "the CPU attention pool leaves %d of this process's %d CPUs to the engine and its "
            "other threads, which may then preempt pool workers (fewer cpu.threads avoids it)",
            len(others),
            len(process_cpus),
        )
        return None
    _set_affinity(set(process_threads()) - set(workers), others)
    return others


def release_pool_cores(workers: Iterable[int], process_cpus: set[int]) -> None:
    """Undo keep_off_pool: every thread but the pool's `workers` may run on any of
    `process_cpus` again."""
    _set_affinity(set(process_threads()) - set(workers), set(process_cpus))


def _set_affinity(tids: Iterable[int], cpus: set[int]) -> None:
    for tid in tids:
        try:
            os.sched_setaffinity(tid, cpus)
        except OSError:
            continue  # exited meanwhile, not ours to move, or CPUs its cgroup no longer allows
