"""The Llama-family decoder as stage functions over one batch.

Each layer is cut at attention: `layer_pre` (norm, fused QKV GEMM, rotary) and `layer_post` (O
projection, norm, fused gate/up GEMM, SiLU-and-mul, down projection). The engine runs attention in
between, on the GPU through `gpu_attention` or on the CPU for offloaded requests, and may
interleave the stages of two sub-batches. The residual add is folded into the next norm (fused
add+RMSNorm), so a stage hands on `(hidden, residual)` rather than their sum. The model holds
weights only: no request state and no KV cache.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from neod.kernels import ops
from neod.model.attention import AttentionMetadata, gpu_attention
from neod.model.config import ModelConfig
from neod.model.rope import build_cos_sin_cache
from neod.model.weights import ModelWeights, load_weights, random_weights, resolve_dtype


class LlamaModel:
    def __init__(
        self,
        config: ModelConfig,
        weights: ModelWeights,
        max_positions: int | None = None,
        reduce_partial: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        """reduce_partial sums the outputs of the row-parallel GEMMs (O and down projections)
        across tensor-parallel ranks, in place; None on a single device."""
        self.config = config
        self.reduce_partial = reduce_partial
        self.weights = weights
        self.num_layers = config.num_hidden_layers
        self.scale = config.head_dim**-0.5
        self._split = (config.q_size, config.kv_size, config.kv_size)
        self._eps = config.rms_norm_eps
        # [max_positions, D] fp32: cos | sin, RoPE scaling included
        self._lm_head_fp32: torch.Tensor | None = None
        self.cos_sin = build_cos_sin_cache(config, max_positions, weights.device)

    @classmethod
    def from_pretrained(
        cls,
        model_dir: str | Path,
        device: torch.device | str,
        dtype: torch.dtype | str | None = None,
        max_positions: int | None = None,
    ) -> LlamaModel:
        """Load a local Hugging Face Llama folder; dtype defaults to the checkpoint's."""
        config = ModelConfig.from_pretrained(model_dir)
        weights = load_weights(
            model_dir, config, device, resolve_dtype(dtype or config.torch_dtype)
        )
        return cls(config, weights, max_positions)

    @classmethod
    def random(
        cls,
        config: ModelConfig,
        device: torch.device | str,
        dtype: torch.dtype | str | None = None,
        seed: int = 0,
        max_positions: int | None = None,
    ) -> LlamaModel:
        """A model of the config's shape with seeded random weights made on the device."""
        weights = random_weights(config, device, resolve_dtype(dtype or config.torch_dtype), seed)
        return cls(config, weights, max_positions)

    @property
    def device(self) -> torch.device:
        return self.weights.device

    @property
    def dtype(self) -> torch.dtype:
        return self.weights.dtype

    @property
    def max_positions(self) -> int:
        """Positions the rotary table covers; a batch must not go past them."""
        return self.cos_sin.shape[0]

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        # input_ids: [T] int64 -> hidden [T, H]
        return F.embedding(input_ids, self.weights.embed)

    def layer_pre(
        self, i: int, hidden: torch.Tensor, residual: torch.Tensor | None, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Norm (adding the previous layer's output to the residual), QKV GEMM and rotary embedding.

        q, k and v are views of one fused GEMM output: rows are strided, each head's D values
        contiguous.
        """
        # hidden: [T, H]; residual: [T, H] or None (first layer); positions: [T] int64
        # -> q [T, Hq, D], k [T, Hkv, D], v [T, Hkv, D], residual [T, H]
        layer = self.weights.layers[i]
        if residual is None:
            residual = hidden
            hidden = ops.rms_norm(hidden, layer.input_norm, self._eps)
        else:
            ops.fused_add_rms_norm_(hidden, residual, layer.input_norm, self._eps)
        qkv = F.linear(hidden, layer.qkv)  # [T, (Hq + 2 Hkv) D]
        q, k, v = qkv.split(self._split, dim=-1)
        head_dim = self.config.head_dim
        q = q.unflatten(-1, (-1, head_dim))
        k = k.unflatten(-1, (-1, head_dim))
        v = v.unflatten(-1, (-1, head_dim))
        ops.rotary_embedding_(positions, q, k, self.cos_sin)
        return q, k, v, residual

    def layer_post(
        self, i: int, attn_out: torch.Tensor, residual: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """O projection, residual add + norm, then the MLP; returns MLP output and residual."""
        # attn_out: [T, Hq * D]; residual: [T, H], updated in place
        # -> hidden [T, H], residual [T, H]
        layer = self.weights.layers[i]
        hidden = F.linear(attn_out, layer.o_proj)
        if self.reduce_partial is not None:
            self.reduce_partial(hidden)
        ops.fused_add_rms_norm_(hidden, residual, layer.post_norm, self._eps)
        gate_up = F.linear(hidden, layer.gate_up)  # [T, 2 I]
        down = F.linear(ops.silu_and_mul(gate_up), layer.down)
        if self.reduce_partial is not None:
            self.reduce_partial(down)
        return down, residual

    def final(
        self,
        hidden: torch.Tensor,
        residual: torch.Tensor,
        sample_indices: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """fp32 logits of the selected rows only (all rows when sample_indices is None).

        Without sample_indices, hidden and residual are overwritten.
        """
        # hidden, residual: [T, H]; sample_indices: [B] int64 -> logits [B, V] fp32
        if sample_indices is not None:
            hidden = hidden.index_select(0, sample_indices)
            residual = residual.index_select(0, sample_indices)
        ops.fused_add_rms_norm_(hidden, residual, self.weights.final_norm, self._eps)
        return self._lm_head(hidden)

    def _lm_head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits accumulated and returned in fp32, never rounded to bf16/fp16: rounding would
        create exact ties among the top tokens, and greedy decoding would then hinge on last-bit
        differences."""
        # hidden: [B, H] -> [B, V] fp32
        weight = self.weights.lm_head
        if weight.dtype == torch.float32:
            return F.linear(hidden, weight)
        if hidden.is_cuda:
            return torch.mm(hidden, weight.t(), out_dtype=torch.float32)
        if self._lm_head_fp32 is None:
            self._lm_head_fp32 = weight.float()  # CPU hosts serve small models: the copy is small
        return F.linear(hidden.float(), self._lm_head_fp32)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        kv_pool: torch.Tensor,
        sample_indices: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The sequential path: every layer's attention on the model's device, over `kv_pool`."""
        # input_ids, positions: [T] int64; kv_pool: [L, num_blocks, 2, Hkv, block_size, D];
        # sample_indices: [B] int64 -> logits [B, V] fp32
        self._check_pool(kv_pool)
        hidden = self.embed(input_ids)
        residual = None
        for i in range(self.num_layers):
            q, k, v, residual = self.layer_pre(i, hidden, residual, positions)
            attn_out = gpu_attention(q, k, v, kv_pool[i], meta, self.scale)
            hidden, residual = self.layer_post(i, attn_out, residual)
        return self.final(hidden, residual, sample_indices)

    def _check_pool(self, kv_pool: torch.Tensor) -> None:
        cfg = self.config
        if (
            kv_pool.dim() != 6
            or kv_pool.shape[0] != cfg.num_hidden_layers
            or kv_pool.shape[2] != 2
            or kv_pool.shape[3] != cfg.num_key_value_heads
            or kv_pool.shape[5] != cfg.head_dim
        ):
            raise ValueError(
                f"kv_pool shape {list(kv_pool.shape)} does not fit the model: expected "
                f"[{cfg.num_hidden_layers}, num_blocks, 2, {cfg.num_key_value_heads}, "
                f"block_size, {cfg.head_dim}]"
            )
