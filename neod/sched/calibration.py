"""The profiled costs, with the CPU attention corrected by what the CPU pool does now.

The profile times the CPU program once, when the host is profiled. The CPU it runs on is shared
(the engine thread, other processes, a VM's neighbours, frequency scaling): on the GPU hosts the
same kernel point measured minutes apart differs by up to 1.7x, and a profile taken at a slow or a
fast moment makes the scheduler keep too few or too many decodes on the CPU for as long as it is
used. The engine measures the CPU program of every offloaded iteration anyway; this model scales
the profiled CPU attention by a running average of measured over predicted, so that the split
follows the CPU as it is. Every other cost is the profile's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from neod.sched.cost import CostModel

SCALE_BOUNDS = (0.5, 2.0)  # how far measurements may move the profile: beyond, re-profile
WEIGHT = 0.1  # weight of the newest iteration in the running (geometric) average


class CalibratedCostModel:
    def __init__(self, base: CostModel, cpu_scale: float = 1.0) -> None:
        self.base = base
        self.cpu_scale = cpu_scale  # measured / profiled CPU attention time, running average
        self.cpu_samples = 0

    def linear_s(self, num_tokens: int) -> float:
        return self.base.linear_s(num_tokens)

    def prefill_attn_s(self, prompt_lens: Sequence[int]) -> float:
        return self.base.prefill_attn_s(prompt_lens)

    def gpu_decode_attn_s(self, num_seqs: int, num_ctx_tokens: int) -> float:
        return self.base.gpu_decode_attn_s(num_seqs, num_ctx_tokens)

    def cpu_decode_attn_s(self, num_seqs: int, num_ctx_tokens: int) -> float:
        return self.cpu_scale * self.base.cpu_decode_attn_s(num_seqs, num_ctx_tokens)

    def transfer_s(self, num_cpu_seqs: int) -> float:
        return self.base.transfer_s(num_cpu_seqs)

    def swap_s(self, num_blocks: int) -> float:
        return self.base.swap_s(num_blocks)

    def iteration_overhead_s(self, num_seqs: int) -> float:
        return self.base.iteration_overhead_s(num_seqs)

    def record_cpu(self, measured_s: float, predicted_s: float) -> None:
        """One iteration's CPU program: its busy time, and what this model predicted for it.

        The average is taken over log ratios, so that 2x slow and 2x fast weigh the same; since
        the prediction already carries the scale, a right scale is left where it is.
        """
        if measured_s <= 0.0 or predicted_s <= 0.0:
            return
        low, high = SCALE_BOUNDS
        step = WEIGHT * math.log(measured_s / predicted_s)
        self.cpu_scale = min(high, max(low, self.cpu_scale * math.exp(step)))
        self.cpu_samples += 1
