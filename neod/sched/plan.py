"""One iteration's plan, and the checker that proves a plan can be applied as documented.

The engine applies a plan in a fixed order: (1) free the blocks of `unservable` and `preempt`
sequences, (2) `swap_out` (allocate on the CPU, then free on the GPU), (3) `swap_in` (allocate on
the GPU, then free on the CPU), (4) allocate what the prefills and decodes need. `check_plan`
replays exactly that order on block counts, so a plan it accepts can never exhaust a pool part-way
through; the scheduler's tests run every plan through it, and the engine may too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from neod.sched.views import CacheView, Limits, Residence, SeqView, blocks_for


@dataclass
class Plan:  # every list holds seq_ids, oldest first
    prefill_gpu: list[int] = field(
        default_factory=list
    )  # prompts (or their next chunk) prefilled, KV stays on the GPU
    prefill_cpu: list[int] = field(
        default_factory=list
    )  # prompts (or their next chunk) prefilled, KV leaves layer by layer for the host pool
    decode_gpu: list[int] = field(default_factory=list)
    decode_cpu_b0: list[int] = field(
        default_factory=list
    )  # CPU-decoded, in the sub-batch with the GPU work
    decode_cpu_b1: list[int] = field(
        default_factory=list
    )  # CPU-decoded, second sub-batch (pipelined only)
    swap_out: list[int] = field(default_factory=list)  # GPU -> CPU before this iteration's compute
    swap_in: list[int] = field(default_factory=list)  # CPU -> GPU before this iteration's compute
    preempt: list[int] = field(
        default_factory=list
    )  # KV dropped, back to waiting (recompute later)
    # Prefills that compute only part of what is left of their prompt this iteration: seq_id
    # -> tokens. The rest follows in later iterations (waiting prompts start, running ones go on).
    chunked: dict[int, int] = field(default_factory=dict)
    pipelined: bool = False
    # auto: bringing the CPU's requests home (offloading judged not to pay); the CPU decodes of
    # such an iteration are those that ageing forces, not offloading that was chosen.
    sends_home: bool = False
    predicted_iter_s: float = 0.0
    predicted_gpu_alone_s: float = 0.0  # the same iteration without its CPU decodes
    predicted_cpu_s: float = 0.0  # the CPU decodes' attention, all layers and sub-batches
    # Per sub-batch with CPU decodes: (decodes, their context tokens), what the CPU runs per layer.
    cpu_batches: list[tuple[int, int]] = field(default_factory=list)
    # Can never run under the current limits and policy (KV larger than every pool the policy may
    # use), each with why: the engine frees their blocks and finishes them (an error for those that
    # produced no token yet, length for the others).
    unservable: dict[int, str] = field(default_factory=dict)

    @property
    def num_seqs(self) -> int:
        return (
            len(self.prefill_gpu)
            + len(self.prefill_cpu)
            + len(self.decode_gpu)
            + len(self.decode_cpu_b0)
            + len(self.decode_cpu_b1)
        )


def check_plan(
    plan: Plan,
    waiting: Sequence[SeqView],
    running: Sequence[SeqView],
    cache: CacheView,
    limits: Limits,
) -> list[str]:
    """Every way the plan breaks the engine's contract; empty when it can be applied."""
    errors: list[str] = []
    bs = cache.block_size
    views = {s.seq_id: s for s in (*waiting, *running)}
    waiting_ids = {s.seq_id for s in waiting}
    compute = (
        plan.prefill_gpu,
        plan.prefill_cpu,
        plan.decode_gpu,
        plan.decode_cpu_b0,
        plan.decode_cpu_b1,
    )
    listed = [sid for ids in (*compute, plan.preempt, plan.unservable) for sid in ids]
    if len(listed) != len(set(listed)):
        errors.append("a sequence is listed twice among compute, preempt and unservable")
    for sid in (*listed, *plan.swap_out, *plan.swap_in):
        if sid not in views:
            errors.append(f"unknown seq_id {sid}")
            return errors
    for ids, where in ((plan.prefill_gpu, Residence.GPU), (plan.prefill_cpu, Residence.CPU)):
        for sid in ids:
            view = views[sid]
            if sid not in waiting_ids and not view.is_chunking:
                errors.append(
                    f"seq {sid} is prefilled but neither waiting nor part-way in a prefill"
                )
            elif view.is_chunking and view.residence != where:
                errors.append(f"seq {sid} goes on with its prefill away from its KV")
    prefills = {*plan.prefill_gpu, *plan.prefill_cpu}
    for sid, n in plan.chunked.items():
        if sid not in prefills:
            errors.append(f"seq {sid} has a chunk but is no prefill")
        elif not 0 < n < views[sid].prefill_left:
            errors.append(f"seq {sid}: a chunk of {n} tokens of {views[sid].prefill_left} left")
    for sid in (*plan.swap_out, *plan.swap_in, *plan.decode_gpu, *plan.decode_cpu_b0,
                *plan.decode_cpu_b1):  # fmt: skip
        if views[sid].is_chunking:
            errors.append(f"seq {sid} is part-way in a prefill but swapped or decoded")
    residence = {s.seq_id: s.residence for s in running}
    for sid in plan.swap_out:
        if residence.get(sid) != Residence.GPU or sid in plan.preempt or sid in plan.unservable:
            errors.append(f"seq {sid} swapped out but not a live GPU sequence")
        residence[sid] = Residence.CPU
    for sid in plan.swap_in:
        if residence.get(sid) != Residence.CPU or sid in plan.preempt or sid in plan.unservable:
            errors.append(f"seq {sid} swapped in but not a live CPU sequence")
        residence[sid] = Residence.GPU
    if set(plan.swap_out) & set(plan.swap_in):
        errors.append("a sequence is swapped both ways")
    for ids, where in (
        (plan.decode_gpu, Residence.GPU),
        (plan.decode_cpu_b0, Residence.CPU),
        (plan.decode_cpu_b1, Residence.CPU),
    ):
        for sid in ids:
            if residence.get(sid) != where:
                errors.append(f"seq {sid} decodes on {where.name} but lives elsewhere")
    if plan.pipelined != bool(plan.decode_cpu_b1):
        errors.append("pipelined mode and a non-empty decode_cpu_b1 go together")
    num_tokens = sum(
        plan.chunked.get(sid) or views[sid].prefill_left
        for sid in (*plan.prefill_gpu, *plan.prefill_cpu)
    )
    num_tokens += len(plan.decode_gpu) + len(plan.decode_cpu_b0) + len(plan.decode_cpu_b1)
    if plan.num_seqs > limits.max_batch_size:
        errors.append(f"{plan.num_seqs} sequences exceed max_batch_size {limits.max_batch_size}")
    if num_tokens > limits.max_tokens_in_batch:
        errors.append(
            f"{num_tokens} tokens exceed max_tokens_in_batch {limits.max_tokens_in_batch}"
        )
    if limits.policy == "gpu-only" and (
        plan.prefill_cpu or plan.swap_out or plan.decode_cpu_b0 or plan.decode_cpu_b1
    ):
        errors.append("policy gpu-only but the plan uses the CPU")
    errors += _replay_blocks(plan, views, cache, bs)
    return errors


def _replay_blocks(plan: Plan, views: dict[int, SeqView], cache: CacheView, bs: int) -> list[str]:
    free = {Residence.GPU: cache.num_free_gpu_blocks, Residence.CPU: cache.num_free_cpu_blocks}
    errors: list[str] = []

    def take(where: Residence, n: int, what: str) -> None:
        free[where] -= n
        if free[where] < 0:
            errors.append(f"{where.name} pool short by {-free[where]} blocks at {what}")

    for sid in (*plan.unservable, *plan.preempt):
        view = views[sid]
        if view.residence != Residence.WAITING:
            free[view.residence] += view.held_blocks(bs)
    for sid in plan.swap_out:
        take(Residence.CPU, views[sid].held_blocks(bs), "swap-out")
        free[Residence.GPU] += views[sid].held_blocks(bs)
    for sid in plan.swap_in:
        take(Residence.GPU, views[sid].held_blocks(bs), "swap-in")
        free[Residence.CPU] += views[sid].held_blocks(bs)
    for ids, where in ((plan.prefill_gpu, Residence.GPU), (plan.prefill_cpu, Residence.CPU)):
        for sid in ids:
            view = views[sid]
            end = view.num_computed_tokens + (plan.chunked.get(sid) or view.prefill_left)
            take(where, blocks_for(end, bs) - view.held_blocks(bs), "prefill")
    for ids, where in (
        (plan.decode_gpu, Residence.GPU),
        (plan.decode_cpu_b0, Residence.CPU),
        (plan.decode_cpu_b1, Residence.CPU),
    ):
        for sid in ids:
            view = views[sid]
            take(where, view.decode_blocks(bs) - view.held_blocks(bs), "decode")
    return errors
