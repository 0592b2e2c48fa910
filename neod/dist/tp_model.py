"""A tensor-parallel Llama: one rank's shard plus the two all-reduces per layer.

Each rank holds a `LlamaModel` built from its shard (neod.dist.sharding): the QKV and gate/up
GEMMs are column-parallel and need no communication; the O projection and the down projection
are row-parallel, so each rank's output is a partial sum over its heads (its intermediate slice).
The model's `reduce_partial` hook all-reduces the partial O output before the fused residual add
+ RMSNorm, which needs the full value, and the partial down output before it leaves `layer_post`,
so every stage boundary carries full, replicated activations and the stage API (and the engine
that drives it) is unchanged. Attention is local: a rank's KV pool holds only its KV heads,
`[L, num_blocks, 2, Hkv / W, block_size, D]`; logits are identical on every rank.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from neod.dist.sharding import shard_weights
from neod.model.config import ModelConfig
from neod.model.llama import LlamaModel
from neod.model.weights import ModelWeights


def tensor_parallel_llama(
    config: ModelConfig,
    weights: ModelWeights,
    max_positions: int | None = None,
    group: dist.ProcessGroup | None = None,
) -> LlamaModel:
    """This process's shard of the full model, for its rank in `group` (the default group if
    None); without an initialised process group, the whole model on one device."""
    world_size = dist.get_world_size(group) if dist.is_initialized() else 1
    rank = dist.get_rank(group) if dist.is_initialized() else 0
    local_config, local_weights = shard_weights(config, weights, rank, world_size)

    def all_reduce_(partial: torch.Tensor) -> None:
        # partial: [T, H], summed in place over the group's ranks
        dist.all_reduce(partial, op=dist.ReduceOp.SUM, group=group)

    reduce = all_reduce_ if world_size > 1 else None
    return LlamaModel(local_config, local_weights, max_positions, reduce_partial=reduce)
