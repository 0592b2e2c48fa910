"""ISPC paged decode attention vs a float64 reference, on fresh random data.

Every call runs on poisoned memory: outputs start as NaN, and KV slots and blocks the batch must
not read (past seq_len, unused table entries) hold NaN, so a read out of bounds or a missed write
fails the comparison.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from neod.cython import load_native
from neod.kernels.cpu_attention import CpuAttention, amx_in_use, reference_decode, use_amx

CPUS = sorted(os.sched_getaffinity(0))
AMX_SUPPORTED = load_native().AMX_SUPPORTED
DTYPES = (torch.bfloat16, torch.float16)
# Output rounding (half an ulp of the KV dtype) plus fp32 accumulation.
RTOL = {torch.bfloat16: 2**-8, torch.float16: 2**-11}
ATOL = 2e-4


def make_batch(
    seq_lens: list[int],
    *,
    num_kv_heads: int,
    group: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    seed: int,
) -> dict:
    """Random q and KV; the requests' blocks are scattered over a pool with spare blocks."""
    gen = torch.Generator().manual_seed(seed)
    needed = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(needed) + 3
    max_blocks = max(needed) + 2
    kv = torch.randn(num_blocks, 2, num_kv_heads, block_size, head_dim, generator=gen).to(dtype)
    order = torch.randperm(num_blocks, generator=gen).tolist()
    # Entries past a request's blocks are out of range: the kernel must never look at them.
    tables = torch.full((len(seq_lens), max_blocks), num_blocks + 1000, dtype=torch.int32)
    used = set()
    for b, n in enumerate(needed):
        ids = order[:n]
        order = order[n:]
        tables[b, :n] = torch.tensor(ids, dtype=torch.int32)
        used.update(ids)
        last, filled = ids[-1], seq_lens[b] - (n - 1) * block_size
        kv[last, :, :, filled:] = float("nan")  # slots past seq_len
    for block in set(range(num_blocks)) - used:
        kv[block] = float("nan")
    q = torch.randn(len(seq_lens), num_kv_heads * group, head_dim, generator=gen).to(dtype)
    return {"q": q, "kv_layer": kv, "block_tables": tables,
            "seq_lens": torch.tensor(seq_lens, dtype=torch.int32)}


def poisoned_outputs(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    q = batch["q"]
    out = torch.full_like(q, float("nan"))
    lse = torch.full(q.shape[:2], float("nan"), dtype=torch.float32)
    return out, lse


def check(batch: dict, out: torch.Tensor, lse: torch.Tensor, scale: float | None = None) -> None:
    ref_out, ref_lse = reference_decode(
        batch["q"], batch["kv_layer"], batch["block_tables"], batch["seq_lens"], scale
    )
    dtype = out.dtype
    torch.testing.assert_close(out.double(), ref_out, rtol=RTOL[dtype], atol=ATOL)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def attn(tile_products):
    with CpuAttention(cores=CPUS[:2]) as pool:
        yield pool


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("group", [1, 2, 4, 8, 16, 20])
@pytest.mark.parametrize("block_size", [8, 16, 32])
def test_matches_reference_at_block_boundaries(attn, dtype, head_dim, group, block_size):
    bs = block_size
    lens = [1, bs - 1, bs, bs + 1, 2 * bs, 5 * bs + 3, 300]
    batch = make_batch(lens, num_kv_heads=2, group=group, head_dim=head_dim, block_size=bs,
                       dtype=dtype, seed=hash((dtype, head_dim, group, bs)) % 2**31)
    out, lse = poisoned_outputs(batch)
    attn.decode(**batch, out=out, lse=lse)
    check(batch, out, lse)


@pytest.mark.parametrize("dtype,head_dim,group", [(torch.bfloat16, 128, 4),
                                                  (torch.float16, 64, 8)])
def test_long_sequences_are_split_and_merged(attn, dtype, head_dim, group):
    # One 33K-token request spans both workers (and several partials); short ones ride along.
    lens = [33_001, 1, 4_096, 17]
    batch = make_batch(lens, num_kv_heads=2, group=group, head_dim=head_dim, block_size=16,
                       dtype=dtype, seed=7)
    out, lse = poisoned_outputs(batch)
    attn.decode(**batch, out=out, lse=lse)
    check(batch, out, lse)


@pytest.mark.parametrize("num_threads", [1, 2, 3, 5, 14])
def test_any_thread_count_gives_the_reference(num_threads):
    # More workers than CPUs is legal (several pinned to one CPU): the split changes, the result
    # does not.
    cores = [CPUS[i % len(CPUS)] for i in range(num_threads)]
    lens = [700, 3, 129, 64, 2_000]
    batch = make_batch(lens, num_kv_heads=4, group=2, head_dim=128, block_size=16,
                       dtype=torch.bfloat16, seed=num_threads)
    out, lse = poisoned_outputs(batch)
    with CpuAttention(cores=cores) as pool:
        pool.decode(**batch, out=out, lse=lse)
    check(batch, out, lse)


@pytest.mark.parametrize("block_size", [16, 32])
def test_append_writes_exactly_the_new_slot(attn, block_size):
    # seq_lens land on a block's first slot, its last slot and inside; the long one is split.
    lens = [1, block_size, block_size + 1, 3 * block_size - 5, 9_000]
    batch = make_batch(lens, num_kv_heads=2, group=4, head_dim=64, block_size=block_size,
                       dtype=torch.float16, seed=block_size)
    kv = batch["kv_layer"]
    gen = torch.Generator().manual_seed(1)
    shape = (len(lens), 2, 64)
    k_new = torch.randn(shape, generator=gen).half()
    v_new = torch.randn(shape, generator=gen).half()
    expected = kv.clone()
    for b, n in enumerate(lens):
        block = int(batch["block_tables"][b, (n - 1) // block_size])
        expected[block, 0, :, (n - 1) % block_size] = k_new[b]
        expected[block, 1, :, (n - 1) % block_size] = v_new[b]
    out, lse = poisoned_outputs(batch)
    attn.decode(**batch, out=out, lse=lse, k_new=k_new, v_new=v_new)
    # Exactly the new slots changed (NaN == NaN here: poisoned slots must stay poisoned).
    assert torch.equal(kv.view(torch.int16), expected.view(torch.int16))
    check(batch, out, lse)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("group", [1, 4, 8])
def test_rows_of_a_fused_qkv_tensor(attn, dtype, head_dim, group):
    # The engine hands over q, k_new and v_new as views of one [B, Hq + 2 Hkv, D] tensor (one copy
    # from the GPU): the result must be the one of contiguous copies, bit for bit, KV included.
    lens = [1, 17, 40, 9_000]
    hkv = 2
    batch = make_batch(lens, num_kv_heads=hkv, group=group, head_dim=head_dim, block_size=16,
                       dtype=dtype, seed=group * 1000 + head_dim)
    hq = hkv * group
    gen = torch.Generator().manual_seed(7)
    fused = torch.randn(len(lens), hq + 2 * hkv, head_dim, generator=gen).to(dtype)
    q, k_new, v_new = fused.split([hq, hkv, hkv], dim=1)
    assert not q.is_contiguous() and not k_new.is_contiguous()
    kv_copy = batch["kv_layer"].clone()
    out, lse = poisoned_outputs(batch)
    attn.decode(q, batch["kv_layer"], batch["block_tables"], batch["seq_lens"], out, lse,
                k_new=k_new, v_new=v_new)
    out_ref, lse_ref = poisoned_outputs(batch)
    attn.decode(q.contiguous(), kv_copy, batch["block_tables"], batch["seq_lens"], out_ref,
                lse_ref, k_new=k_new.contiguous(), v_new=v_new.contiguous())
    assert torch.equal(batch["kv_layer"].view(torch.int16), kv_copy.view(torch.int16))
    assert torch.equal(out.view(torch.int16), out_ref.view(torch.int16))
    assert torch.equal(lse, lse_ref)
    check({**batch, "q": q.contiguous()}, out, lse)


def test_blocks_far_into_a_large_pool(attn):
    # Block ids whose byte offsets pass 2 and 4 GiB: every offset must be computed in 64 bits.
    # The pool is never touched outside the used blocks, so it costs no memory.
    block_bytes = 2 * 2 * 16 * 128 * 2
    num_blocks = (5 << 30) // block_bytes
    kv = torch.empty(num_blocks, 2, 2, 16, 128, dtype=torch.bfloat16)
    gen = torch.Generator().manual_seed(9)
    ids = [num_blocks - 1, (2 << 30) // block_bytes, (4 << 30) // block_bytes + 3, 5]
    kv[ids] = torch.randn(len(ids), 2, 2, 16, 128, generator=gen).to(torch.bfloat16)
    batch = {"q": torch.randn(2, 8, 128, generator=gen).to(torch.bfloat16), "kv_layer": kv,
             "block_tables": torch.tensor([ids[:3], [ids[3], ids[0], 0]], dtype=torch.int32),
             "seq_lens": torch.tensor([40, 20], dtype=torch.int32)}
    out, lse = poisoned_outputs(batch)
    attn.decode(**batch, out=out, lse=lse)
    check(batch, out, lse)


def test_scale_and_optional_lse(attn):
    batch = make_batch([40, 250], num_kv_heads=1, group=8, head_dim=128, block_size=16,
                       dtype=torch.bfloat16, seed=3)
    out, lse = poisoned_outputs(batch)
    attn.decode(**batch, out=out, lse=lse, scale=0.3)
    check(batch, out, lse, scale=0.3)
    out_no_lse = torch.full_like(out, float("nan"))
    attn.decode(**batch, out=out_no_lse, scale=0.3)
    assert torch.equal(out_no_lse, out)


def test_large_scores_do_not_overflow(attn):
    # Scores in the hundreds: the online softmax must subtract the running max before exp.
    batch = make_batch([100, 1_000], num_kv_heads=2, group=2, head_dim=64, block_size=16,
                       dtype=torch.float16, seed=11)
    batch["q"] *= 40
    out, lse = poisoned_outputs(batch)
    attn.decode(**batch, out=out, lse=lse)
    check(batch, out, lse)
    assert lse.abs().max() > 100


def test_empty_batch_is_a_no_op(attn):
    batch = make_batch([5], num_kv_heads=2, group=2, head_dim=64, block_size=16,
                       dtype=torch.bfloat16, seed=0)
    empty = {**batch, "q": batch["q"][:0], "block_tables": batch["block_tables"][:0],
             "seq_lens": batch["seq_lens"][:0]}
    out = torch.empty(0, 4, 64, dtype=torch.bfloat16)
    attn.decode(**empty, out=out)


@settings(max_examples=25, deadline=None)
@given(
    lens=st.lists(st.integers(1, 600), min_size=1, max_size=6),
    num_kv_heads=st.sampled_from([1, 2, 3]),
    group=st.sampled_from([1, 2, 3, 4, 8]),
    head_dim=st.sampled_from([64, 128]),
    block_size=st.sampled_from([16, 32]),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**31 - 1),
)
def test_random_batches(attn, lens, num_kv_heads, group, head_dim, block_size, dtype, seed):
    batch = make_batch(lens, num_kv_heads=num_kv_heads, group=group, head_dim=head_dim,
                       block_size=block_size, dtype=dtype, seed=seed)
    out, lse = poisoned_outputs(batch)
    attn.decode(**batch, out=out, lse=lse)
    check(batch, out, lse)


def _valid(dtype=torch.bfloat16) -> dict:
    batch = make_batch([20, 7], num_kv_heads=2, group=2, head_dim=64, block_size=16,
                       dtype=dtype, seed=5)
    batch["out"] = torch.empty_like(batch["q"])
    return batch


@pytest.mark.parametrize(
    "mutate,error",
    [
        (lambda b: b.update(q=b["q"].float()), "q must be torch.bfloat16"),
        (lambda b: b.update(kv_layer=b["kv_layer"].float()), "kv_layer must be bf16 or fp16"),
        (lambda b: b.update(out=b["out"].half()), "out must be torch.bfloat16"),
        (lambda b: b.update(q=b["q"].transpose(0, 1).contiguous().transpose(0, 1)),
         "q must be contiguous"),
        (lambda b: b.update(block_tables=b["block_tables"].long()), "block_tables must be"),
        (lambda b: b.update(seq_lens=b["seq_lens"][:1]), "seq_lens must have shape"),
        (lambda b: b.update(lse=torch.empty(2, 4, dtype=torch.float64)), "lse must be"),
        (lambda b: b.update(k_new=torch.empty(2, 2, 64, dtype=torch.bfloat16)),
         "k_new and v_new must be given together"),
        (lambda b: b.update(k_new=torch.empty(2, 2, 64, dtype=torch.bfloat16),
                            v_new=torch.empty(2, 3, 64, dtype=torch.bfloat16)[:, :2]),
         "k_new and v_new rows must be equally far apart"),
        (lambda b: b.update(q=b["q"][:1].expand(2, -1, -1)), "row strides must cover a row"),
        (lambda b: b.update(q=b["q"][:, :3].contiguous(), out=b["out"][:, :3].contiguous()),
         "not a multiple of Hkv"),
        (lambda b: b.update(seq_lens=torch.tensor([0, 7], dtype=torch.int32)),
         r"seq_lens\[0\] = 0 is outside"),
        (lambda b: b.update(seq_lens=torch.tensor([20, 10_000], dtype=torch.int32)),
         r"seq_lens\[1\] = 10000 is outside"),
        (lambda b: b["block_tables"].__setitem__((1, 0), -1), r"block_tables\[1, 0\] = -1"),
        (lambda b: b["block_tables"].__setitem__((0, 1), 999),
         r"block_tables\[0, 1\] = 999 is not a block id"),
    ],
)
def test_invalid_arguments_are_rejected(attn, mutate, error):
    batch = _valid()
    mutate(batch)
    with pytest.raises(ValueError, match=error):
        attn.decode(**batch)


def test_unsupported_head_dim(attn):
    kv = torch.zeros(4, 2, 1, 16, 96, dtype=torch.bfloat16)
    q = torch.zeros(1, 1, 96, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="head_dim must be one of"):
        attn.decode(q, kv, torch.zeros(1, 1, dtype=torch.int32),
                    torch.ones(1, dtype=torch.int32), torch.empty_like(q))


def test_reference_is_softmax_attention():
    # The reference itself, on a case small enough to write out by hand.
    kv = torch.zeros(2, 2, 1, 16, 64, dtype=torch.float16)
    kv[1, 0, 0, 0, 0] = 1.0  # key of token 0
    kv[1, 1, 0, 0] = 2.0  # value of token 0
    kv[1, 1, 0, 1] = -1.0  # value of token 1 (key 0)
    q = torch.zeros(1, 1, 64, dtype=torch.float16)
    q[0, 0, 0] = 8.0  # score of token 0: 8 / sqrt(64) = 1, token 1: 0
    out, lse = reference_decode(q, kv, torch.tensor([[1]], dtype=torch.int32),
                                torch.tensor([2], dtype=torch.int32))
    w0 = math.e / (math.e + 1)
    assert out[0, 0, 0].item() == pytest.approx(2 * w0 - (1 - w0))
    assert lse[0, 0].item() == pytest.approx(math.log(math.e + 1))


def test_amx_switch_reports_what_runs():
    supported = AMX_SUPPORTED
    try:
        assert use_amx(True) is supported
        assert amx_in_use() == ("scores+values" if supported else None)
        assert use_amx(True, values=False) is supported
        assert amx_in_use() == ("scores" if supported else None)
        assert use_amx(False) is False
        assert amx_in_use() is None
        assert use_amx(True, soft=True) is True
        assert amx_in_use() == "scores+values"
    finally:
        use_amx(False)


@pytest.mark.skipif(not AMX_SUPPORTED, reason="no AMX on this host")
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("group", [1, 5, 8, 16])
def test_software_tiles_compute_what_amx_tiles_compute(head_dim, group):
    # The software tiles stand in for AMX on hosts without it: same operands, same sums (up to
    # fp32 summation order and the final bf16 rounding).
    batch = make_batch([3, 16, 47, 300], num_kv_heads=2, group=group, head_dim=head_dim,
                       block_size=16, dtype=torch.bfloat16, seed=group * head_dim)
    outs = []
    try:
        with CpuAttention(cores=CPUS[:2]) as pool:
            for soft in (False, True):
                assert use_amx(True, soft=soft)
                out, lse = poisoned_outputs(batch)
                pool.decode(**batch, out=out, lse=lse)
                outs.append((out.float(), lse))
    finally:
        use_amx(False)
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=2**-7, atol=ATOL)
    torch.testing.assert_close(outs[0][1], outs[1][1], rtol=1e-5, atol=1e-5)
