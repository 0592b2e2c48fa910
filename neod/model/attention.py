"""Attention of one batch on the model's device: KV store, prefill and paged decode attention.

A batch's tokens are ordered `[prefill tokens (packed prompts) | decode tokens]`, so each kind of
attention works on one contiguous row range and no gather is needed. The metadata is plain data
built by the engine; the model keeps no per-request state.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from neod.kernels import ops


@dataclass
class AttentionMetadata:
    num_prefill_tokens: int  # rows [0, num_prefill_tokens) are packed prompts
    cu_seqlens: torch.Tensor  # [P + 1] int32: prompt p owns rows [cu_seqlens[p], cu_seqlens[p + 1])
    max_seqlen: int  # longest prompt in the batch (0 without prefills)
    # [T] int64: each row's KV slot (block_id * block_size + offset); -1 = don't store
    slot_ids: torch.Tensor
    block_tables: torch.Tensor  # [B, max_blocks] int32: the decode rows' block tables
    seq_lens: torch.Tensor  # [B] int32: the decode rows' lengths, the new token included

    def __post_init__(self) -> None:
        _check(self.cu_seqlens, "cu_seqlens", 1, torch.int32)
        _check(self.slot_ids, "slot_ids", 1, torch.int64)
        _check(self.block_tables, "block_tables", 2, torch.int32)
        _check(self.seq_lens, "seq_lens", 1, torch.int32)
        if self.block_tables.shape[0] != self.seq_lens.shape[0]:
            raise ValueError(
                f"block_tables has {self.block_tables.shape[0]} rows "
                f"but seq_lens has {self.seq_lens.shape[0]}"
            )
        if self.num_prefill_tokens < 0 or (
            self.num_prefill_tokens > 0 and self.cu_seqlens.shape[0] < 2
        ):
            raise ValueError(
                f"num_prefill_tokens={self.num_prefill_tokens} needs cu_seqlens "
                "with at least one prompt"
            )

    @property
    def num_decode_tokens(self) -> int:
        return self.seq_lens.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.num_prefill_tokens + self.num_decode_tokens


def _check(t: torch.Tensor, name: str, ndim: int, dtype: torch.dtype) -> None:
    if t.dim() != ndim or t.dtype != dtype:
        raise ValueError(f"{name} must be a {ndim}-d {dtype} tensor, got {t.dim()}-d {t.dtype}")


def gpu_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_layer: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Store the batch's K/V in the paged cache, then attend (causal within prompts; paged)."""
    # q: [T, Hq, D]; k, v: [T, Hkv, D]; kv_layer: [num_blocks, 2, Hkv, block_size, D] -> [T, Hq * D]
    num_tokens, num_q_heads, head_dim = q.shape
    if num_tokens != meta.num_tokens:
        raise ValueError(
            f"batch has {num_tokens} rows but the metadata describes {meta.num_tokens}"
        )
    if num_tokens == 0:
        return q.new_empty((0, num_q_heads * head_dim))
    ops.store_kv_(k, v, kv_layer, meta.slot_ids)
    num_prefill = meta.num_prefill_tokens
    if num_prefill == num_tokens:
        out = ops.prefill_attention(q, k, v, meta.cu_seqlens, meta.max_seqlen, scale)
        return out.reshape(num_tokens, num_q_heads * head_dim)
    out = torch.empty((num_tokens, num_q_heads, head_dim), dtype=q.dtype, device=q.device)
    if num_prefill > 0:
        out[:num_prefill] = ops.prefill_attention(
            q[:num_prefill],
            k[:num_prefill],
            v[:num_prefill],
            meta.cu_seqlens,
            meta.max_seqlen,
            scale,
        )
    # Decode rows read their K/V, the new token's included, back from the pool.
    ops.paged_decode_attention(
        q[num_prefill:], kv_layer, meta.block_tables, meta.seq_lens, scale, out=out[num_prefill:]
    )
    return out.view(num_tokens, num_q_heads * head_dim)
