"""Torch reference of every kernel entry point.

These functions are the ground truth the CUDA kernels are tested against and the implementation
used on hosts without the CUDA library. They run on any device and any float dtype and always
compute in fp32, rounding once when the result is stored. They are vectorised (no Python loop per
token) so that a CPU-only host serves at a usable speed; prefill attention loops per prompt only.

Layouts follow docs/architecture.md: a KV layer is `[num_blocks, 2, num_kv_heads, block_size,
head_dim]` with K at index 0 and V at index 1; a slot id is `block_id * block_size + slot`.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Sequence

import torch
import torch.nn.functional as F

# Bytes of fp32 scores + gathered fp32 K/V one decode-attention chunk may materialise; bounds the
# reference's peak memory on long contexts without a loop per request.
_DECODE_CHUNK_BYTES = 256 << 20


def fused_add_rms_norm_(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> None:
    """In place: `residual += x`, then `x = rmsnorm(residual) * weight`.

    The norm reads the residual as stored (rounded to its dtype), so the result does not depend on
    whether the sum was kept in a register; the CUDA kernel does the same.
    """
    # x, residual: [T, H]; weight: [H]
    summed = x.float() + residual.float()
    residual.copy_(summed)
    x.copy_(_rms_norm_fp32(residual.float(), weight, eps))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`rmsnorm(x) * weight` in fp32, returned in x's dtype."""
    # x: [T, H]; weight: [H] -> [T, H]
    return _rms_norm_fp32(x.float(), weight, eps).to(x.dtype)


def _rms_norm_fp32(x32: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    inv_rms = torch.rsqrt(x32.square().mean(dim=-1, keepdim=True) + eps)
    return x32 * inv_rms * weight.float()


def rotary_embedding_(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin: torch.Tensor
) -> None:
    """Rotate q and k in place, rotate-half (GPT-NeoX / HF Llama) style.

    Element i of the first half pairs with element i of the second half:
    `(x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin)`.
    """
    # positions: [T] int64; q: [T, Hq, D]; k: [T, Hkv, D]; cos_sin: [max_pos, D] fp32
    half = cos_sin.shape[-1] // 2
    table = cos_sin.index_select(0, positions.to(cos_sin.device))
    cos = table[:, None, :half].float()  # [T, 1, D/2]
    sin = table[:, None, half:].float()
    for t in (q, k):
        x1 = t[..., :half].float()
        x2 = t[..., half:].float()
        rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
        t.copy_(rotated)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """`silu(gate) * up` for x = [gate | up] along the last dimension."""
    # x: [T, 2I] -> [T, I]
    inter = x.shape[-1] // 2
    gate = x[..., :inter].float()
    up = x[..., inter:].float()
    return (F.silu(gate) * up).to(x.dtype)


def _slots(kv_layer: torch.Tensor, slot_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(rows with a slot, their blocks, their offsets in the block), on the layer's device."""
    block_size = kv_layer.shape[3]
    slot_ids = slot_ids.to(kv_layer.device)
    keep = slot_ids >= 0
    slots = slot_ids[keep]
    block_ids = torch.div(slots, block_size, rounding_mode="floor")
    return keep, block_ids, slots - block_ids * block_size


def store_kv_(
    k: torch.Tensor, v: torch.Tensor, kv_layer: torch.Tensor, slot_ids: torch.Tensor
) -> None:
    """Write each token's K and V into its slot; slot id -1 means skip the token."""
    # k, v: [T, Hkv, D]; kv_layer: [num_blocks, 2, Hkv, block_size, D]; slot_ids: [T] int64
    keep, block_ids, offsets = _slots(kv_layer, slot_ids)
    for which, src in ((0, k), (1, v)):
        # [num_blocks, block_size, Hkv, D] view; indexing by (block, offset) gives [n, Hkv, D]
        dst = kv_layer[:, which].transpose(1, 2)
        dst[block_ids, offsets] = src[keep.to(src.device)].to(kv_layer.dtype)


def load_kv_(
    kv_layer: torch.Tensor, slot_ids: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> None:
    """Read each row's K and V out of its slot; slot id -1 leaves the row as it is."""
    # kv_layer: [num_blocks, 2, Hkv, block_size, D]; slot_ids: [T] int64; k, v: [T, Hkv, D]
    keep, block_ids, offsets = _slots(kv_layer, slot_ids)
    for which, dst in ((0, k), (1, v)):
        src = kv_layer[:, which].transpose(1, 2)  # [num_blocks, block_size, Hkv, D]
        dst[keep.to(dst.device)] = src[block_ids, offsets].to(device=dst.device, dtype=dst.dtype)


def paged_decode_attention(
    q: torch.Tensor,
    kv_layer: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """One query token per request against its paged KV; a request with seq_len 0 gets zeros."""
    # q: [B, Hq, D]; kv_layer: [num_blocks, 2, Hkv, block_size, D]; block_tables: [B, max_blocks]
    # int32; seq_lens: [B] int32 -> out [B, Hq, D] in q's dtype
    batch, num_q_heads, head_dim = q.shape
    num_kv_heads, block_size = kv_layer.shape[2], kv_layer.shape[3]
    group = num_q_heads // num_kv_heads
    if out is None:
        out = torch.empty_like(q)
    if batch == 0:
        return out
    device = kv_layer.device
    seq_lens = seq_lens.to(device=device, dtype=torch.int64)
    block_tables = block_tables.to(device=device, dtype=torch.int64)
    max_len = int(seq_lens.max())
    if max_len == 0:
        out.zero_()
        return out
    num_blocks = -(-max_len // block_size)
    span = num_blocks * block_size
    per_request_bytes = 4 * span * (2 * num_kv_heads * head_dim + num_q_heads)
    chunk = max(1, _DECODE_CHUNK_BYTES // per_request_bytes)
    positions = torch.arange(span, device=device)
    for start in range(0, batch, chunk):
        stop = min(batch, start + chunk)
        lens = seq_lens[start:stop]
        table = block_tables[start:stop, :num_blocks]
        # Entries past a request's length may hold anything: read block 0 there, masked below.
        needed = torch.arange(num_blocks, device=device) * block_size < lens[:, None]
        table = torch.where(needed, table, torch.zeros_like(table))
        kv = kv_layer[table]  # [b, num_blocks, 2, Hkv, block_size, D]
        kv = kv.permute(2, 0, 3, 1, 4, 5).reshape(2, stop - start, num_kv_heads, span, head_dim)
        keys, values = kv[0].float(), kv[1].float()  # [b, Hkv, span, D]
        query = q[start:stop].to(device).float().view(stop - start, num_kv_heads, group, head_dim)
        scores = torch.matmul(query, keys.transpose(-1, -2)) * scale  # [b, Hkv, group, span]
        valid = positions[None, :] < lens[:, None]  # [b, span]
        scores.masked_fill_(~valid[:, None, None, :], float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        probs = torch.nan_to_num(probs, nan=0.0)  # rows of a seq_len-0 request
        result = torch.matmul(probs, values).view(stop - start, num_q_heads, head_dim)
        out[start:stop].copy_(result)
    return out


def prefill_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    scale: float,
    cu_seqlens_k: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of each packed prompt's queries over its keys; GQA by head grouping.

    With `cu_seqlens_k`, prompt p's keys are rows [cu_seqlens_k[p], cu_seqlens_k[p + 1]) of k and v,
    of which its queries are the last ones (a chunk after its prefix): query i of a prompt with n
    queries and m keys sees keys 0 .. m - n + i.
    """
    # q: [T, Hq, D]; k, v: [Tk, Hkv, D]; cu_seqlens(_k): [P+1] int32 -> out [T, Hq, D] in q's dtype
    del max_seqlen  # the per-prompt loop reads exact lengths from cu_seqlens
    out = torch.empty_like(q)
    bounds = cu_seqlens.tolist()
    key_bounds = bounds if cu_seqlens_k is None else cu_seqlens_k.tolist()
    for (start, stop), (k_start, k_stop) in zip(
        itertools.pairwise(bounds), itertools.pairwise(key_bounds), strict=True
    ):
        if stop == start:
            continue
        # SDPA wants [heads, len, D]
        qs = q[start:stop].float().transpose(0, 1)
        ks = k[k_start:k_stop].float().transpose(0, 1)
        vs = v[k_start:k_stop].float().transpose(0, 1)
        prefix = (k_stop - k_start) - (stop - start)
        visible = None
        if prefix:  # query i sees key j when j <= prefix + i; SDPA's is_causal aligns top-left
            visible = torch.ones(stop - start, k_stop - k_start, dtype=torch.bool, device=q.device)
            visible = visible.tril(diagonal=prefix)
        attn = F.scaled_dot_product_attention(
            qs, ks, vs, attn_mask=visible, is_causal=not prefix, scale=scale,
            enable_gqa=qs.shape[0] != ks.shape[0],
        )
        out[start:stop].copy_(attn.transpose(0, 1))
    return out


def swap_blocks(
    src_pool: torch.Tensor,
    dst_pool: torch.Tensor,
    block_pairs: torch.Tensor,
    layers: Sequence[int] | torch.Tensor | None = None,
    stream: torch.cuda.Stream | None = None,
) -> None:
    """Copy block-layers `src_pool[l, src] -> dst_pool[l, dst]` for every pair and chosen layer."""
    # pools: [num_layers, num_blocks, 2, Hkv, block_size, D]; block_pairs: [n, 2] int64 (src, dst)
    if block_pairs.numel() == 0:
        return
    pairs = block_pairs.to(torch.int64)
    src_ids = pairs[:, 0].to(src_pool.device)
    dst_ids = pairs[:, 1].to(dst_pool.device)
    if layers is None:
        layer_ids = torch.arange(src_pool.shape[0])
    else:
        layer_ids = torch.as_tensor(layers, dtype=torch.int64)
    if layer_ids.numel() == 0:
        return
    src_layers = layer_ids.to(src_pool.device)[:, None]
    dst_layers = layer_ids.to(dst_pool.device)[:, None]
    use_stream = stream is not None and (src_pool.is_cuda or dst_pool.is_cuda)
    ctx = torch.cuda.stream(stream) if use_stream else contextlib.nullcontext()
    with ctx:
        chunk = src_pool[src_layers, src_ids[None, :]]  # [num_layers, n, 2, Hkv, block_size, D]
        dst_pool[dst_layers, dst_ids[None, :]] = chunk.to(dst_pool.device, non_blocking=True)
