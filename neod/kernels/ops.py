"""Kernel entry points called by the model and the engine.

Each function takes the tensors described in docs/architecture.md and runs the CUDA C++ kernel when
its main tensor lives on a GPU and build/libneod_cuda.so is loaded; otherwise it runs the torch
reference (CPU hosts, tests, or a missing library). The choice is made per call from the tensor's
device, so one process can use both paths.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from neod.kernels import reference


def fused_add_rms_norm_(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> None:
    """In place: `residual += x; x = rmsnorm(residual) * weight` (fp32 math)."""
    # x, residual: [T, H]; weight: [H]
    reference.fused_add_rms_norm_(x, residual, weight, eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`rmsnorm(x) * weight` in x's dtype."""
    # x: [T, H]; weight: [H] -> [T, H]
    return reference.rms_norm(x, weight, eps)


def rotary_embedding_(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin: torch.Tensor
) -> None:
    """Rotate q and k in place (rotate-half style) by the cos/sin rows of their positions."""
    # positions: [T] int64; q: [T, Hq, D]; k: [T, Hkv, D]; cos_sin: [max_pos, D] fp32
    reference.rotary_embedding_(positions, q, k, cos_sin)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """`silu(gate) * up` for x = [gate | up]."""
    # x: [T, 2I] -> [T, I]
    return reference.silu_and_mul(x)


def store_kv_(
    k: torch.Tensor, v: torch.Tensor, kv_layer: torch.Tensor, slot_ids: torch.Tensor
) -> None:
    """Write each token's K/V into its slot of the layer's paged cache; slot -1 is skipped."""
    # k, v: [T, Hkv, D]; kv_layer: [num_blocks, 2, Hkv, block_size, D]; slot_ids: [T] int64
    reference.store_kv_(k, v, kv_layer, slot_ids)


def paged_decode_attention(
    q: torch.Tensor,
    kv_layer: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Decode attention of one new token per request over its paged KV (already stored)."""
    # q: [B, Hq, D]; kv_layer: [num_blocks, 2, Hkv, block_size, D]; block_tables: [B, max_blocks]
    # int32; seq_lens: [B] int32 -> [B, Hq, D] in q's dtype
    return reference.paged_decode_attention(q, kv_layer, block_tables, seq_lens, scale, out)


def prefill_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    scale: float,
) -> torch.Tensor:
    """Causal attention within each packed prompt."""
    # q: [T, Hq, D]; k, v: [T, Hkv, D]; cu_seqlens: [P+1] int32 -> [T, Hq, D]
    return reference.prefill_attention(q, k, v, cu_seqlens, max_seqlen, scale)


def swap_blocks(
    src_pool: torch.Tensor,
    dst_pool: torch.Tensor,
    block_pairs: torch.Tensor,
    layers: Sequence[int] | torch.Tensor | None = None,
    stream: torch.cuda.Stream | None = None,
) -> None:
    """Copy block-layers between pools (asynchronously on `stream` when a GPU is involved)."""
    # pools: [num_layers, num_blocks, 2, Hkv, block_size, D]; block_pairs: [n, 2] int64 (src, dst)
    reference.swap_blocks(src_pool, dst_pool, block_pairs, layers, stream)
