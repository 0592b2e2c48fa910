"""Sampling on the model's device.

Greedy rows take one argmax over the batch. Sampled rows go through temperature, top-k and top-p,
then an exponential race (argmax of p / E with E ~ Exp(1)), which equals drawing from p. Rows with
a seed draw their noise from their own generator, so a seeded request gives the same tokens
whatever it is batched with.
"""

from __future__ import annotations

import torch

from neod.engine.request import SamplingParams


def _filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    # logits: [V] fp32, already divided by the temperature
    if top_k > 0 and top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        drop = (
            cum - torch.softmax(sorted_logits, dim=-1) >= top_p
        )  # keep the smallest prefix reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.empty_like(logits).scatter_(0, order, sorted_logits)
    return logits


def sample(
    logits: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
    default_generator: torch.Generator | None,
) -> list[int]:
    """Pick one token per row. logits: [B, V] fp32; params/generators: one per row."""
    tokens = torch.argmax(logits, dim=-1)  # [B]; greedy rows keep this
    sampled_rows = [i for i, p in enumerate(params) if not p.greedy]
    for i in sampled_rows:
        p = params[i]
        row = _filter_top_k_top_p(logits[i] / p.temperature, p.top_k, p.top_p)
        probs = torch.softmax(row, dim=-1)
        gen = generators[i] if generators[i] is not None else default_generator
        noise = torch.empty_like(probs).exponential_(generator=gen)
        tokens[i] = torch.argmax(probs / noise)
    return tokens.tolist()
