"""Kernel entry points called by the model and the engine.

Each function takes the tensors described in docs/architecture.md and runs the CUDA C++ kernel when
its main tensor lives on a GPU and build/libneod_cuda.so is loaded; otherwise it runs the torch
reference (CPU hosts, tests, or a missing library). The choice is made per call from the tensor's
device, so one process can use both paths. Prefill attention on a GPU uses the FlashAttention that
ships with torch (varlen, causal, GQA by head grouping inside the kernel).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

from neod.kernels import cuda_ops, reference

# How swaps move block-layers on a GPU: "memcpy" (copy engines) or "kernel" (SM copy kernel).
# Measured on an H100 (docs/perf.md, "GPU kernels"): with 64 KiB block-layers the copy engines
# reach 52-55 GB/s (the pinned-copy ceiling is 55), scattered or not, against 50-52 GB/s for the
# kernel, and they leave the SMs to the model.
SWAP_METHOD = "memcpy"

_FLASH_DTYPES = (torch.float16, torch.bfloat16)


def _use_cuda(t: torch.Tensor) -> bool:
    return t.is_cuda and cuda_ops.loaded()


@functools.cache
def _flash_capable(device_index: int) -> bool:
    # torch's FlashAttention kernels need Ampere (sm_80) or newer
    return torch.cuda.get_device_capability(device_index) >= (8, 0)


def fused_add_rms_norm_(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> None:
    """In place: `residual += x; x = rmsnorm(residual) * weight` (fp32 math)."""
    # x, residual: [T, H]; weight: [H]
    if _use_cuda(x):
        cuda_ops.fused_add_rms_norm_(x, residual, weight, eps)
    else:
        reference.fused_add_rms_norm_(x, residual, weight, eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`rmsnorm(x) * weight` in x's dtype."""
    # x: [T, H]; weight: [H] -> [T, H]
    if _use_cuda(x):
        return cuda_ops.rms_norm(x, weight, eps)
    return reference.rms_norm(x, weight, eps)


def rotary_embedding_(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin: torch.Tensor
) -> None:
    """Rotate q and k in place (rotate-half style) by the cos/sin rows of their positions."""
    # positions: [T] int64; q: [T, Hq, D]; k: [T, Hkv, D]; cos_sin: [max_pos, D] fp32
    if _use_cuda(q):
        cuda_ops.rotary_embedding_(positions, q, k, cos_sin)
    else:
        reference.rotary_embedding_(positions, q, k, cos_sin)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """`silu(gate) * up` for x = [gate | up]."""
    # x: [T, 2I] -> [T, I]
    if _use_cuda(x):
        return cuda_ops.silu_and_mul(x)
    return reference.silu_and_mul(x)


def store_kv_(
    k: torch.Tensor, v: torch.Tensor, kv_layer: torch.Tensor, slot_ids: torch.Tensor
) -> None:
    """Write each token's K/V into its slot of the layer's paged cache; slot -1 is skipped."""
    # k, v: [T, Hkv, D]; kv_layer: [num_blocks, 2, Hkv, block_size, D]; slot_ids: [T] int64
    if _use_cuda(kv_layer):
        cuda_ops.store_kv_(k, v, kv_layer, slot_ids)
    else:
        reference.store_kv_(k, v, kv_layer, slot_ids)


def load_kv_(
    kv_layer: torch.Tensor, slot_ids: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> None:
    """Read each row's K/V out of its slot of the layer's paged cache (slot -1: skipped). On a
    GPU the layer may be the pinned host pool's."""
    # kv_layer: [num_blocks, 2, Hkv, block_size, D]; slot_ids: [T] int64; k, v: [T, Hkv, D]
    if _use_cuda(k):
        cuda_ops.load_kv_(kv_layer, slot_ids, k, v)
    else:
        reference.load_kv_(kv_layer, slot_ids, k, v)


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
    if _use_cuda(q) and cuda_ops.decode_supported(q, kv_layer):
        return cuda_ops.paged_decode_attention(q, kv_layer, block_tables, seq_lens, scale, out)
    return reference.paged_decode_attention(q, kv_layer, block_tables, seq_lens, scale, out)


def prefill_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    scale: float,
    cu_seqlens_k: torch.Tensor | None = None,
    max_seqlen_k: int = 0,
) -> torch.Tensor:
    """Causal attention within each packed prompt; with `cu_seqlens_k`, over keys that may start
    with a prefix (see reference.prefill_attention)."""
    # q: [T, Hq, D]; k, v: [Tk, Hkv, D]; cu_seqlens(_k): [P+1] int32 -> [T, Hq, D]
    head_dim = q.shape[-1]
    flash = q.is_cuda and q.dtype in _FLASH_DTYPES and head_dim % 8 == 0 and head_dim <= 256
    if flash and _flash_capable(q.device.index):
        cu = cu_seqlens.to(device=q.device, dtype=torch.int32)
        cu_k = cu if cu_seqlens_k is None else cu_seqlens_k.to(device=q.device, dtype=torch.int32)
        max_k = max_seqlen if cu_seqlens_k is None else max_seqlen_k
        # (q, k, v, cu_q, cu_k, max_q, max_k, dropout_p, is_causal, return_debug_mask); flash
        # aligns the causal mask bottom-right: a chunk's queries see their prefix.
        return torch.ops.aten._flash_attention_forward(
            q, k, v, cu, cu_k, max_seqlen, max_k, 0.0, True, False, scale=scale
        )[0]
    return reference.prefill_attention(q, k, v, cu_seqlens, max_seqlen, scale, cu_seqlens_k)


def swap_blocks(
    src_pool: torch.Tensor,
    dst_pool: torch.Tensor,
    block_pairs: torch.Tensor,
    layers: Sequence[int] | torch.Tensor | None = None,
    stream: torch.cuda.Stream | None = None,
) -> None:
    """Copy block-layers between pools (asynchronously on `stream` when a GPU is involved)."""
    # pools: [num_layers, num_blocks, 2, Hkv, block_size, D]; block_pairs: [n, 2] int64 (src, dst)
    if (src_pool.is_cuda or dst_pool.is_cuda) and cuda_ops.loaded():
        cuda_ops.swap_blocks(src_pool, dst_pool, block_pairs, layers, stream, SWAP_METHOD)
    else:
        reference.swap_blocks(src_pool, dst_pool, block_pairs, layers, stream)
