"""The pinned worker pool: lifecycle, pinning, concurrent callers, GIL release, bandwidth probe."""

from __future__ import annotations

import os
import threading
import time

import pytest
import torch

from neod.cython import load_native
from neod.kernels.cpu_attention import CpuAttention, reference_decode

CPUS = sorted(os.sched_getaffinity(0))


def small_batch(seed: int, seq_len: int = 300) -> dict:
    gen = torch.Generator().manual_seed(seed)
    blocks = -(-seq_len // 16)
    kv = torch.randn(blocks + 1, 2, 2, 16, 64, generator=gen).to(torch.bfloat16)
    return {
        "q": torch.randn(1, 4, 64, generator=gen).to(torch.bfloat16),
        "kv_layer": kv,
        "block_tables": torch.arange(1, blocks + 1, dtype=torch.int32)[None],
        "seq_lens": torch.tensor([seq_len], dtype=torch.int32),
    }


def run_and_check(pool: CpuAttention, batch: dict) -> None:
    out = torch.full_like(batch["q"], float("nan"))
    pool.decode(**batch, out=out)
    ref, _ = reference_decode(batch["q"], batch["kv_layer"], batch["block_tables"],
                              batch["seq_lens"])
    torch.testing.assert_close(out.double(), ref, rtol=2**-8, atol=2e-4)


def thread_affinity(tid: int) -> set[int]:
    return os.sched_getaffinity(tid)


def test_workers_are_pinned_to_their_cores():
    cores = [CPUS[-1], CPUS[0]] if len(CPUS) > 1 else [CPUS[0]]
    with CpuAttention(cores=cores) as pool:
        tids = pool.thread_ids()
        assert len(set(tids)) == len(cores)
        # Kernel threads of this process, each allowed on exactly its one core.
        assert all(os.path.exists(f"/proc/self/task/{tid}") for tid in tids)
        assert [thread_affinity(tid) for tid in tids] == [{core} for core in cores]
        # The caller's own affinity is untouched.
        assert os.sched_getaffinity(0) == set(CPUS)


def test_start_stop_repeatedly():
    batch = small_batch(0)
    for i in range(20):
        pool = CpuAttention(cores=CPUS[: 1 + i % len(CPUS)])
        assert pool.num_threads == 1 + i % len(CPUS)
        if i % 5 == 0:
            run_and_check(pool, batch)
        tids = pool.thread_ids()
        pool.close()
        pool.close()  # idempotent
        assert pool.closed
        assert _gone(tids)


def _gone(tids: list[int], timeout_s: float = 5.0) -> bool:
    """Whether the threads have left the process. pthread_join returns once a thread has exited,
    a moment before the kernel drops its task entry, so the entries are given a little time."""
    deadline = time.monotonic() + timeout_s
    while any(os.path.exists(f"/proc/self/task/{tid}") for tid in tids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.001)
    return True


def test_closed_pool_refuses_calls():
    pool = CpuAttention(cores=CPUS[:1])
    pool.close()
    batch = small_batch(1)
    with pytest.raises(RuntimeError, match="closed"):
        pool.decode(**batch, out=torch.empty_like(batch["q"]))
    with pytest.raises(RuntimeError, match="closed"):
        pool.thread_ids()


def test_concurrent_callers_get_their_own_results():
    errors: list[BaseException] = []

    def worker(pool: CpuAttention, seed: int) -> None:
        try:
            for k in range(8):
                run_and_check(pool, small_batch(seed * 100 + k, seq_len=50 + 37 * k))
        except BaseException as exc:  # reported to the main thread below
            errors.append(exc)

    with CpuAttention(cores=CPUS) as pool:
        threads = [threading.Thread(target=worker, args=(pool, s)) for s in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert errors == []


def test_close_while_others_call_is_safe():
    """Callers in a loop keep taking the pool's lock back; close must still get it, and every
    caller then sees a clean RuntimeError."""
    pool = CpuAttention(cores=CPUS)
    outcomes: list[str] = []
    calling = threading.Barrier(4)

    def caller() -> None:
        batch = small_batch(2, seq_len=2_000)
        deadline = time.monotonic() + 30
        calling.wait()
        while time.monotonic() < deadline:
            try:
                pool.decode(**batch, out=torch.empty_like(batch["q"]))
            except RuntimeError:
                outcomes.append("closed")
                return
        outcomes.append("never closed")

    threads = [threading.Thread(target=caller) for _ in range(3)]
    for t in threads:
        t.start()
    calling.wait()
    time.sleep(0.02)
    pool.close()
    for t in threads:
        t.join()
    assert outcomes == ["closed"] * 3
    assert pool.closed


def test_decode_releases_the_gil():
    # A ~0.5 s call on another thread; this thread must keep running Python meanwhile.
    batch = small_batch(3, seq_len=4_096)
    batch["kv_layer"] = batch["kv_layer"].repeat(1, 1, 16, 1, 1).contiguous()
    batch["q"] = batch["q"].repeat(1, 16, 1).contiguous()
    window: list[float] = []
    with CpuAttention(cores=CPUS[:1]) as pool:
        out = torch.empty_like(batch["q"])
        pool.decode(**batch, out=out)
        start = time.perf_counter()
        pool.decode(**batch, out=out)
        single = time.perf_counter() - start
        repeats = max(1, int(0.5 / single))

        def long_call() -> None:
            window.append(time.perf_counter())
            for _ in range(repeats):
                pool.decode(**batch, out=out)
            window.append(time.perf_counter())

        t = threading.Thread(target=long_call)
        ticks: list[float] = []
        t.start()
        while t.is_alive():
            ticks.append(time.perf_counter())
        t.join()
    begin, end = window
    inside = [x for x in ticks if begin + 0.1 * (end - begin) < x < end - 0.1 * (end - begin)]
    assert len(inside) > 1000


def test_bad_cores_are_reported():
    native = load_native()
    with pytest.raises(ValueError, match="at least one core"):
        native.NativePool([])
    with pytest.raises(OSError, match="cannot pin"):
        CpuAttention(cores=[max(CPUS) + 1])
    with pytest.raises(ValueError, match="num_threads=2 but 1 cores"):
        CpuAttention(num_threads=2, cores=[CPUS[0]])


def test_probe_reads_at_a_plausible_rate():
    with CpuAttention(cores=CPUS) as pool:
        counts = list(range(1, len(CPUS) + 1))
        rates = pool.probe_read_bandwidth(64 << 20, counts, repeats=2)
        assert len(rates) == len(counts)
        # Anything from a slow VM to a server socket: 0.5 GB/s .. 2 TB/s.
        assert all(5e8 < r < 2e12 for r in rates)
        # A buffer past 2 GiB per reader (offsets beyond 32 bits).
        assert pool.probe_read_bandwidth((9 << 30) // 4, [1], repeats=1)[0] > 5e8
        with pytest.raises(ValueError, match="thread counts"):
            pool.probe_read_bandwidth(64 << 20, [len(CPUS) + 1], repeats=1)
