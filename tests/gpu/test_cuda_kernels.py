"""The CUDA kernels against the torch reference, on fresh random data over many shapes.

Every output the kernels allocate or are given is poisoned with NaN first, so an element the
kernel forgot to write shows up as NaN; copies (KV store, swap) must be bit-exact; arithmetic must
agree with the fp32 reference to the rounding of the output dtype. Needs build/libneod_cuda.so
(scripts/build_cuda.sh) and a GPU.
"""

from __future__ import annotations

import math
import time

import pytest
import torch
from test_reference_ops import chunk_case

from neod.kernels import cuda_ops, ops, reference

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

DEV = "cuda"
HALF = [torch.bfloat16, torch.float16]
ALL = [torch.bfloat16, torch.float16, torch.float32]


@pytest.fixture(scope="module", autouse=True)
def _needs_library():
    if not cuda_ops.available():
        pytest.fail(f"CUDA kernel library not loaded from {cuda_ops.library_path()}")


def _tol(dtype: torch.dtype) -> float:
    return 2e-5 if dtype == torch.float32 else 1e-2


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(out).all(), "non-finite output (unwritten or NaN)"
    out64, ref64 = out.double(), ref.double()
    return float((out64 - ref64).norm() / ref64.norm().clamp_min(1e-30))


def _poison_allocator(nbytes: int) -> None:
    """Leave a freed NaN-filled block in the caching allocator for the next allocation."""
    junk = torch.full((nbytes // 4 + 1024,), float("nan"), device=DEV)
    del junk


def _gen(seed: int) -> torch.Generator:
    return torch.Generator(device=DEV).manual_seed(seed)


def _randn(g, *shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, generator=g, device=DEV) * scale).to(dtype)


@pytest.mark.parametrize("dtype", ALL)
@pytest.mark.parametrize("weight_fp32", [False, True])
@pytest.mark.parametrize(
    ("num_tokens", "hidden", "pad"), [(1, 4096, 0), (7, 5120, 64), (130, 8192, 0), (3, 100, 3)]
)
def test_fused_add_rms_norm(dtype, weight_fp32, num_tokens, hidden, pad):
    g = _gen(hidden + num_tokens)
    # x is a row-strided view when pad > 0; hidden 100 with pad 3 takes the scalar path
    x = _randn(g, num_tokens, hidden + pad, dtype=dtype, scale=2.0)[:, :hidden]
    residual = _randn(g, num_tokens, hidden, dtype=dtype)
    weight = _randn(g, hidden, dtype=torch.float32 if weight_fp32 else dtype)
    x_ref, res_ref = x.clone(), residual.clone()
    reference.fused_add_rms_norm_(x_ref, res_ref, weight, 1e-5)
    cuda_ops.fused_add_rms_norm_(x, residual, weight, 1e-5)
    assert torch.equal(residual, res_ref)  # fp32 add, one rounding: bit-exact
    assert _rel_err(x, x_ref) < _tol(dtype)


@pytest.mark.parametrize("dtype", ALL)
@pytest.mark.parametrize(("num_tokens", "hidden"), [(1, 2048), (64, 4096), (5, 24)])
def test_rms_norm_writes_every_element(dtype, num_tokens, hidden):
    g = _gen(hidden)
    x = _randn(g, num_tokens, hidden, dtype=dtype)
    weight = _randn(g, hidden, dtype=dtype)
    before = x.clone()
    _poison_allocator(x.numel() * x.element_size())
    y = cuda_ops.rms_norm(x, weight, 1e-6)
    assert torch.equal(x, before)
    assert _rel_err(y, reference.rms_norm(x, weight, 1e-6)) < _tol(dtype)


def _split_qkv(qkv: torch.Tensor, num_q_heads: int, num_kv_heads: int, head_dim: int):
    """q, k, v as [T, H, D] views of one [T, (Hq + 2 Hkv) D] tensor, as the model makes them."""
    sizes = [num_q_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim]
    return tuple(t.unflatten(-1, (-1, head_dim)) for t in qkv.split(sizes, dim=-1))


def _cos_sin(max_pos: int, head_dim: int) -> torch.Tensor:
    inv_freq = 1.0 / 500000.0 ** (torch.arange(0, head_dim, 2, device=DEV).float() / head_dim)
    angles = torch.arange(max_pos, device=DEV).float()[:, None] * inv_freq[None, :]
    return torch.cat((angles.cos(), angles.sin()), dim=-1)


@pytest.mark.parametrize("dtype", ALL)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize(("num_q_heads", "num_kv_heads"), [(32, 8), (8, 8), (28, 4)])
@pytest.mark.parametrize("num_tokens", [1, 37])
def test_rotary_embedding_on_qkv_views(dtype, head_dim, num_q_heads, num_kv_heads, num_tokens):
    g = _gen(head_dim * num_q_heads + num_tokens)
    max_pos = 8192
    cos_sin = _cos_sin(max_pos, head_dim)
    positions = torch.randint(0, max_pos, (num_tokens,), generator=g, device=DEV)
    qkv = _randn(g, num_tokens, (num_q_heads + 2 * num_kv_heads) * head_dim, dtype=dtype)
    qkv_ref = qkv.clone()
    q, k, v = _split_qkv(qkv, num_q_heads, num_kv_heads, head_dim)
    q_ref, k_ref, v_ref = _split_qkv(qkv_ref, num_q_heads, num_kv_heads, head_dim)
    reference.rotary_embedding_(positions, q_ref, k_ref, cos_sin)
    cuda_ops.rotary_embedding_(positions, q, k, cos_sin)
    assert _rel_err(q, q_ref) < _tol(dtype)
    assert _rel_err(k, k_ref) < _tol(dtype)
    assert torch.equal(v, v_ref)  # v untouched


@pytest.mark.parametrize("dtype", ALL)
@pytest.mark.parametrize(("num_tokens", "inter", "pad"), [(1, 14336, 0), (45, 344, 8), (5, 7, 1)])
def test_silu_and_mul(dtype, num_tokens, inter, pad):
    g = _gen(inter)
    x = _randn(g, num_tokens, 2 * inter + pad, dtype=dtype, scale=3.0)[:, : 2 * inter]
    _poison_allocator(num_tokens * inter * x.element_size())
    y = cuda_ops.silu_and_mul(x)
    assert y.shape == (num_tokens, inter)
    assert _rel_err(y, reference.silu_and_mul(x)) < _tol(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("num_kv_heads", [1, 8])
def test_store_kv_bit_exact(dtype, head_dim, block_size, num_kv_heads):
    g = _gen(head_dim + block_size + num_kv_heads)
    num_blocks, num_tokens, num_q_heads = 20, 50, 2 * num_kv_heads
    kv_layer = _randn(g, num_blocks, 2, num_kv_heads, block_size, head_dim, dtype=dtype)
    # distinct slots (a repeated slot would race), block boundaries and skipped tokens
    edges = torch.tensor([block_size - 1, block_size, num_blocks * block_size - 1], device=DEV)
    perm = torch.randperm(num_blocks * block_size, generator=g, device=DEV)
    perm = perm[~torch.isin(perm, edges)]
    skip = torch.full((2,), -1, device=DEV)
    slots = torch.cat((edges, skip, perm[: num_tokens - 5]))[torch.randperm(num_tokens, device=DEV)]
    qkv = _randn(g, num_tokens, (num_q_heads + 2 * num_kv_heads) * head_dim, dtype=dtype)
    _, k, v = _split_qkv(qkv, num_q_heads, num_kv_heads, head_dim)
    expected = kv_layer.clone()
    reference.store_kv_(k, v, expected, slots)
    cuda_ops.store_kv_(k, v, kv_layer, slots)
    assert torch.equal(kv_layer, expected)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("num_kv_heads", [1, 8])
@pytest.mark.parametrize("pool", ["device", "pinned host"])
def test_load_kv_bit_exact(dtype, head_dim, block_size, num_kv_heads, pool):
    """Into strided rows, from the GPU pool or through the pinned host pool's mapped address."""
    g = _gen(head_dim + block_size + num_kv_heads + 1)
    num_blocks, num_tokens, num_q_heads = 20, 50, 2 * num_kv_heads
    kv_layer = _randn(g, num_blocks, 2, num_kv_heads, block_size, head_dim, dtype=dtype)
    if pool == "pinned host":
        kv_layer = kv_layer.cpu().pin_memory()
    edges = torch.tensor([block_size - 1, block_size, num_blocks * block_size - 1], device=DEV)
    picks = torch.randint(0, num_blocks * block_size, (num_tokens - 7,), generator=g, device=DEV)
    skip = torch.full((4,), -1, device=DEV)  # rows left as they are
    slots = torch.cat((edges, skip, picks))[torch.randperm(num_tokens, device=DEV)]
    qkv = _randn(g, num_tokens, (num_q_heads + 2 * num_kv_heads) * head_dim, dtype=dtype)
    _, k, v = _split_qkv(qkv, num_q_heads, num_kv_heads, head_dim)
    expected_k, expected_v = k.clone(), v.clone()
    reference.load_kv_(kv_layer, slots, expected_k, expected_v)
    cuda_ops.load_kv_(kv_layer, slots, k, v)
    torch.cuda.synchronize()
    assert torch.equal(k, expected_k) and torch.equal(v, expected_v)


def test_load_kv_refuses_pageable_host_memory():
    kv_layer = torch.zeros(4, 2, 1, 16, 64, dtype=torch.bfloat16)
    k = torch.zeros(3, 1, 64, dtype=torch.bfloat16, device=DEV)
    slots = torch.zeros(3, dtype=torch.int64, device=DEV)
    with pytest.raises(cuda_ops.CudaKernelError, match="pinned"):
        cuda_ops.load_kv_(kv_layer, slots, k, k.clone())


def _decode_case(g, lens, num_q_heads, num_kv_heads, head_dim, block_size, dtype, padding=3):
    """A pool with the requests' blocks scattered at random; table padding holds junk ids."""
    blocks_per_req = [math.ceil(n / block_size) for n in lens]
    num_blocks = sum(blocks_per_req) + 7
    kv_layer = _randn(g, num_blocks, 2, num_kv_heads, block_size, head_dim, dtype=dtype)
    perm = torch.randperm(num_blocks, generator=g, device=DEV).to(torch.int32)
    width = max(blocks_per_req) + padding
    tables = torch.full((len(lens), width), 1 << 30, dtype=torch.int32, device=DEV)
    start = 0
    for b, n in enumerate(blocks_per_req):
        tables[b, :n] = perm[start : start + n]
        start += n
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=DEV)
    q = _randn(g, len(lens), num_q_heads, head_dim, dtype=dtype)
    return q, kv_layer, tables, seq_lens


# (num_q_heads, num_kv_heads): GQA groups 1, 2, 4, 8 and groups 7, 6, 12 (head tiles 1, 2, 4)
DECODE_SHAPES = [(8, 8), (16, 8), (32, 8), (64, 8), (28, 4), (24, 4), (48, 4)]


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize(("num_q_heads", "num_kv_heads"), DECODE_SHAPES)
def test_paged_decode_attention_shapes(dtype, head_dim, block_size, num_q_heads, num_kv_heads):
    g = _gen(head_dim * block_size + num_q_heads * 7 + num_kv_heads)
    lens = [1, block_size, block_size + 1, 2 * block_size - 1, 77, 1000]
    lens += torch.randint(1, 3000, (11,), generator=g, device=DEV).tolist()
    q, kv_layer, tables, seq_lens = _decode_case(
        g, lens, num_q_heads, num_kv_heads, head_dim, block_size, dtype
    )
    scale = head_dim**-0.5
    out = torch.full_like(q, float("nan"))
    cuda_ops.paged_decode_attention(q, kv_layer, tables, seq_lens, scale, out=out)
    ref = reference.paged_decode_attention(q, kv_layer, tables, seq_lens, scale)
    assert _rel_err(out, ref) < _tol(dtype)
    again = cuda_ops.paged_decode_attention(q, kv_layer, tables, seq_lens, scale)
    assert torch.equal(again, out)  # deterministic: a difference would mean a race


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize(
    "lens", [[32768], [32768, 1], [1, 300, 5000, 32768], [4095, 4096, 4097], [2, 1, 3]]
)
def test_paged_decode_attention_long_contexts_split(dtype, lens):
    """Few requests with long contexts take the split-KV path and its merge."""
    g = _gen(sum(lens))
    q, kv_layer, tables, seq_lens = _decode_case(g, lens, 32, 8, 128, 16, dtype)
    splits = cuda_ops._max_splits(len(lens), 32, 8, tables.shape[1] * 16, cuda_ops._num_sms(0))
    assert splits > 1 or max(lens) < 512
    _poison_allocator(q.numel() * q.element_size())
    out = cuda_ops.paged_decode_attention(q, kv_layer, tables, seq_lens, 0.088)
    ref = reference.paged_decode_attention(q, kv_layer, tables, seq_lens, 0.088)
    assert _rel_err(out, ref) < _tol(dtype)


def test_paged_decode_attention_strided_q_and_zero_length_rows():
    g = _gen(11)
    lens = [0, 40, 0, 3]
    case = _decode_case(g, [max(n, 1) for n in lens], 32, 8, 128, 16, torch.bfloat16)
    q, kv_layer, tables, _ = case
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=DEV)
    wide = _randn(g, 4, 48 * 128, dtype=torch.bfloat16)  # rows of [q | k | v] as the model has
    q_view = wide[:, : 32 * 128].unflatten(-1, (32, 128))
    q_view.copy_(q)
    out = torch.full_like(q, float("nan"))
    cuda_ops.paged_decode_attention(q_view, kv_layer, tables, seq_lens, 0.1, out=out)
    assert torch.equal(out[0], torch.zeros_like(out[0])) and torch.equal(out[2], out[0])
    ref = reference.paged_decode_attention(q, kv_layer, tables, seq_lens, 0.1)
    assert _rel_err(out, ref) < 1e-2


def test_paged_decode_attention_rejects_unsupported_head_dim():
    g = _gen(3)
    q, kv_layer, tables, seq_lens = _decode_case(g, [5], 8, 8, 96, 16, torch.bfloat16)
    with pytest.raises(cuda_ops.CudaKernelError, match="unsupported"):
        cuda_ops.paged_decode_attention(q, kv_layer, tables, seq_lens, 0.1)
    # ops falls back to the reference for shapes without a specialization
    out = ops.paged_decode_attention(q, kv_layer, tables, seq_lens, 0.1)
    assert (
        _rel_err(out, reference.paged_decode_attention(q, kv_layer, tables, seq_lens, 0.1)) < 1e-6
    )


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize(
    ("num_q_heads", "num_kv_heads", "head_dim"), [(32, 8, 128), (8, 8, 64), (28, 4, 128)]
)
def test_prefill_attention_flash_gqa(dtype, num_q_heads, num_kv_heads, head_dim):
    g = _gen(num_q_heads + head_dim)
    lens = [1, 17, 128, 1000]
    total = sum(lens)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=DEV)
    qkv = _randn(g, total, (num_q_heads + 2 * num_kv_heads) * head_dim, dtype=dtype)
    q, k, v = _split_qkv(qkv, num_q_heads, num_kv_heads, head_dim)
    out = ops.prefill_attention(q, k, v, cu, max(lens), head_dim**-0.5)
    ref = reference.prefill_attention(q, k, v, cu, max(lens), head_dim**-0.5)
    assert out.shape == q.shape
    assert _rel_err(out, ref) < _tol(dtype)


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize(("num_q_heads", "num_kv_heads", "head_dim"), [(32, 8, 128), (28, 4, 128)])
def test_prefill_attention_flash_over_a_prefix(dtype, num_q_heads, num_kv_heads, head_dim):
    """Chunks after their prefix: flash must align the causal mask bottom-right, as the reference
    does."""
    lens_k, lens_q = [1000, 1, 33, 0, 17, 512, 300], [200, 1, 17, 0, 17, 16, 300]
    q, k, v, cu_q, cu_k, _, _ = chunk_case(torch.Generator().manual_seed(num_q_heads), lens_k,
                                           lens_q, num_kv_heads,
                                           num_q_heads // num_kv_heads, head_dim, dtype, DEV)
    scale = head_dim**-0.5
    out = ops.prefill_attention(q, k, v, cu_q, max(lens_q), scale, cu_k, max(lens_k))
    ref = reference.prefill_attention(q, k, v, cu_q, max(lens_q), scale, cu_k)
    assert out.shape == q.shape
    assert _rel_err(out, ref) < _tol(dtype)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16)


@pytest.mark.parametrize("method", ["memcpy", "kernel"])
@pytest.mark.parametrize("own_stream", [False, True])
def test_swap_round_trip_bit_exact(method, own_stream):
    g = _gen(5)
    shape = (4, 64, 2, 8, 16, 128)
    gpu_pool = _randn(g, *shape, dtype=torch.bfloat16)
    host_pool = torch.randn((shape[0], 40, *shape[2:])).to(torch.bfloat16).pin_memory()
    host_before = host_pool.clone()
    # runs of consecutive ids (merged into one copy) and scattered ids
    pairs = torch.tensor([[3, 0], [4, 1], [5, 2], [60, 39], [10, 17], [0, 5], [1, 6], [33, 20]])
    layers = [0, 2, 3]
    stream = torch.cuda.Stream() if own_stream else None
    cuda_ops.swap_blocks(gpu_pool, host_pool, pairs, layers, stream, method)
    torch.cuda.synchronize()
    expected = host_before.clone()
    for layer in layers:
        expected[layer, pairs[:, 1]] = gpu_pool[layer, pairs[:, 0]].cpu()
    assert torch.equal(_bits(host_pool), _bits(expected))

    back = torch.full_like(gpu_pool, float("nan"))
    back_pairs = pairs.flip(1)  # host block -> original GPU block
    cuda_ops.swap_blocks(host_pool, back, back_pairs, layers, stream, method)
    torch.cuda.synchronize()
    for layer in range(shape[0]):
        moved = back[layer, pairs[:, 0]]
        if layer in layers:
            assert torch.equal(_bits(moved), _bits(gpu_pool[layer, pairs[:, 0]]))
        else:
            assert torch.isnan(moved.float()).all()
    untouched = torch.ones(shape[1], dtype=torch.bool)
    untouched[pairs[:, 0]] = False
    assert torch.isnan(back[:, untouched].float()).all()


def test_ops_dispatch_uses_the_library_on_cuda():
    g = _gen(8)
    x = _randn(g, 3, 2 * 256, dtype=torch.bfloat16)
    assert cuda_ops.loaded()
    assert torch.equal(ops.silu_and_mul(x), cuda_ops.silu_and_mul(x))
    shape = (2, 8, 2, 2, 16, 64)
    src = _randn(g, *shape, dtype=torch.bfloat16)
    dst = torch.zeros(shape, dtype=torch.bfloat16).pin_memory()
    ops.swap_blocks(src, dst, torch.tensor([[1, 7], [6, 0]]))
    torch.cuda.synchronize()
    assert torch.equal(dst[:, 7], src[:, 1].cpu()) and torch.equal(dst[:, 0], src[:, 6].cpu())


def test_stream_flags_hold_and_announce_work_without_host_waits():
    flags = torch.zeros(4, dtype=torch.int32, pin_memory=True)
    stream = torch.cuda.Stream()
    x = torch.zeros(1 << 20, device=DEV)
    host = torch.empty(1 << 20, pin_memory=True)
    with torch.cuda.stream(stream):
        cuda_ops.stream_wait_flag(flags, 1, 7, stream)
        x.fill_(3.0)
        host.copy_(x, non_blocking=True)
        cuda_ops.stream_write_flag(flags, 2, 9, stream)
    time.sleep(0.05)
    assert not stream.query(), "the stream ran past a flag nobody set"
    assert int(flags[2]) == 0
    flags[1] = 6  # not the awaited value: still held
    time.sleep(0.05)
    assert not stream.query()
    flags[1] = 7
    deadline = time.monotonic() + 10
    while int(flags[2]) != 9:  # the host sees the flag without synchronising the stream
        assert time.monotonic() < deadline, "the stream never wrote its flag"
    assert bool((host == 3.0).all()), "the flag became visible before the copy it follows"
    stream.synchronize()
    assert int(flags[0]) == 0 and int(flags[3]) == 0


def test_stream_flags_reject_unpinned_or_out_of_range_flags():
    stream = torch.cuda.current_stream()
    with pytest.raises(cuda_ops.CudaKernelError, match="pinned"):
        cuda_ops.stream_write_flag(torch.zeros(2, dtype=torch.int32), 0, 1, stream)
    with pytest.raises(cuda_ops.CudaKernelError, match="out of range"):
        cuda_ops.stream_wait_flag(torch.zeros(2, dtype=torch.int32, pin_memory=True), 2, 1, stream)


def test_handoff_joins_waits_copies_records_and_announces_in_order():
    flags = torch.zeros(4, dtype=torch.int32, pin_memory=True)
    compute, copy = torch.cuda.Stream(), torch.cuda.Stream()
    joined, copied = cuda_ops.event_create(), cuda_ops.event_create()
    rows, width, pitch = 5, 96, 160  # bytes: strided rows on the device, packed on the host
    src = torch.zeros(rows, pitch, dtype=torch.uint8, device=DEV)
    dst = torch.zeros(rows, width, dtype=torch.uint8, pin_memory=True)
    late = torch.randint(0, 255, (rows, pitch), dtype=torch.uint8, device=DEV)
    waiter, marker = torch.cuda.Stream(), torch.zeros(1, device=DEV)
    try:
        with torch.cuda.stream(compute):
            torch.cuda._sleep(200_000_000)  # ~0.1 s: outlasts the flag wait below
            src.copy_(late)
        cuda_ops.handoff(
            compute.cuda_stream, joined, copy.cuda_stream,
            cuda_ops.flag_address(flags, 1), 7,
            dst.data_ptr(), width, src.data_ptr(), pitch, width, rows,
            copied, cuda_ops.flag_address(flags, 2), 9,
        )  # fmt: skip
        # A stream waiting on `copied` is held until the copy has run: an event never recorded
        # would not hold it.
        cuda_ops.stream_wait_event(waiter.cuda_stream, copied)
        with torch.cuda.stream(waiter):
            marker.fill_(1.0)
        time.sleep(0.05)
        assert int(flags[2]) == 0, "announced before the CPU's flag was set"
        assert not waiter.query(), "the copy's event was not recorded by the hand-off"
        flags[1] = 7
        deadline = time.monotonic() + 10
        while int(flags[2]) != 9:
            assert time.monotonic() < deadline, "the copy stream never set its flag"
        assert torch.equal(dst, late[:, :width].cpu()), "the copy ran before the compute stream"
        waiter.synchronize()
        assert float(marker) == 1.0
        copy.synchronize()
        # One packed range, no join, no flags: the two directions' common case.
        back = torch.zeros(rows * width, dtype=torch.uint8, device=DEV)
        cuda_ops.handoff(
            0, None, copy.cuda_stream, None, 0,
            back.data_ptr(), 0, dst.data_ptr(), 0, rows * width, 1, None, None, 0,
        )  # fmt: skip
        copy.synchronize()
        assert torch.equal(back.view(rows, width).cpu(), dst)
        with pytest.raises(cuda_ops.CudaKernelError, match="invalid argument"):
            cuda_ops.handoff(
                0, None, copy.cuda_stream, None, 0,
                dst.data_ptr(), width, src.data_ptr(), width - 1, width, 2, None, None, 0,
            )  # fmt: skip
    finally:
        torch.cuda.synchronize()
        cuda_ops.event_destroy(joined)
        cuda_ops.event_destroy(copied)
