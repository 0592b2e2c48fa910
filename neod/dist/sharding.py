"""Megatron-style tensor-parallel shards of a full Llama model, as pure functions.

Rank `r` of `W` owns a contiguous block of query heads and the matching block of KV heads (so
each of its query heads finds its KV head locally: GQA groups never straddle ranks), and a
contiguous slice of the MLP's intermediate dimension. The column-parallel GEMMs (QKV, gate/up)
take this rank's output rows; the row-parallel ones (O projection, down) take the matching input
columns and so produce partial sums that the caller all-reduces. Embedding, LM head and norms are
replicated: simple, and at these sizes the vocabulary-parallel version saves memory only.

A shard is described by a `ModelConfig` whose head counts and intermediate size are the per-rank
ones, so an unmodified `LlamaModel` runs the local part of every GEMM and the KV pool of a rank
holds only its KV heads. Shards are copies (contiguous), never views of the full weights.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from neod.model.config import ModelConfig
from neod.model.weights import LayerWeights, ModelWeights


def check_shardable(config: ModelConfig, world_size: int) -> None:
    """Raise ValueError unless heads and the intermediate size split evenly over world_size."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    problems = [
        f"{name}={value} is not divisible by world_size={world_size}"
        for name, value in (
            ("num_attention_heads", config.num_attention_heads),
            ("num_key_value_heads", config.num_key_value_heads),
            ("intermediate_size", config.intermediate_size),
        )
        if value % world_size
    ]
    if problems:
        raise ValueError("cannot shard the model for tensor parallelism: " + "; ".join(problems))


def shard_config(config: ModelConfig, world_size: int) -> ModelConfig:
    """The config a rank's `LlamaModel` sees: per-rank head counts and intermediate size."""
    check_shardable(config, world_size)
    return replace(
        config,
        num_attention_heads=config.num_attention_heads // world_size,
        num_key_value_heads=config.num_key_value_heads // world_size,
        intermediate_size=config.intermediate_size // world_size,
        head_dim=config.head_dim,  # explicit: never re-derived from hidden_size / heads
    )


def _check_rank(rank: int, world_size: int) -> None:
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")


def shard_layer(
    config: ModelConfig, layer: LayerWeights, rank: int, world_size: int
) -> LayerWeights:
    """Rank `rank`'s slice of one layer (config is the full model's)."""
    check_shardable(config, world_size)
    _check_rank(rank, world_size)
    q_size, kv_size = config.q_size, config.kv_size
    q_local, kv_local = q_size // world_size, kv_size // world_size
    i_full = config.intermediate_size
    i_local = i_full // world_size
    q_rows = slice(rank * q_local, (rank + 1) * q_local)
    k_rows = slice(q_size + rank * kv_local, q_size + (rank + 1) * kv_local)
    v_rows = slice(q_size + kv_size + rank * kv_local, q_size + kv_size + (rank + 1) * kv_local)
    gate_rows = slice(rank * i_local, (rank + 1) * i_local)
    up_rows = slice(i_full + rank * i_local, i_full + (rank + 1) * i_local)
    return LayerWeights(
        input_norm=layer.input_norm.clone(),
        # [(Hq + 2 Hkv) D / W, H]: this rank's q heads, then its k heads, then its v heads
        qkv=torch.cat([layer.qkv[q_rows], layer.qkv[k_rows], layer.qkv[v_rows]]),
        o_proj=layer.o_proj[:, q_rows].contiguous(),  # [H, Hq D / W]
        post_norm=layer.post_norm.clone(),
        # [2 I / W, H]: this rank's gate rows, then the same slice of up rows
        gate_up=torch.cat([layer.gate_up[gate_rows], layer.gate_up[up_rows]]),
        down=layer.down[:, gate_rows].contiguous(),  # [H, I / W]
    )


def shard_weights(
    config: ModelConfig, weights: ModelWeights, rank: int, world_size: int
) -> tuple[ModelConfig, ModelWeights]:
    """Rank `rank`'s shard of the full weights and the sharded config that describes it."""
    local_config = shard_config(config, world_size)
    _check_rank(rank, world_size)
    embed = weights.embed.clone()
    tied = weights.lm_head is weights.embed
    shard = ModelWeights(
        embed=embed,
        layers=[shard_layer(config, layer, rank, world_size) for layer in weights.layers],
        final_norm=weights.final_norm.clone(),
        lm_head=embed if tied else weights.lm_head.clone(),
    )
    return local_config, shard
