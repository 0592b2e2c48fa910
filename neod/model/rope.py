"""Rotary-embedding cache with Llama 3 and linear frequency scaling baked in.

The kernels take one `[max_pos, D]` fp32 table (cos in the first half of each row, sin in the
second) so that scaling never reaches them. The inverse frequencies are computed the way
transformers computes them (fp32, on the host) and the angles on the target device, so a model here
and a transformers model rotate by the same fp32 values.
"""

from __future__ import annotations

import math

import torch

from neod.model.config import ModelConfig, RopeScaling


def inverse_frequencies(
    head_dim: int, rope_theta: float, scaling: RopeScaling | None
) -> torch.Tensor:
    """Per-pair rotation speeds, `[head_dim // 2]` fp32 on the host."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).to(torch.float32) / head_dim
    inv_freq = 1.0 / (rope_theta**exponents)
    if scaling is None:
        return inv_freq
    if scaling.rope_type == "linear":
        return inv_freq / scaling.factor
    return _llama3_scale(inv_freq, scaling)


def _llama3_scale(inv_freq: torch.Tensor, scaling: RopeScaling) -> torch.Tensor:
    """Slow long wavelengths down by `factor`, keep short ones, blend in between (Llama 3.1)."""
    old_context = scaling.original_max_position_embeddings
    low_freq_wavelen = old_context / scaling.low_freq_factor
    high_freq_wavelen = old_context / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old_context / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def build_cos_sin_cache(
    config: ModelConfig, max_positions: int | None = None, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """cos/sin table `[max_positions, head_dim]` fp32: row p is `[cos(p * f) | sin(p * f)]`."""
    num_positions = config.max_position_embeddings if max_positions is None else max_positions
    if num_positions < 1:
        raise ValueError(f"max_positions must be >= 1, got {num_positions}")
    inv_freq = inverse_frequencies(config.head_dim, config.rope_theta, config.rope_scaling).to(
        device
    )
    positions = torch.arange(num_positions, dtype=torch.int64, device=device).to(torch.float32)
    angles = positions[:, None] * inv_freq[None, :]  # [max_positions, head_dim // 2]
    return torch.cat((angles.cos(), angles.sin()), dim=-1)
