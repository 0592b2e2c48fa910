"""What the scheduler sees: a snapshot per request, one of the KV pools, one of the limits.

The engine owns requests and blocks and rebuilds these views every iteration, so the scheduler stays
a pure function of its inputs. Block accounting rests on one convention: a running sequence holds
exactly `blocks_for(num_computed_tokens)` blocks on its residence device, and a waiting one holds
none.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

POLICIES = ("auto", "gpu-only", "neo")


class Residence(enum.IntEnum):
    WAITING = 0  # no KV anywhere: not prefilled yet, or preempted for recompute
    GPU = 1
    CPU = 2


def blocks_for(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


@dataclass
class SeqView:
    seq_id: int
    arrival: int  # admission order, lower = older: the FCFS key
    # Tokens the next prefill computes while waiting (after a preemption: prompt plus generated
    # tokens); the original prompt length once running.
    num_prompt_tokens: int
    num_computed_tokens: int  # tokens whose KV is in the cache; 0 while waiting
    max_total_tokens: int  # prompt + max_tokens, capped at the model's context length
    residence: Residence
    # Last step in which it advanced; for a request that never ran, the step at which it was added.
    last_progress_step: int
    # Running on the GPU part-way through a prefill done in chunks: the tokens still to prefill
    # (the sampled token comes with the last of them); 0 for every other sequence.
    num_prefill_left: int = 0

    @property
    def is_chunking(self) -> bool:
        return self.num_prefill_left > 0

    @property
    def prefill_left(self) -> int:
        """Tokens its prefill still computes: a waiting sequence's all, a chunked one's rest."""
        return self.num_prefill_left or self.num_prompt_tokens

    def held_blocks(self, block_size: int) -> int:
        return blocks_for(self.num_computed_tokens, block_size)

    def decode_blocks(self, block_size: int) -> int:
        """Blocks it must hold once this iteration's token is stored."""
        return blocks_for(self.num_computed_tokens + 1, block_size)

    @property
    def decode_ctx_tokens(self) -> int:
        """Context a decode step's attention reads, the new token included."""
        return self.num_computed_tokens + 1


@dataclass(frozen=True)
class CacheView:
    block_size: int
    num_gpu_blocks: int
    num_free_gpu_blocks: int
    num_cpu_blocks: int
    num_free_cpu_blocks: int

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        for total, free, name in (
            (self.num_gpu_blocks, self.num_free_gpu_blocks, "gpu"),
            (self.num_cpu_blocks, self.num_free_cpu_blocks, "cpu"),
        ):
            if not 0 <= free <= total:
                raise ValueError(f"{name}: free blocks {free} must be in [0, {total}]")


@dataclass(frozen=True)
class Limits:
    max_batch_size: int  # sequences in one iteration, both sub-batches together
    max_tokens_in_batch: (
        int  # prompt tokens of prefills plus one per decode, both sub-batches together
    )
    policy: str = "auto"
    # auto only: offloading was measured losing (the engine's guard). Nothing goes to the CPU that
    # the GPU pool can hold, and CPU requests the GPU pool can hold come home.
    offload_paused: bool = False

    def __post_init__(self) -> None:
        if self.max_batch_size < 1 or self.max_tokens_in_batch < 1:
            raise ValueError(
                f"limits must be >= 1, got max_batch_size={self.max_batch_size} "
                f"max_tokens_in_batch={self.max_tokens_in_batch}"
            )
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {self.policy!r}")
        if self.offload_paused and self.policy != "auto":
            raise ValueError(f"only policy auto pauses offloading, not {self.policy!r}")
