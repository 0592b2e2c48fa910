"""Before a pass: would offloading pay, and how many new prompts can the CPU take on?

Both answers come from one split over the incoming state, with as would-be CPU decodes: the requests
already on the CPU (prompts part-way in there included), the GPU decodes that would have to leave,
and the prompts the GPU cannot take.
Policy `auto` offloads only when that beats the GPU alone, rated on the same sequences. The count of
prompts the split takes is the CPU admission quota of the iteration: 0 once the CPU cannot keep up
with the requests it holds, so prompts wait in the queue instead of starving on the CPU.

Where offloading pays clearly (CLEAR_GAIN), the quota is also weighed against the GPU work of
prefilling the queue (up to the token budget): the CPU takes as many prompts as it keeps up with
while the GPU prefills, up to `SplitRule.round_robin` requests per decode it keeps up with in a
decode iteration (scheduler.cpu_round_robin; 3: each then decodes at least every third iteration
on average, and the decode iterations after the prompts stay at the CPU's balance instead of its
pace). Prompts left in the queue would otherwise be prefilled later, a few at a time, in
iterations that stall every decode for a prefill, and the batch would end in a tail the CPU cannot
fill; on the CPU they are ready for its next free decode slot (ageing keeps each progressing).

When the split takes none of the requests already on the CPU and offloading does not pay, `auto`
sends them home (scheduler.py, `_swap_in`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from neod.sched.cost import BatchLoad, CostModel, rate_beats, sequential_s
from neod.sched.split import CpuCandidate, SplitRule, split_cpu_decodes
from neod.sched.views import CacheView, Limits, SeqView, blocks_for

# Waiting prompts weighed as future CPU decodes: enough to fill any CPU's hidden capacity, few
# enough to keep a pass well under a millisecond.
MAX_PROMPTS = 128
# Least predicted gain of a decode iteration over the GPU alone before the CPU takes prompts
# beyond the decode quota: it holds each for its whole output, and where offloading only just
# pays, `auto` may soon send them home, which costs more than their later prefills would have.
CLEAR_GAIN = 0.10


class _Knobs(Protocol):
    cost: CostModel
    num_layers: int
    auto_margin: float
    split_rule: SplitRule


def candidates(seqs: Sequence[SeqView]) -> list[CpuCandidate]:
    return [CpuCandidate(s.seq_id, s.decode_ctx_tokens) for s in seqs]


def outlook(
    knobs: _Knobs,
    gpu: Sequence[SeqView],
    cpu: Sequence[SeqView],
    waiting: Sequence[SeqView],
    cache: CacheView,
    limits: Limits,
) -> tuple[bool, int, bool]:
    """(offloading beats the GPU alone, prompts the CPU would keep up with, the split decodes any
    of the requests already on the CPU); inputs oldest first."""
    bs, budget = cache.block_size, limits.max_batch_size
    on_gpu = list(gpu[:budget])
    growth = sum(1 for s in on_gpu if s.num_computed_tokens % bs == 0)
    free = cache.num_free_gpu_blocks - growth
    leaving = []
    while free < 0 and on_gpu:
        leaving.append(on_gpu.pop())
        free += leaving[-1].decode_blocks(bs)
    held = candidates(cpu) + candidates(leaving)
    num_gpu, gpu_ctx = len(on_gpu), sum(s.decode_ctx_tokens for s in on_gpu)
    prompts: list[CpuCandidate] = []
    cpu_room = cache.num_free_cpu_blocks
    for w in waiting:  # on the GPU while it has room, else future CPU decodes
        if num_gpu + len(held) + len(prompts) >= budget or len(prompts) >= MAX_PROMPTS:
            break
        need = blocks_for(w.num_prompt_tokens, bs)
        if need <= free:
            free -= need
            num_gpu, gpu_ctx = num_gpu + 1, gpu_ctx + w.num_prompt_tokens + 1
        elif need <= cpu_room:
            cpu_room -= need
            prompts.append(CpuCandidate(w.seq_id, w.num_prompt_tokens + 1))
    if not held and not prompts:
        return False, 0, False
    load = BatchLoad().plus_gpu_decodes(num_gpu, gpu_ctx)
    split = split_cpu_decodes(
        knobs.cost,
        knobs.num_layers,
        load,
        (),
        held + prompts,
        max(0, budget - num_gpu),
        0,
        knobs.split_rule,
    )
    taken = {*split.b0_ids, *split.b1_ids}
    quota = _quota(taken, held, prompts)
    gpu_s = sequential_s(knobs.cost, knobs.num_layers, load, 0)
    placing = bool(leaving or prompts)  # else nothing new would go to the CPU
    pays = placing and rate_beats(
        split.num_tokens_out, split.iter_s, num_gpu, gpu_s, knobs.auto_margin
    )
    clear = pays and rate_beats(split.num_tokens_out, split.iter_s, num_gpu, gpu_s, CLEAR_GAIN)
    if clear and quota < len(prompts):
        room = knobs.split_rule.round_robin * len(taken) - len(held)
        if room > quota:
            while_prefilling = _quota_while_prefilling(
                knobs, num_gpu, gpu_ctx, held, prompts, waiting, limits
            )
            quota = max(quota, min(while_prefilling, room))
    return pays, quota, any(s.seq_id in taken for s in cpu)


def _quota(taken: set[int], held: Sequence[CpuCandidate], prompts: Sequence[CpuCandidate]) -> int:
    """Prompts a split took, once it took every request the CPU already holds (else none)."""
    if not all(c.seq_id in taken for c in held):
        return 0
    return sum(1 for c in prompts if c.seq_id in taken)


def _quota_while_prefilling(
    knobs: _Knobs,
    num_gpu: int,
    gpu_ctx: int,
    held: Sequence[CpuCandidate],
    prompts: Sequence[CpuCandidate],
    waiting: Sequence[SeqView],
    limits: Limits,
) -> int:
    """The quota against the GPU decodes plus one iteration's prefill of the queue."""
    prefilling = _queue_prefill(knobs.cost, waiting, limits.max_tokens_in_batch)
    # No more prompts than one iteration prefills are admitted: the rest wait for the next pass.
    first = prompts[: prefilling.num_seqs]
    split = split_cpu_decodes(
        knobs.cost,
        knobs.num_layers,
        prefilling.plus_gpu_decodes(num_gpu, gpu_ctx),
        (),
        [*held, *first],
        max(0, limits.max_batch_size - num_gpu),
        0,
        knobs.split_rule,
    )
    return _quota({*split.b0_ids, *split.b1_ids}, held, first)


def _queue_prefill(cost: CostModel, waiting: Sequence[SeqView], budget: int) -> BatchLoad:
    """The GPU work of one iteration prefilling the queue, oldest first, up to the token budget
    (a prompt longer than what is left goes in a chunk)."""
    lens = []
    for w in waiting:
        if budget <= 0:
            break
        lens.append(min(w.num_prompt_tokens, budget))
        budget -= lens[-1]
    return BatchLoad(sum(lens), cost.prefill_attn_s(lens), len(lens))
