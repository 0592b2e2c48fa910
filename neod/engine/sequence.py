"""Per-request engine state.

A sequence is counters plus the ids of the KV blocks it holds on its one residence device. Prefill,
decode, swap and recompute all fall out of `num_computed_tokens` versus `len(token_ids)`: after a
preemption the counter drops to zero and the whole history is prefilled again. A prefill done in
chunks leaves the counter part-way; once only the last token is left, that token is an ordinary
decode step.
"""

from __future__ import annotations

import torch

from neod.engine.request import FinishReason, SamplingParams
from neod.sched import Residence, SeqView


class Sequence:
    def __init__(
        self,
        seq_id: int,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        max_model_len: int,
        generator: torch.Generator | None,
    ) -> None:
        self.seq_id = seq_id  # doubles as the FCFS arrival order
        self.request_id = request_id
        self.token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.params = params
        self.max_total_tokens = min(self.num_prompt_tokens + params.max_tokens, max_model_len)
        self.generator = generator
        self.residence = Residence.WAITING
        self.block_ids: list[int] = []
        self.num_computed_tokens = 0
        # Set by the engine when this step prefills a chunk only; None: all that is left.
        self.chunk_tokens: int | None = None
        self.last_progress_step = 0
        self.num_emitted_tokens = 0  # output tokens already reported to the caller
        self.finish_reason: FinishReason | None = None

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def is_prefill(self) -> bool:
        return _prefilling(self.num_computed_tokens, len(self.token_ids))

    def tokens_to_compute(self) -> int:
        """Tokens left before it samples: the rest of its history while prefilling, else the last
        token."""
        return len(self.token_ids) - self.num_computed_tokens if self.is_prefill else 1

    @property
    def step_tokens(self) -> int:
        """Tokens it feeds to the model this step."""
        return self.tokens_to_compute() if self.chunk_tokens is None else self.chunk_tokens

    @property
    def samples(self) -> bool:
        """Whether this step reaches the end of its history, and so samples a token."""
        return self.chunk_tokens is None

    def blocks_needed(self, block_size: int) -> int:
        """Blocks that must be held once this step's tokens are stored."""
        num_tokens = self.num_computed_tokens + self.step_tokens
        return -(-num_tokens // block_size)

    def view(self) -> SeqView:
        return self._view(self.num_computed_tokens, len(self.token_ids), self.last_progress_step)

    def view_after_step(self, step: int) -> SeqView | None:
        """Its view once this step, which runs it, is in, unless it samples a stop token; None
        when the step ends it on length. What the engine plans the next step on while the GPU is
        still busy with this one."""
        if not self.samples:
            num_computed = self.num_computed_tokens + self.step_tokens
            return self._view(num_computed, len(self.token_ids), step)
        num_tokens = len(self.token_ids) + 1
        if num_tokens >= self.max_total_tokens:
            return None
        return self._view(len(self.token_ids), num_tokens, step)

    def _view(self, num_computed: int, num_tokens: int, last_progress_step: int) -> SeqView:
        prefill = _prefilling(num_computed, num_tokens)
        chunking = self.residence != Residence.WAITING and prefill
        return SeqView(
            seq_id=self.seq_id,
            arrival=self.seq_id,
            # For a waiting sequence the "prompt" is all it must prefill: after a recompute that
            # includes the tokens it generated before.
            num_prompt_tokens=num_tokens if prefill else self.num_prompt_tokens,
            num_computed_tokens=num_computed,
            max_total_tokens=self.max_total_tokens,
            residence=self.residence,
            last_progress_step=last_progress_step,
            num_prefill_left=num_tokens - num_computed if chunking else 0,
        )


def _prefilling(num_computed: int, num_tokens: int) -> bool:
    """Whether more than the last of num_tokens is still to compute (or nothing was yet)."""
    return num_computed == 0 or num_computed < num_tokens - 1


def decoding_sequences(
    num: int, length: int, block_size: int, first_block: int, vocab: int, first_id: int = 0
) -> list[Sequence]:
    """`num` sequences of `length` random tokens in the middle of decoding (the last token is the
    next step's input), each on its own run of blocks from `first_block` on: the iterations the
    profiler and the benchmarks time."""
    seqs = []
    blocks_per_seq = -(-length // block_size)
    for i in range(num):
        tokens = [int(x) for x in torch.randint(0, vocab, (length,))]
        s = Sequence(first_id + i, str(first_id + i), tokens, SamplingParams(max_tokens=1),
                     length + 1, None)  # fmt: skip
        s.num_computed_tokens = length - 1
        start = first_block + i * blocks_per_seq
        s.block_ids = list(range(start, start + blocks_per_seq))
        seqs.append(s)
    return seqs
