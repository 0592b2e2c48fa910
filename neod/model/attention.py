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
class PrefillContext:
    """Where the keys of prefills that continue a prompt (a chunk after its prefix) come from.

    Every prefill's keys and values are packed prompt after prompt, each prefix first: the prefix
    rows are read from the pool that holds the prompt's KV (the GPU pool, or the pinned host pool
    for a prompt whose KV lives there), the rest are the batch's own prefill rows.
    """

    cu_seqlens: torch.Tensor  # [P + 1] int32: prompt p's keys are packed rows [cu[p], cu[p + 1])
    max_seqlen: int  # longest prompt's keys
    num_keys: int  # all prompts' keys: cu_seqlens[-1], kept on the host
    new_rows: torch.Tensor  # [num_prefill_tokens] int64: packed row of each prefill row
    gpu_slots: torch.Tensor | None  # [num_keys] int64: GPU pool slot of each packed row, else -1
    host_slots: torch.Tensor | None  # [num_keys] int64: host pool slot of each packed row, else -1

    def gather(
        self, k: torch.Tensor, v: torch.Tensor, kv_layer: torch.Tensor,
        host_kv_layer: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The packed keys and values: [Tk, Hkv, D] each."""
        # k, v: [num_prefill_tokens, Hkv, D]; kv_layers: [num_blocks, 2, Hkv, block_size, D]
        keys = k.new_empty((self.num_keys, *k.shape[1:]))
        values = v.new_empty((self.num_keys, *v.shape[1:]))
        keys[self.new_rows] = k
        values[self.new_rows] = v
        if self.gpu_slots is not None:
            ops.load_kv_(kv_layer, self.gpu_slots, keys, values)
        if self.host_slots is not None:
            if host_kv_layer is None:
                raise ValueError("a prefill continues a prompt held by the host pool, but no host "
                                 "pool layer was given")  # fmt: skip
            ops.load_kv_(host_kv_layer, self.host_slots, keys, values)
        return keys, values


@dataclass
class AttentionMetadata:
    num_prefill_tokens: int  # rows [0, num_prefill_tokens) are packed prompts
    cu_seqlens: torch.Tensor  # [P + 1] int32: prompt p owns rows [cu_seqlens[p], cu_seqlens[p + 1])
    max_seqlen: int  # longest prompt in the batch (0 without prefills)
    # [T] int64: each row's KV slot (block_id * block_size + offset); -1 = don't store
    slot_ids: torch.Tensor
    block_tables: torch.Tensor  # [B, max_blocks] int32: the decode rows' block tables
    seq_lens: torch.Tensor  # [B] int32: the decode rows' lengths, the new token included
    context: PrefillContext | None = None  # set when a prefill continues a prompt

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
    out: torch.Tensor | None = None,
    host_kv_layer: torch.Tensor | None = None,
) -> torch.Tensor:
    """Store the batch's K/V in the paged cache, then attend (causal within prompts; paged). With
    `out` (contiguous, [T, Hq * D]) the result is written there, as the pipelined executor does
    into its sub-batch's rows, and `out` is returned. `host_kv_layer`, the host pool's layer, is
    read when a prefill continues a prompt whose KV lives there."""
    # q: [T, Hq, D]; k, v: [T, Hkv, D]; kv_layer: [num_blocks, 2, Hkv, block_size, D] -> [T, Hq * D]
    num_tokens, num_q_heads, head_dim = q.shape
    if num_tokens != meta.num_tokens:
        raise ValueError(
            f"batch has {num_tokens} rows but the metadata describes {meta.num_tokens}"
        )
    width = num_q_heads * head_dim
    if out is not None and (out.shape != (num_tokens, width) or not out.is_contiguous()):
        raise ValueError(f"out must be contiguous [{num_tokens}, {width}]")
    if num_tokens == 0:
        return q.new_empty((0, width)) if out is None else out
    ops.store_kv_(k, v, kv_layer, meta.slot_ids)
    num_prefill = meta.num_prefill_tokens
    if out is None and num_prefill == num_tokens:
        return _prefill(q, k, v, kv_layer, host_kv_layer, meta, scale).reshape(
            num_tokens, width
        )
    if out is None:
        out = torch.empty((num_tokens, width), dtype=q.dtype, device=q.device)
    heads = out.view(num_tokens, num_q_heads, head_dim)
    if num_prefill > 0:
        heads[:num_prefill] = _prefill(q[:num_prefill], k[:num_prefill], v[:num_prefill], kv_layer,
                                       host_kv_layer, meta, scale)  # fmt: skip
    if num_prefill < num_tokens:
        # Decode rows read their K/V, the new token's included, back from the pool.
        ops.paged_decode_attention(
            q[num_prefill:], kv_layer, meta.block_tables, meta.seq_lens, scale,
            out=heads[num_prefill:],
        )  # fmt: skip
    return out


def _prefill(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_layer: torch.Tensor,
    host_kv_layer: torch.Tensor | None,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """The prefill rows' attention: within their prompts, and over the prefixes of chunks."""
    # q: [Tp, Hq, D]; k, v: [Tp, Hkv, D] -> [Tp, Hq, D]
    ctx = meta.context
    if ctx is None:
        return ops.prefill_attention(q, k, v, meta.cu_seqlens, meta.max_seqlen, scale)
    k_ctx, v_ctx = ctx.gather(k, v, kv_layer, host_kv_layer)
    return ops.prefill_attention(
        q, k_ctx, v_ctx, meta.cu_seqlens, meta.max_seqlen, scale, ctx.cu_seqlens, ctx.max_seqlen
    )
