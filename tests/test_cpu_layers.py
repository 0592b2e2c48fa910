"""`CpuAttention.decode_layers`: every layer of an iteration in one native call, paced by flags.

A producer thread plays the GPU: layer by layer it fills the staging buffers and sets the ready
flag, then waits for the done flag and checks the output against the float64 reference over the
pool as it stands (the new token appended). Stored prefill rows are checked slot by slot.
"""

from __future__ import annotations

import functools
import os
import threading
import time
from collections.abc import Callable

import pytest
import torch

from neod.kernels.cpu_attention import CpuAttention, CpuFlight, LayersBusy, reference_decode

CPUS = sorted(os.sched_getaffinity(0))
RTOL = {torch.bfloat16: 2**-8, torch.float16: 2**-11}


@pytest.fixture(scope="module")
def attn(tile_products):
    with CpuAttention(cores=CPUS[:2]) as pool:
        yield pool


@pytest.fixture(scope="module")
def crowded(tile_products):
    """Four workers per CPU: they are preempted mid-share, so one falls behind while the others
    run ahead, which a pool of one worker per core rarely shows."""
    with CpuAttention(cores=CPUS[:2] * 4) as pool:
        yield pool


def _flight(
    gen: torch.Generator,
    seq_lens: list[int],
    first_block: int,
    num_layers: int,
    hq: int,
    hkv: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    num_prefill: int = 0,
    prefill_first_block: int = 0,
    fused: bool = False,
) -> CpuFlight:
    """A flight whose requests own consecutive blocks from first_block, in shuffled order; with
    `fused`, q, k_new and v_new are views of one [B, Hq + 2 Hkv, D] tensor, as in the engine."""
    b = len(seq_lens)
    needed = [-(-n // block_size) for n in seq_lens]
    max_blocks = max(needed, default=1) + 1
    tables = torch.full((b, max_blocks), -7, dtype=torch.int32)
    ids = (torch.randperm(sum(needed), generator=gen) + first_block).tolist()
    for i, n in enumerate(needed):
        tables[i, :n] = torch.tensor(ids[:n], dtype=torch.int32)
        ids = ids[n:]
    def empty(rows: int, heads: int) -> torch.Tensor:
        return torch.full((rows, heads, head_dim), float("nan"), dtype=dtype)
    slots = None
    if num_prefill:
        slots = prefill_first_block * block_size + torch.randperm(num_prefill, generator=gen)
    if fused:
        q, k_new, v_new = empty(b, hq + 2 * hkv).split([hq, hkv, hkv], dim=1)
    else:
        q, k_new, v_new = empty(b, hq), empty(b, hkv), empty(b, hkv)
    return CpuFlight(
        q=q, k_new=k_new, v_new=v_new, out=empty(b, hq),
        block_tables=tables, seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        ready=torch.zeros(num_layers, dtype=torch.int32),
        done=torch.zeros(num_layers, dtype=torch.int32),
        prefill_k=empty(num_prefill, hkv) if num_prefill else None,
        prefill_v=empty(num_prefill, hkv) if num_prefill else None,
        prefill_slots=slots,
    )


def _wait(flag: torch.Tensor, value: int, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while int(flag) != value:
        assert time.monotonic() < deadline, "the native program did not set its done flag"
        time.sleep(1e-5)


def _fill(gen: torch.Generator, f: CpuFlight) -> None:
    for t in (f.q, f.k_new, f.v_new, f.prefill_k, f.prefill_v):
        if t is not None:
            t.copy_(torch.randn(t.shape, generator=gen))


def _decode_beside(
    attn: CpuAttention,
    pool: torch.Tensor,
    flights: list[CpuFlight],
    seq: int,
    producers: list[Callable[[], None]],
) -> LayersBusy:
    """Runs the native program while each producer plays a GPU stream on its own thread; the
    first producer failure is raised here, after it has released every ready flag so that the
    program runs out instead of waiting for its timeout."""
    errors: list[BaseException] = []

    def guarded(producer: Callable[[], None]) -> None:
        try:
            producer()
        except BaseException as exc:  # reported on the test's thread
            errors.append(exc)
            for f in flights:
                f.ready.fill_(seq)

    threads = [threading.Thread(target=guarded, args=(p,)) for p in producers]
    for thread in threads:
        thread.start()
    busy = attn.decode_layers(pool, flights, seq, timeout_s=30.0)
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return busy


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("hq,hkv,head_dim,block_size", [(8, 2, 64, 16), (4, 4, 128, 32)])
def test_layers_match_the_reference_flight_by_flight(attn, dtype, hq, hkv, head_dim, block_size):
    num_layers, seq = 3, 41
    gen = torch.Generator().manual_seed(hq * 1000 + head_dim + block_size)
    lens0, lens1 = [1, block_size, 2 * block_size + 3], [block_size + 1, 5 * block_size - 1]
    blocks0 = sum(-(-n // block_size) for n in lens0)
    blocks1 = sum(-(-n // block_size) for n in lens1)
    num_prefill = 2 * block_size + 5
    num_blocks = blocks0 + blocks1 + -(-num_prefill // block_size) + 2
    pool = torch.randn(num_layers, num_blocks, 2, hkv, block_size, head_dim, generator=gen)
    pool = pool.to(dtype)
    flights = [
        _flight(gen, lens0, 0, num_layers, hq, hkv, head_dim, block_size, dtype,
                num_prefill, blocks0 + blocks1),
        _flight(gen, lens1, blocks0, num_layers, hq, hkv, head_dim, block_size, dtype,
                fused=True),
    ]
    def gpu() -> None:
        for layer in range(num_layers):
            for f in flights:
                _fill(gen, f)
                f.ready[layer] = seq
                _wait(f.done[layer], seq)
                _check_layer(pool[layer], f, block_size, dtype)

    busy = _decode_beside(attn, pool, flights, seq, [gpu])
    # The workers computed within the busy time: at most every thread for all of it. (The busy
    # time excludes the waits for the producer, which checks every layer in between.)
    assert busy.wall_s > 0 and 0 < busy.worker_s <= attn.num_threads * busy.wall_s
    assert 0 < busy.pool_share(attn.num_threads) <= 1
    for f in flights:
        assert f.done.tolist() == [seq] * num_layers


def _check_layer(
    kv: torch.Tensor, f: CpuFlight, block_size: int, dtype: torch.dtype, output: bool = True
) -> None:
    for i in range(f.q.shape[0]):  # the new token's K/V were appended before the attention
        pos = int(f.seq_lens[i]) - 1
        block, offset = int(f.block_tables[i, pos // block_size]), pos % block_size
        assert torch.equal(kv[block, 0, :, offset], f.k_new[i])
        assert torch.equal(kv[block, 1, :, offset], f.v_new[i])
    if output and f.q.shape[0]:
        ref, _ = reference_decode(f.q, kv, f.block_tables, f.seq_lens)
        torch.testing.assert_close(f.out.double(), ref, rtol=RTOL[dtype], atol=2e-4)
    if f.prefill_slots is not None:
        for row, slot in enumerate(f.prefill_slots.tolist()):
            block, offset = divmod(slot, block_size)
            assert torch.equal(kv[block, 0, :, offset], f.prefill_k[row])
            assert torch.equal(kv[block, 1, :, offset], f.prefill_v[row])


def _small(num_layers: int = 2) -> tuple[torch.Tensor, CpuFlight]:
    gen = torch.Generator().manual_seed(3)
    pool = torch.randn(num_layers, 4, 2, 2, 16, 64, generator=gen).to(torch.bfloat16)
    flight = _flight(gen, [5, 20], 0, num_layers, 4, 2, 64, 16, torch.bfloat16)
    flight.q.normal_(generator=gen)
    flight.k_new.normal_(generator=gen)
    flight.v_new.normal_(generator=gen)
    return pool, flight


def test_a_missing_ready_flag_times_out_and_releases_every_done_flag(attn):
    pool, flight = _small(num_layers=3)
    flight.ready[0] = 9  # layer 0 may run; layer 1 never becomes ready
    start = time.monotonic()
    with pytest.raises(TimeoutError, match="layer 1 of flight 0"):
        attn.decode_layers(pool, [flight], 9, timeout_s=0.2)
    assert time.monotonic() - start < 5
    assert flight.done.tolist() == [9, 9, 9]


def test_invalid_input_is_rejected_and_releases_every_done_flag(attn):
    pool, flight = _small()
    flight.block_tables[1, 0] = 99  # not a block of the pool
    with pytest.raises(ValueError, match="block_tables"):
        attn.decode_layers(pool, [flight], 5, timeout_s=1.0)
    assert flight.done.tolist() == [5, 5]
    pool, flight = _small()
    flight.ready = torch.zeros(3, dtype=torch.int32)  # one flag per layer is required
    with pytest.raises(ValueError, match="ready"):
        attn.decode_layers(pool, [flight], 6, timeout_s=1.0)
    assert flight.done.tolist() == [6, 6]


def test_prefill_slots_outside_the_pool_are_rejected(attn):
    gen = torch.Generator().manual_seed(4)
    pool = torch.zeros(2, 4, 2, 2, 16, 64, dtype=torch.bfloat16)
    flight = _flight(gen, [3], 0, 2, 4, 2, 64, 16, torch.bfloat16, num_prefill=2,
                     prefill_first_block=3)
    flight.prefill_slots[1] = 4 * 16
    with pytest.raises(ValueError, match="prefill slot 64"):
        attn.decode_layers(pool, [flight], 2, timeout_s=1.0)
    assert flight.done.tolist() == [2, 2]
    assert not pool.any(), "nothing may be written when the input is invalid"


def test_a_flight_that_only_stores_prefill_rows_runs(attn):
    """As the engine builds it: no decodes, so an empty [0, 1] block table and empty seq_lens."""
    gen = torch.Generator().manual_seed(6)
    num_layers, seq = 2, 8
    pool = torch.zeros(num_layers, 6, 2, 2, 16, 64, dtype=torch.bfloat16)
    staged = _flight(gen, [], 0, num_layers, 4, 2, 64, 16, torch.bfloat16, num_prefill=19,
                     prefill_first_block=2)
    staged.block_tables = torch.zeros((0, 1), dtype=torch.int32)
    staged.seq_lens = torch.tensor([], dtype=torch.int32)
    staged.prefill_k.normal_(generator=gen)
    staged.prefill_v.normal_(generator=gen)
    staged.ready.fill_(seq)
    attn.decode_layers(pool, [staged], seq, timeout_s=5.0)
    assert staged.done.tolist() == [seq] * num_layers
    for layer in range(num_layers):
        _check_layer(pool[layer], staged, 16, torch.bfloat16)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("pool_kind", ["attn", "crowded"])
def test_layers_ready_together_run_back_to_back_and_match_the_reference(
    attn, crowded, pool_kind, seed
):
    """Every ready flag set before the call: workers move on to the next (layer, flight) while the
    slowest finishes the last, so consecutive steps overlap. Long requests are cut into pieces
    whose partials two overlapping steps must not mix up; each flight's output is checked at the
    last layer, its appended and stored rows in every layer."""
    attn = crowded if pool_kind == "crowded" else attn
    gen = torch.Generator().manual_seed(100 + seed)
    dtype, hq, hkv, head_dim, block_size = torch.bfloat16, 8, 2, 64, 16
    num_flights = 2 + seed % 3
    num_layers = 1 + seed % 4
    seq = 7 + seed
    flights, first_block = [], 0
    lens_of = []
    for i in range(num_flights):
        lens = torch.randint(1, 40 * block_size, (1 + (seed + i) % 4,), generator=gen).tolist()
        lens_of.append(lens)
        first_block += sum(-(-n // block_size) for n in lens)
    num_prefill = 3 * block_size + seed
    prefill_first = first_block
    num_blocks = first_block + -(-num_prefill * num_flights // block_size) + 1
    pool = torch.randn(num_layers, num_blocks, 2, hkv, block_size, head_dim, generator=gen)
    pool = pool.to(dtype)
    first_block = 0
    for i, lens in enumerate(lens_of):
        staged = num_prefill if i % 2 == 0 else 0
        f = _flight(gen, lens, first_block, num_layers, hq, hkv, head_dim, block_size, dtype,
                    staged, prefill_first + i * num_prefill // block_size, fused=i == 1)
        if staged:  # slots past the flights' blocks, disjoint between flights
            f.prefill_slots = (prefill_first * block_size + i * num_prefill
                               + torch.randperm(num_prefill, generator=gen))
        _fill(gen, f)
        f.ready.fill_(seq)
        flights.append(f)
        first_block += sum(-(-n // block_size) for n in lens)
    busy = attn.decode_layers(pool, flights, seq, timeout_s=30.0)
    assert busy.wall_s > 0 and 0 < busy.worker_s <= attn.num_threads * busy.wall_s
    for f in flights:
        assert f.done.tolist() == [seq] * num_layers
        _check_layer(pool[num_layers - 1], f, block_size, dtype)
        for layer in range(num_layers - 1):
            _check_layer(pool[layer], f, block_size, dtype, output=False)


def test_one_flight_with_every_layer_ready_appends_and_stores_in_each(attn):
    """Consecutive layers of one flight may overlap (as when a profiler times ready layers back to
    back): each layer still gets its own appended and stored rows, and the last layer's output."""
    gen = torch.Generator().manual_seed(12)
    num_layers, seq, block_size = 5, 3, 16
    pool = torch.randn(num_layers, 80, 2, 2, block_size, 64, generator=gen).to(torch.bfloat16)
    f = _flight(gen, [700, 33, 260], 0, num_layers, 8, 2, 64, block_size, torch.bfloat16,
                num_prefill=40, prefill_first_block=70)
    _fill(gen, f)
    f.ready.fill_(seq)
    attn.decode_layers(pool, [f], seq, timeout_s=30.0)
    assert f.done.tolist() == [seq] * num_layers
    for layer in range(num_layers):
        _check_layer(pool[layer], f, block_size, torch.bfloat16, output=False)


def test_a_late_flight_times_out_after_the_others_ran(attn):
    """Flight 0 is ready in every layer, flight 1 never: flight 0's first layer runs, the call
    names flight 1's, and every done flag is released."""
    pool, flight = _small(num_layers=3)
    _, late = _small(num_layers=3)
    late.block_tables = flight.block_tables.clone()
    flight.ready.fill_(4)
    with pytest.raises(TimeoutError, match="layer 0 of flight 1"):
        attn.decode_layers(pool, [flight, late], 4, timeout_s=0.2)
    assert flight.done.tolist() == [4, 4, 4] and late.done.tolist() == [4, 4, 4]
    _check_layer(pool[0], flight, 16, torch.bfloat16)


@pytest.mark.parametrize("pool_kind", ["attn", "crowded"])
def test_flights_paced_as_the_gpu_paces_them_overlap_and_match_the_reference(
    attn, crowded, pool_kind
):
    """One producer per flight, as the GPU's streams: each sets a layer's ready flag once its
    previous layer is done (and after a random delay), so the flights' steps overlap in every
    order the engine can produce; every layer's output is checked while its flight waits."""
    attn = crowded if pool_kind == "crowded" else attn
    gen = torch.Generator().manual_seed(21)
    dtype, hq, hkv, head_dim, block_size = torch.bfloat16, 8, 2, 64, 16
    num_layers, seq = 4, 5
    lens_of = [[700, 20, 333], [129, 1], [40 * block_size, 17, 18, 19]]
    blocks = [sum(-(-n // block_size) for n in lens) for lens in lens_of]
    num_blocks = sum(blocks) + 2
    pool = torch.randn(num_layers, num_blocks, 2, hkv, block_size, head_dim, generator=gen)
    pool = pool.to(dtype)
    flights = [
        _flight(gen, lens, sum(blocks[:i]), num_layers, hq, hkv, head_dim, block_size, dtype,
                fused=i == 1)
        for i, lens in enumerate(lens_of)
    ]  # fmt: skip
    def gpu(f: CpuFlight, seed: int) -> None:
        local = torch.Generator().manual_seed(seed)
        for layer in range(num_layers):
            _fill(local, f)
            time.sleep(float(torch.rand(1, generator=local)) * 2e-3)
            f.ready[layer] = seq
            _wait(f.done[layer], seq)
            _check_layer(pool[layer], f, block_size, dtype)

    producers = [functools.partial(gpu, f, 40 + i) for i, f in enumerate(flights)]
    _decode_beside(attn, pool, flights, seq, producers)
