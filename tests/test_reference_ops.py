"""The torch references against naive, independent float64 formulations.

The references are the ground truth for the CUDA kernels and the CPU-host implementation, so each
one is checked here against a deliberately different formulation: loops over tokens, complex-number
rotation, explicit masks. Inputs are fresh random data with odd sizes and block boundaries.
"""

from __future__ import annotations

import itertools
import math
import re
from pathlib import Path

import pytest
import torch

from neod.kernels import cuda_ops, ops, reference

DTYPES = [torch.float32, torch.bfloat16]


def _tol(dtype: torch.dtype) -> float:
    # fp32 compute against float64: rounding only; bf16: one rounding of the stored result
    return 1e-5 if dtype == torch.float32 else 8e-3


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out64, ref64 = out.double(), ref.double()
    assert not torch.isnan(out64).any()
    return float((out64 - ref64).norm() / ref64.norm().clamp_min(1e-30))


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("num_tokens", "hidden"), [(1, 64), (7, 96), (33, 4096)])
def test_fused_add_rms_norm_matches_float64(dtype, num_tokens, hidden):
    g = _gen(num_tokens * hidden)
    x = torch.randn(num_tokens, hidden, generator=g).to(dtype)
    residual = torch.randn(num_tokens, hidden, generator=g).to(dtype)
    weight = torch.rand(hidden, generator=g) + 0.5
    eps = 1e-5
    want_residual = x.double() + residual.double()
    stored = want_residual.to(dtype).double()
    want_x = torch.empty_like(stored)
    for t in range(num_tokens):
        row = stored[t]
        want_x[t] = row / math.sqrt(float((row * row).sum()) / hidden + eps) * weight.double()
    reference.fused_add_rms_norm_(x, residual, weight, eps)
    assert _rel_err(residual, want_residual) < _tol(dtype)
    assert _rel_err(x, want_x) < _tol(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_matches_float64_and_keeps_input(dtype):
    g = _gen(1)
    x = torch.randn(5, 128, generator=g).to(dtype) * 3
    before = x.clone()
    weight = torch.randn(128, generator=g)
    y = reference.rms_norm(x, weight, 1e-6)
    x64 = x.double()
    want = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-6) * weight.double()
    assert y.dtype == dtype
    assert torch.equal(x, before)
    assert _rel_err(y, want) < _tol(dtype)


def _cos_sin_table(max_pos: int, head_dim: int, base: float = 10000.0) -> torch.Tensor:
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.arange(max_pos, dtype=torch.float64)[:, None] * inv_freq[None, :]
    return torch.cat((angles.cos(), angles.sin()), dim=-1).float()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("num_q_heads", "num_kv_heads", "head_dim"), [(4, 4, 64), (8, 2, 128)])
def test_rotary_embedding_matches_complex_rotation(dtype, num_q_heads, num_kv_heads, head_dim):
    g = _gen(head_dim + num_kv_heads)
    max_pos, num_tokens = 500, 11
    cos_sin = _cos_sin_table(max_pos, head_dim)
    positions = torch.randint(0, max_pos, (num_tokens,), generator=g)
    q = torch.randn(num_tokens, num_q_heads, head_dim, generator=g).to(dtype)
    k = torch.randn(num_tokens, num_kv_heads, head_dim, generator=g).to(dtype)
    half = head_dim // 2
    inv_freq = 1.0 / 10000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = positions.double()[:, None] * inv_freq[None, :]
    phase = torch.polar(torch.ones_like(angles), angles)[:, None, :]  # [T, 1, D/2]

    def rotate(t: torch.Tensor) -> torch.Tensor:
        t64 = t.double()
        z = torch.complex(t64[..., :half], t64[..., half:]) * phase
        return torch.cat((z.real, z.imag), dim=-1)

    want_q, want_k = rotate(q), rotate(k)
    reference.rotary_embedding_(positions, q, k, cos_sin)
    assert _rel_err(q, want_q) < _tol(dtype)
    assert _rel_err(k, want_k) < _tol(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("num_tokens", "inter"), [(1, 8), (9, 344)])
def test_silu_and_mul_matches_float64(dtype, num_tokens, inter):
    g = _gen(inter)
    x = torch.randn(num_tokens, 2 * inter, generator=g).to(dtype) * 4
    y = reference.silu_and_mul(x)
    gate, up = x.double()[:, :inter], x.double()[:, inter:]
    want = gate / (1 + torch.exp(-gate)) * up
    assert y.shape == (num_tokens, inter) and y.dtype == dtype
    assert _rel_err(y, want) < _tol(dtype)


def _random_kv_layer(g, num_blocks, num_kv_heads, block_size, head_dim, dtype):
    return torch.randn(num_blocks, 2, num_kv_heads, block_size, head_dim, generator=g).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", [16, 32])
def test_store_kv_writes_slots_and_skips_minus_one(dtype, block_size):
    g = _gen(block_size)
    num_blocks, num_kv_heads, head_dim, num_tokens = 9, 2, 64, 13
    kv_layer = _random_kv_layer(g, num_blocks, num_kv_heads, block_size, head_dim, dtype)
    before = kv_layer.clone()
    # distinct slots, block boundaries and a skipped token
    edges = torch.tensor([block_size - 1, block_size])
    perm = torch.randperm(num_blocks * block_size, generator=g)
    perm = perm[~torch.isin(perm, edges)]
    slots = torch.cat((edges, torch.tensor([-1]), perm[: num_tokens - 3]))
    k = torch.randn(num_tokens, num_kv_heads, head_dim, generator=g).to(dtype)
    v = torch.randn(num_tokens, num_kv_heads, head_dim, generator=g).to(dtype)
    reference.store_kv_(k, v, kv_layer, slots)
    expected = before.clone()
    for t, slot in enumerate(slots.tolist()):
        if slot < 0:
            continue
        block, offset = divmod(slot, block_size)
        for h in range(num_kv_heads):
            expected[block, 0, h, offset] = k[t, h]
            expected[block, 1, h, offset] = v[t, h]
    assert torch.equal(kv_layer, expected)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", [16, 32])
def test_load_kv_reads_slots_and_leaves_minus_one_rows(dtype, block_size):
    g = _gen(block_size + 1)
    num_blocks, num_kv_heads, head_dim = 9, 2, 64
    kv_layer = _random_kv_layer(g, num_blocks, num_kv_heads, block_size, head_dim, dtype)
    # block boundaries, a repeated slot and rows to leave alone
    slots = torch.tensor([block_size - 1, -1, block_size, 5, 5, -1, num_blocks * block_size - 1])
    k = torch.randn(len(slots), num_kv_heads, head_dim, generator=g).to(dtype)
    v = torch.randn(len(slots), num_kv_heads, head_dim, generator=g).to(dtype)
    expected_k, expected_v = k.clone(), v.clone()
    for t, slot in enumerate(slots.tolist()):
        if slot >= 0:
            block, offset = divmod(slot, block_size)
            expected_k[t] = kv_layer[block, 0, :, offset]
            expected_v[t] = kv_layer[block, 1, :, offset]
    reference.load_kv_(kv_layer, slots, k, v)
    assert torch.equal(k, expected_k) and torch.equal(v, expected_v)


def _naive_decode(q, kv_layer, block_tables, seq_lens, scale):
    batch, num_q_heads, head_dim = q.shape
    num_kv_heads, block_size = kv_layer.shape[2], kv_layer.shape[3]
    group = num_q_heads // num_kv_heads
    out = torch.zeros(batch, num_q_heads, head_dim, dtype=torch.float64)
    for b in range(batch):
        length = int(seq_lens[b])
        for h in range(num_q_heads):
            kvh = h // group
            scores, values = [], []
            for t in range(length):
                block = int(block_tables[b, t // block_size])
                key = kv_layer[block, 0, kvh, t % block_size].double()
                values.append(kv_layer[block, 1, kvh, t % block_size].double())
                scores.append(float(q[b, h].double() @ key) * scale)
            if not scores:
                continue
            peak = max(scores)
            weights = [math.exp(s - peak) for s in scores]
            total = sum(weights)
            for w, val in zip(weights, values, strict=True):
                out[b, h] += w / total * val
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group", [1, 2, 4, 8])
@pytest.mark.parametrize("block_size", [16, 32])
def test_paged_decode_attention_matches_token_loop(dtype, group, block_size):
    g = _gen(group * block_size)
    num_kv_heads, head_dim, num_blocks = 2, 64, 40
    kv_layer = _random_kv_layer(g, num_blocks, num_kv_heads, block_size, head_dim, dtype)
    seq_lens = torch.tensor(
        [1, block_size, block_size + 1, 3 * block_size - 1, 77], dtype=torch.int32
    )
    max_blocks = 8
    batch = seq_lens.numel()
    # random blocks per request; entries past a request's length hold ids that must never be read
    block_tables = torch.full((batch, max_blocks), 10_000, dtype=torch.int32)
    for b in range(batch):
        needed = -(-int(seq_lens[b]) // block_size)
        block_tables[b, :needed] = torch.randperm(num_blocks, generator=g)[:needed]
    q = torch.randn(batch, num_kv_heads * group, head_dim, generator=g).to(dtype)
    scale = head_dim**-0.5
    out = reference.paged_decode_attention(q, kv_layer, block_tables, seq_lens, scale)
    want = _naive_decode(q, kv_layer, block_tables, seq_lens, scale)
    assert out.dtype == dtype and out.shape == q.shape
    assert _rel_err(out, want) < _tol(dtype)


def test_paged_decode_attention_writes_given_out_and_zero_length_rows():
    g = _gen(5)
    kv_layer = _random_kv_layer(g, 6, 1, 16, 64, torch.float32)
    q = torch.randn(2, 2, 64, generator=g)
    block_tables = torch.tensor([[3, 1], [0, 0]], dtype=torch.int32)
    seq_lens = torch.tensor([20, 0], dtype=torch.int32)
    out = torch.full_like(q, float("nan"))
    result = reference.paged_decode_attention(q, kv_layer, block_tables, seq_lens, 0.125, out=out)
    assert result is out
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    want = _naive_decode(q, kv_layer, block_tables, seq_lens, 0.125)
    assert _rel_err(out, want) < 1e-5


def _naive_prefill(q, k, v, cu_seqlens, scale):
    group = q.shape[1] // k.shape[1]
    out = torch.zeros(q.shape, dtype=torch.float64)
    bounds = cu_seqlens.tolist()
    for start, stop in itertools.pairwise(bounds):
        n = stop - start
        mask = torch.ones(n, n, dtype=torch.bool).tril()
        for h in range(q.shape[1]):
            qs = q[start:stop, h].double()
            ks = k[start:stop, h // group].double()
            vs = v[start:stop, h // group].double()
            scores = (qs @ ks.T * scale).masked_fill(~mask, float("-inf"))
            out[start:stop, h] = torch.softmax(scores, dim=-1) @ vs
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group", [1, 4])
def test_prefill_attention_is_causal_per_prompt(dtype, group):
    g = _gen(group)
    lens = [1, 17, 0, 40]
    cu_seqlens = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    total, num_kv_heads, head_dim = sum(lens), 2, 64
    q = torch.randn(total, num_kv_heads * group, head_dim, generator=g).to(dtype)
    k = torch.randn(total, num_kv_heads, head_dim, generator=g).to(dtype)
    v = torch.randn(total, num_kv_heads, head_dim, generator=g).to(dtype)
    scale = 0.1
    out = reference.prefill_attention(q, k, v, cu_seqlens, max(lens), scale)
    assert out.dtype == dtype
    assert _rel_err(out, _naive_prefill(q, k, v, cu_seqlens, scale)) < _tol(dtype)


def chunk_case(g, lens_k, lens_q, num_kv_heads, group, head_dim, dtype, device="cpu"):
    """Prompts of lens_k tokens whose last lens_q are this step's queries (a chunk after its
    prefix): (q of the chunks, packed k, v of the whole prompts, cu_q, cu_k, the whole prompts' q,
    rows of the chunks among them)."""
    total = sum(lens_k)
    whole_q = torch.randn(total, num_kv_heads * group, head_dim, generator=g).to(dtype)
    k = torch.randn(total, num_kv_heads, head_dim, generator=g).to(dtype)
    v = torch.randn(total, num_kv_heads, head_dim, generator=g).to(dtype)
    cu_k = [0, *itertools.accumulate(lens_k)]
    rows = [r for end, n in zip(cu_k[1:], lens_q, strict=True) for r in range(end - n, end)]
    cu_q = [0, *itertools.accumulate(lens_q)]
    as_t = lambda xs: torch.tensor(xs, dtype=torch.int32, device=device)  # noqa: E731
    return (whole_q[rows].to(device), k.to(device), v.to(device), as_t(cu_q), as_t(cu_k),
            whole_q, torch.tensor(rows))  # fmt: skip


# (keys, queries) per prompt: no prefix, one query, a chunk ending on / crossing a block boundary,
# an empty prompt.
CHUNKS = ([40, 1, 33, 0, 17, 64], [12, 1, 17, 0, 17, 16])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group", [1, 4])
def test_prefill_attention_over_a_prefix_gives_the_whole_prompts_last_rows(dtype, group):
    g = _gen(7 + group)
    lens_k, lens_q = CHUNKS
    q, k, v, cu_q, cu_k, whole_q, rows = chunk_case(g, lens_k, lens_q, 2, group, 64, dtype)
    out = reference.prefill_attention(q, k, v, cu_q, max(lens_q), 0.1, cu_k)
    want = _naive_prefill(whole_q, k, v, cu_k, 0.1)[rows]
    assert out.dtype == dtype
    assert _rel_err(out, want) < _tol(dtype)


@pytest.mark.parametrize("layers", [None, [1], [0, 2]])
def test_swap_blocks_copies_chosen_block_layers_only(layers):
    g = _gen(3)
    shape = (3, 10, 2, 2, 16, 64)
    src = torch.randn(shape, generator=g).to(torch.bfloat16)
    dst = torch.randn(shape, generator=g).to(torch.bfloat16)
    before = dst.clone()
    pairs = torch.tensor([[0, 9], [4, 4], [9, 0], [5, 6]], dtype=torch.int64)
    reference.swap_blocks(src, dst, pairs, layers)
    expected = before.clone()
    for layer in range(shape[0]) if layers is None else layers:
        for s, d in pairs.tolist():
            expected[layer, d] = src[layer, s]
    assert torch.equal(dst, expected)


def test_ops_dispatch_to_reference_on_cpu():
    g = _gen(9)
    x = torch.randn(4, 2 * 32, generator=g)
    assert torch.equal(ops.silu_and_mul(x), reference.silu_and_mul(x))
    weight = torch.randn(64, generator=g)
    assert torch.equal(ops.rms_norm(x, weight, 1e-6), reference.rms_norm(x, weight, 1e-6))


def _c_letter(c_type: str) -> str:
    c_type = c_type.replace("const ", "").strip()
    if c_type == "char*":
        return "s"
    if "*" in c_type or c_type in ("cudaStream_t", "cudaEvent_t"):
        return "p"
    return {"int": "i", "int64_t": "l", "uint32_t": "u", "float": "f"}[c_type]


def test_ctypes_signatures_match_the_c_header():
    """The ctypes declarations in cuda_ops must match cuda/neod_cuda.h (checked without a GPU)."""
    header = (Path(__file__).resolve().parents[1] / "cuda" / "neod_cuda.h").read_text()
    declared = {}
    for ret, name, args in re.findall(r"NEOD_API\s+([\w\s*]+?)\s*(neod_\w+)\(([^)]*)\);", header):
        params = [] if args.strip() == "void" else [a.strip() for a in args.split(",")]
        letters = "".join(
            _c_letter(p.rsplit(" ", 1)[0] + ("*" if "*" in p else "")) for p in params
        )
        declared[name] = f"{_c_letter(ret)}:{letters}"
    assert declared == cuda_ops._SIGNATURES
