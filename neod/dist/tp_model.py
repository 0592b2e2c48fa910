"""A tensor-parallel Llama: one rank's shard plus the two all-reduces per layer.

Each rank holds a `LlamaModel` built from its shard (neod.dist.sharding): the QKV and gate/up
GEMMs are column-parallel and need no communication; the O projection and the down projection
are row-parallel, so each rank's output is a partial sum over its heads (its intermediate slice).
The partial O output is all-reduced before the fused residual add + RMSNorm, which needs the full
value; the partial down output is all-reduced before it leaves `layer_post`, so every stage
boundary carries full, replicated activations and the stage API (and the engine that drives it)
is unchanged. Attention is local: a rank's KV pool holds only its KV heads.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from neod.dist.sharding import shard_weights
from neod.kernels import ops
from neod.model.attention import AttentionMetadata, gpu_attention
from neod.model.config import ModelConfig
from neod.model.llama import LlamaModel
from neod.model.weights import ModelWeights


class TensorParallelLlama:
    """Same stages and `forward` as `LlamaModel`; every rank of `group` runs the same batch."""

    def __init__(
        self,
        config: ModelConfig,
        weights: ModelWeights,
        max_positions: int | None = None,
        group: dist.ProcessGroup | None = None,
    ) -> None:
        # config, weights: this rank's shard (sharding.shard_weights), not the full model
        self.local = LlamaModel(config, weights, max_positions)
        self.group = group
        self.world_size = dist.get_world_size(group) if dist.is_initialized() else 1
        self.rank = dist.get_rank(group) if dist.is_initialized() else 0

    @classmethod
    def from_full(
        cls,
        config: ModelConfig,
        weights: ModelWeights,
        max_positions: int | None = None,
        group: dist.ProcessGroup | None = None,
    ) -> TensorParallelLlama:
        """Shard full weights for this process's rank in `group` (the default group if None)."""
        world_size = dist.get_world_size(group) if dist.is_initialized() else 1
        rank = dist.get_rank(group) if dist.is_initialized() else 0
        local_config, local_weights = shard_weights(config, weights, rank, world_size)
        return cls(local_config, local_weights, max_positions, group)

    @property
    def config(self) -> ModelConfig:
        """The per-rank config: head counts and intermediate size of this shard."""
        return self.local.config

    @property
    def num_layers(self) -> int:
        return self.local.num_layers

    @property
    def scale(self) -> float:
        return self.local.scale

    @property
    def device(self) -> torch.device:
        return self.local.device

    @property
    def dtype(self) -> torch.dtype:
        return self.local.dtype

    @property
    def max_positions(self) -> int:
        return self.local.max_positions

    def _all_reduce_(self, partial: torch.Tensor) -> torch.Tensor:
        # partial: [T, H], summed in place over the group's ranks
        if self.world_size > 1:
            dist.all_reduce(partial, op=dist.ReduceOp.SUM, group=self.group)
        return partial

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        # input_ids: [T] int64 -> hidden [T, H] (replicated embedding)
        return self.local.embed(input_ids)

    def layer_pre(
        self, i: int, hidden: torch.Tensor, residual: torch.Tensor | None, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        # -> q [T, Hq/W, D], k [T, Hkv/W, D], v [T, Hkv/W, D], residual [T, H]: the local heads
        return self.local.layer_pre(i, hidden, residual, positions)

    def layer_post(
        self, i: int, attn_out: torch.Tensor, residual: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """LlamaModel.layer_post with an all-reduce after each row-parallel GEMM."""
        # attn_out: [T, Hq/W * D] (local heads); residual: [T, H], updated in place
        # -> hidden [T, H] (full MLP output, replicated), residual [T, H]
        layer = self.local.weights.layers[i]
        eps = self.local.config.rms_norm_eps
        hidden = self._all_reduce_(F.linear(attn_out, layer.o_proj))
        ops.fused_add_rms_norm_(hidden, residual, layer.post_norm, eps)
        gate_up = F.linear(hidden, layer.gate_up)  # [T, 2 I/W]
        down = F.linear(ops.silu_and_mul(gate_up), layer.down)  # [T, H], partial
        return self._all_reduce_(down), residual

    def final(
        self,
        hidden: torch.Tensor,
        residual: torch.Tensor,
        sample_indices: torch.Tensor | None = None,
    ) -> torch.Tensor:
        # -> logits [B, V] fp32, identical on every rank (replicated LM head)
        return self.local.final(hidden, residual, sample_indices)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        kv_pool: torch.Tensor,
        sample_indices: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The sequential path over this rank's `kv_pool` [L, num_blocks, 2, Hkv/W, bs, D]."""
        self.local._check_pool(kv_pool)
        hidden = self.embed(input_ids)
        residual = None
        for i in range(self.num_layers):
            q, k, v, residual = self.layer_pre(i, hidden, residual, positions)
            attn_out = gpu_attention(q, k, v, kv_pool[i], meta, self.scale)
            hidden, residual = self.layer_post(i, attn_out, residual)
        return self.final(hidden, residual, sample_indices)
