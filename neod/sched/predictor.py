"""The production cost model: this host's measured profile, interpolated.

CPU attention is the table's back-to-back time as the engine's pipelined iteration paces it (the
profile's `cpu_paced`, timed at start): each layer's run there waits for its inputs and starts
cold, a fixed cost per run that weighs most on the smallest sub-batches.

Batched prefill attention is priced as one prompt doing the same causal work (sqrt of the sum of
squared lengths): the table is measured one prompt at a time, and summing per-prompt times would
charge every prompt the kernel's fixed cost again.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

from neod.sched.profile import Profile

# Lookups remembered per table: a scheduling pass weighs each candidate split with the same few
# batch sizes and context sums, and the engine thread pays for every lookup before it issues work.
LOOKUPS_KEPT = 4096


def _remembered(table: Callable[..., float]) -> Callable[..., float]:
    return functools.lru_cache(maxsize=LOOKUPS_KEPT)(table)


class TableCostModel:
    def __init__(self, profile: Profile) -> None:
        self.profile = profile
        self._linear = _remembered(profile.linear)
        self._prefill = _remembered(profile.prefill_attn)
        self._gpu_decode = _remembered(profile.gpu_decode_attn)
        cpu = profile.cpu_decode_attn
        self._cpu_decode = None if cpu is None else _remembered(cpu)
        self._transfer = _remembered(profile.transfer)
        self._swap = _remembered(profile.swap)
        self._overhead = _remembered(profile.iteration_overhead)
        self._cpu_paced = profile.cpu_paced or (1.0, 0.0)

    def linear_s(self, num_tokens: int) -> float:
        return self._linear(num_tokens)

    def prefill_attn_s(self, prompt_lens: Sequence[int]) -> float:
        return self._prefill(math.sqrt(sum(n * n for n in prompt_lens)))

    def gpu_decode_attn_s(self, num_seqs: int, num_ctx_tokens: int) -> float:
        return self._gpu_decode(num_seqs, num_ctx_tokens)

    def cpu_decode_attn_s(self, num_seqs: int, num_ctx_tokens: int) -> float:
        if self._cpu_decode is None:
            if num_seqs <= 0:
                return 0.0
            raise LookupError(
                "this profile has no CPU attention table: it was measured without a host KV pool; "
                "profile again with one (neoctl profile) before offloading"
            )
        if num_seqs <= 0:
            return 0.0
        scale, fixed = self._cpu_paced
        return scale * self._cpu_decode(num_seqs, num_ctx_tokens) + fixed

    def transfer_s(self, num_cpu_seqs: int) -> float:
        return self._transfer(num_cpu_seqs)

    def swap_s(self, num_blocks: int) -> float:
        return self._swap(num_blocks)

    def iteration_overhead_s(self, num_seqs: int) -> float:
        return self._overhead(num_seqs)

    def pipeline_handoff_s(self) -> float:
        return self.profile.pipeline_handoff or 0.0
