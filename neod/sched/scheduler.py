"""NEO's load-aware scheduler: state in, plan out, once per iteration.

One pass, in this order (docs/scheduler.md has the reasoning and the guarantees):

1. Drop what can never run (KV larger than any usable pool).
2. `outlook`: whether offloading pays (policy `auto`) and how many prompts the CPU can take on.
3. Decode slots: aged sequences first (any device, stalest first), then GPU decodes in FCFS order.
4. Memory: CPU decodes' growth and the rest of the prompts under way there are reserved; when the
   GPU cannot hold its decodes' growth and the rest of its prompts under way, the newest GPU
   sequences leave it: swapped to the CPU when the policy offloads, else preempted.
5. Swap-in, oldest first, only when nothing was swapped out and GPU use stays under the lower
   threshold (hysteresis). Under `auto`, when neither offloading nor decoding what the CPU holds
   pays (or the engine's guard paused offloading), CPU requests that the GPU pool can hold come
   home instead: swapped in under the same threshold, else recomputed where that costs less than
   waiting on the CPU for room.
6. Prefills in FCFS order: first the next chunks of prefills under way, then new prompts: on the
   GPU if it has room (a prompt longer than what is left of the token budget starts in chunks
   there), else on the CPU when the policy offloads and the quota allows: whole, or in chunks when
   it is longer than the whole token budget (each chunk's attention reads the prompt's earlier KV
   from the host pool over the bus). A prompt that does not fit is skipped, so it never blocks the
   queue; once it has waited `wait_age_limit` steps nothing younger is admitted until it is in.
7. CPU decodes and the mode: `split.split_cpu_decodes` over the fixed GPU work.
"""

from __future__ import annotations

import heapq
import logging
import math
from collections.abc import Iterator, Sequence
from itertools import islice

from neod.sched.cost import BatchLoad, CostModel, sequential_s
from neod.sched.outlook import candidates, outlook
from neod.sched.plan import Plan
from neod.sched.split import CpuCandidate, DecodeSplit, SplitRule, split_cpu_decodes
from neod.sched.views import CacheView, Limits, Residence, SeqView, blocks_for

logger = logging.getLogger(__name__)
LOGGED_DROPS = 5  # unservable sequences named in the log line of a pass


class Scheduler:
    def __init__(
        self,
        cost_model: CostModel,
        num_layers: int,
        *,
        swap_in_frac: float = 0.95,
        age_limit: int = 4,
        wait_age_limit: int = 16,
        gpu_watermark_frac: float = 0.01,
        auto_margin: float = 0.03,
        split_rule: SplitRule = SplitRule(),
        log_drops: bool = True,
    ) -> None:
        """age_limit: a running sequence idle for this many steps is forced into the batch;
        wait_age_limit: a prompt waiting this long is no longer overtaken by younger ones;
        gpu_watermark_frac: share of GPU blocks a prefill leaves free while decodes run (they grow);
        auto_margin: how much faster offloading must be predicted before policy auto uses it;
        split_rule: how far past the balance point CPU decodes are taken (neod.sched.split);
        log_drops: warn of sequences that cannot be served (off where a caller reports them, as a
        simulation does)."""
        if num_layers < 1 or age_limit < 1 or wait_age_limit < 1:
            raise ValueError("num_layers, age_limit and wait_age_limit must be >= 1")
        if not 0.0 < swap_in_frac <= 1.0 or not 0.0 <= gpu_watermark_frac < 1.0:
            raise ValueError("swap_in_frac must be in (0, 1] and gpu_watermark_frac in [0, 1)")
        if auto_margin < 0.0:
            raise ValueError("auto_margin must be >= 0")
        self.cost = cost_model
        self.num_layers = num_layers
        self.swap_in_frac = swap_in_frac
        self.age_limit = age_limit
        self.wait_age_limit = wait_age_limit
        self.gpu_watermark_frac = gpu_watermark_frac
        self.auto_margin = auto_margin
        self.split_rule = split_rule
        self.log_drops = log_drops

    def schedule(
        self,
        waiting: Sequence[SeqView],
        running: Sequence[SeqView],
        cache: CacheView,
        limits: Limits,
        step: int,
    ) -> Plan:
        return _Pass(self, waiting, running, cache, limits, step).run()


class _Pass:
    """The working state of one schedule() call."""

    def __init__(
        self,
        sched: Scheduler,
        waiting: Sequence[SeqView],
        running: Sequence[SeqView],
        cache: CacheView,
        limits: Limits,
        step: int,
    ) -> None:
        self.sched, self.cache, self.limits, self.step = sched, cache, limits, step
        self.bs = cache.block_size
        self.offloads = limits.policy != "gpu-only"
        self.gpu_free, self.cpu_free = cache.num_free_gpu_blocks, cache.num_free_cpu_blocks
        self.slots, self.tokens = limits.max_batch_size, limits.max_tokens_in_batch
        self.plan = Plan()
        self.waiting = sorted(waiting, key=lambda s: s.arrival)
        on_gpu = sorted(
            (s for s in running if s.residence == Residence.GPU), key=lambda s: s.arrival
        )
        self.gpu = [s for s in on_gpu if not s.is_chunking]
        self.chunking = [s for s in on_gpu if s.is_chunking]  # part-way in a chunked prefill
        on_cpu = sorted(
            (s for s in running if s.residence == Residence.CPU), key=lambda s: s.arrival
        )
        self.cpu = [s for s in on_cpu if not s.is_chunking]
        self.cpu_chunking = [s for s in on_cpu if s.is_chunking]
        self.slotted: set[int] = set()  # running sequences holding a decode slot
        self.decoders: list[SeqView] = []  # GPU decodes
        self.cpu_cands: list[SeqView] = []  # may decode on the CPU this iteration
        # auto: whether offloading is predicted to pay, judged once on the incoming state
        self.offload_pays = False
        # auto: offloading does not pay, nor does decoding what the CPU holds: bring it home
        self.sends_home = False
        self.cpu_quota = 0  # prompts the CPU can take on this iteration
        # This iteration's prefills on either device: (sequence, tokens computed now)
        self.prefills: list[tuple[SeqView, int]] = []
        self.swap_blocks = 0  # blocks copied between the pools this iteration, per layer

    # ---- helpers ---------------------------------------------------------------------------------
    def _take(self, num_tokens: int) -> bool:
        if self.slots < 1 or self.tokens < num_tokens:
            return False
        self.slots -= 1
        self.tokens -= num_tokens
        return True

    def _refund(self, s: SeqView) -> None:
        if s.seq_id in self.slotted:
            self.slotted.discard(s.seq_id)
            self.slots += 1
            self.tokens += 1

    def _growth(self, s: SeqView) -> int:
        """1 when this iteration's token opens a new block."""
        return 1 if s.num_computed_tokens % self.bs == 0 else 0

    def _capacity(self) -> int:
        gpu = self.cache.num_gpu_blocks
        return max(gpu, self.cache.num_cpu_blocks) if self.offloads else gpu

    def _prefillable(self, num_tokens: int) -> bool:
        """Whole in one iteration or in chunks, on a pool the policy may use: the GPU's always,
        the CPU's when it offloads."""
        return blocks_for(num_tokens, self.bs) <= self._capacity()

    def _recomputable(self, s: SeqView) -> bool:
        return self._prefillable(s.num_computed_tokens + 1)

    def _may_offload(self, num_blocks: int) -> bool:
        if not self.offloads:
            return False
        # The GPU can never hold a sequence larger than its pool: the CPU is then its only home.
        return (
            self.limits.policy == "neo"
            or num_blocks > self.cache.num_gpu_blocks
            or self.offload_pays
        )

    def _unservable(self, s: SeqView, why: str) -> None:
        self.plan.unservable[s.seq_id] = why

    def _log_dropped(self) -> None:
        """One line per pass, however many were dropped (a lowered budget can drop a whole
        queue)."""
        dropped = self.plan.unservable
        if dropped and self.sched.log_drops:
            first = islice(dropped.items(), LOGGED_DROPS)
            shown = "; ".join(f"seq {sid}: {why}" for sid, why in first)
            more = len(dropped) - LOGGED_DROPS
            logger.warning("%d sequence(s) cannot be served: %s%s", len(dropped), shown,
                           f"; and {more} more" if more > 0 else "")

    # ---- the pass --------------------------------------------------------------------------------
    def run(self) -> Plan:
        self._drop_unservable()
        if self.offloads and not self.limits.offload_paused:
            self.offload_pays, self.cpu_quota, cpu_pays = outlook(
                self.sched,
                self.gpu,
                sorted((*self.cpu, *self.cpu_chunking), key=lambda s: s.arrival),
                self.waiting,
                self.cache,
                self.limits,
            )
            self.sends_home = self.limits.policy == "auto" and not (self.offload_pays or cpu_pays)
        elif self.offloads:  # paused: only what the GPU pool cannot hold goes to the CPU
            self.sends_home, self.cpu_quota = True, len(self.waiting)
        self._assign_slots()
        if self.offloads:
            self._reserve_cpu_growth()
        self._make_gpu_room()
        if self.offloads:
            if self.sends_home or not self.plan.swap_out:
                threshold = math.floor(self.sched.swap_in_frac * self.cache.num_gpu_blocks)
                self._swap_in(threshold, self.sends_home)
            admit = True
        else:
            admit = self._leave_cpu()
        if admit:
            self._admit_prefills()
        self._split()
        self._log_dropped()
        self.plan.sends_home = self.sends_home
        return self.plan

    def _drop_unservable(self) -> None:
        cap, bs = self._capacity(), self.bs
        for group in (self.gpu, self.cpu):
            for s in [s for s in group if s.num_computed_tokens + 1 > cap * bs]:
                self._unservable(s, f"its KV outgrows the largest pool it may use ({cap} blocks)")
                group.remove(s)
        # Prompts, and those part-way in on the CPU when the policy no longer offloads.
        for group in (self.waiting, self.cpu_chunking):
            for w in [w for w in group if not self._prefillable(w.num_prompt_tokens)]:
                n = w.num_prompt_tokens
                self._unservable(w, (
                    f"{n} tokens to prefill need {blocks_for(n, bs)} KV blocks, more than the "
                    f"largest pool the policy may use ({cap} blocks)"
                ))
                group.remove(w)

    def _assign_slots(self) -> None:
        limit = self.sched.age_limit
        aged = [
            s
            for s in (*self.gpu, *(self.cpu if self.offloads else ()))
            if self.step - s.last_progress_step >= limit
        ]
        for s in sorted(aged, key=lambda s: (s.last_progress_step, s.arrival)):
            if self._take(1):
                self.slotted.add(s.seq_id)
        for s in self.gpu:
            if s.seq_id in self.slotted or self._take(1):
                self.slotted.add(s.seq_id)
                self.decoders.append(s)

    def _victims(self, group: list[SeqView]) -> Iterator[SeqView]:
        """Newest first; those that would have to be failed after all that can be moved."""
        newest_first = group[::-1]
        yield from (s for s in newest_first if self._recomputable(s))
        yield from (s for s in newest_first if not self._recomputable(s))

    def _rest(self, s: SeqView) -> int:
        """Blocks a prefill under way still needs for all of its prompt."""
        return blocks_for(s.num_computed_tokens + s.num_prefill_left, self.bs) - s.held_blocks(
            self.bs
        )

    def _reserve_cpu_growth(self) -> None:
        """The CPU decodes' growth and the rest of the prompts under way there (admitted with room
        for all of it, which stays theirs); the newest residents leave while that does not fit."""
        self.cpu_cands = list(self.cpu)
        growth = sum(self._growth(s) for s in self.cpu)
        reserved = sum(self._rest(s) for s in self.cpu_chunking)
        residents = sorted((*self.cpu, *self.cpu_chunking), key=lambda s: s.arrival)
        for v in self._victims(residents):
            if growth + reserved <= self.cpu_free:
                break
            self._evict(v)
            self.cpu_free += v.held_blocks(self.bs)
            if v.is_chunking:
                self.cpu_chunking.remove(v)
                reserved -= self._rest(v)
                continue
            self.cpu.remove(v)
            self.cpu_cands.remove(v)
            growth -= self._growth(v)
        self.cpu_free -= growth + reserved

    def _evict(self, v: SeqView) -> None:
        """Preempt v for recompute, or fail it when its context can no longer be recomputed."""
        self._refund(v)
        if self._recomputable(v):
            self.plan.preempt.append(v.seq_id)
        else:
            self._unservable(v, "evicted under memory pressure and too long to recompute")

    def _make_gpu_room(self) -> None:
        """As _reserve_cpu_growth, on the GPU: the newest residents are swapped out (when the
        policy offloads) or preempted. Without the prompts' reserved rest, decodes growing into
        it would hold a prefill under way back until they finish."""
        growth = sum(self._growth(s) for s in self.decoders)
        reserved = sum(self._rest(s) for s in self.chunking)
        residents = sorted((*self.gpu, *self.chunking), key=lambda s: s.arrival)
        for v in self._victims(residents):
            if growth + reserved <= self.gpu_free:
                break
            if v.is_chunking:  # its prompt is not in: prefilled again later, never swapped
                self._evict(v)
                self.chunking.remove(v)
                self.gpu_free += v.held_blocks(self.bs)
                reserved -= self._rest(v)
                continue
            if v in self.decoders:
                growth -= self._growth(v)
                self.decoders.remove(v)
            need = v.decode_blocks(self.bs)
            if need <= self.cpu_free and self._may_offload(need):
                self.plan.swap_out.append(v.seq_id)
                self.swap_blocks += v.held_blocks(self.bs)
                # Its KV, plus this iteration's token should it decode on the CPU.
                self.cpu_free -= need
                self.cpu_cands.append(v)
                self._refund(v)
            else:
                self._evict(v)
            self.gpu.remove(v)
            self.gpu_free += v.held_blocks(self.bs)
        self.gpu_free -= growth + reserved

    def _swap_in(self, threshold: int, send_home: bool = False) -> None:
        """Oldest first, CPU requests come home while GPU use stays under the threshold. With
        send_home (auto, when the CPU's work does not pay), those that do not fit now are
        recomputed where the prefill costs less than what waiting on the CPU for GPU room would
        add; requests larger than the GPU pool stay (the CPU is their only home)."""
        used = self.cache.num_gpu_blocks - self.gpu_free
        # Steps until each GPU slot frees: a request left waiting takes the first to free, then
        # holds it for its own remaining tokens (one slot per request: similar sizes).
        frees = sorted(v.max_total_tokens - v.num_computed_tokens for v in self.gpu)
        for s in list(self.cpu_cands):
            need = s.decode_blocks(self.bs)
            if used + need <= threshold:
                used += need
                self.gpu_free -= need
                self.plan.swap_in.append(s.seq_id)
                self.swap_blocks += s.held_blocks(self.bs)
                if s.seq_id in self.slotted or self._take(1):
                    self.slotted.add(s.seq_id)
                    self.decoders.append(s)
            elif (
                send_home
                and need <= self.cache.num_gpu_blocks
                and self._recomputable(s)
                and self._recompute_pays(s, self._room_in(frees))
            ):
                self._refund(s)
                self.plan.preempt.append(s.seq_id)
            else:
                if frees:
                    wait = heapq.heappop(frees)
                    heapq.heappush(frees, wait + s.max_total_tokens - s.num_computed_tokens)
                continue
            self.cpu_free += need  # its blocks and the growth reserved for it
            self.cpu_cands.remove(s)

    def _room_in(self, frees: list[int]) -> int | None:
        """Steps until the GPU has room for the next request sent home (None: never). Only while
        the engine's guard pauses offloading, a measured loss, is the wait taken as the GPU
        decodes' remaining tokens say; otherwise offloading is only predicted not to pay, a
        prediction that flips back and forth near break-even, and a request is thrown away only
        where even the shortest wait, one decode on the CPU, costs more than its prefill."""
        if not self.limits.offload_paused:
            return 1
        return frees[0] if frees else None

    def _recompute_pays(self, s: SeqView, wait_steps: int | None) -> bool:
        """Whether prefilling s again costs less than staying on the CPU until the GPU has room
        for it, about `wait_steps` from now (None: no GPU decode frees any): meanwhile the
        fairness rule decodes it there once every `age_limit` steps (attention and copies, none
        hidden), then it is swapped in. Recomputed, it waits for the same room in the queue."""
        cost, n = self.sched.cost, s.decode_ctx_tokens
        remaining = s.max_total_tokens - s.num_computed_tokens
        on_cpu = remaining
        if wait_steps is not None:
            on_cpu = min(remaining, -(-wait_steps // self.sched.age_limit))
        stay_s = on_cpu * (cost.cpu_decode_attn_s(1, n) + cost.transfer_s(1))
        if on_cpu < remaining:
            stay_s += cost.swap_s(s.held_blocks(self.bs))
        return cost.linear_s(n) + cost.prefill_attn_s([n]) < stay_s

    def _leave_cpu(self) -> bool:
        """gpu-only: bring CPU requests home or preempt them; False while one must still wait."""
        settled = True
        for s in self.cpu:
            need = s.decode_blocks(self.bs)
            if need <= self.gpu_free:
                self.gpu_free -= need
                self.cpu_free += s.held_blocks(self.bs)
                self.plan.swap_in.append(s.seq_id)
                self.swap_blocks += s.held_blocks(self.bs)
                if self._take(1):
                    self.slotted.add(s.seq_id)
                    self.decoders.append(s)
            elif self._recomputable(s):
                self.plan.preempt.append(s.seq_id)
                self.cpu_free += s.held_blocks(self.bs)
            else:
                settled = False  # admitting prompts now would take the room it waits for
        for s in self.cpu_chunking:  # recomputable: _drop_unservable failed the others
            self.plan.preempt.append(s.seq_id)
            self.cpu_free += s.held_blocks(self.bs)
        self.cpu_chunking = []
        return settled

    def _prefill(self, s: SeqView, num_tokens: int, left: int, on_gpu: bool) -> None:
        """num_tokens of the `left` its prefill has to go, this iteration."""
        self._take(num_tokens)
        (self.plan.prefill_gpu if on_gpu else self.plan.prefill_cpu).append(s.seq_id)
        if num_tokens < left:
            self.plan.chunked[s.seq_id] = num_tokens
        self.prefills.append((s, num_tokens))
        if not on_gpu:  # its KV leaves the GPU layer by layer
            self.swap_blocks += blocks_for(num_tokens, self.bs)

    def _continue_chunks(self) -> bool:
        """The next chunk of each prefill under way (its room is reserved), oldest first; False
        when the budget left none for one of them (then no new prompt goes before it)."""
        for chunking, on_gpu in ((self.chunking, True), (self.cpu_chunking, False)):
            for s in chunking:
                if self.slots < 1 or self.tokens < 1:
                    return False
                n = min(s.num_prefill_left, self.tokens)
                self._prefill(s, n, s.num_prefill_left, on_gpu)
        return True

    def _admit_prefills(self) -> None:
        cache, bs = self.cache, self.bs
        watermark = (
            math.ceil(self.sched.gpu_watermark_frac * cache.num_gpu_blocks) if self.decoders else 0
        )
        cpu_reserve = min(cache.num_gpu_blocks, cache.num_cpu_blocks // 2)  # for later swap-outs
        chunks_in = self._continue_chunks()
        shortest_misfit = math.inf  # nothing frees up during the loop: longer prompts fail too
        for w in self.waiting:
            if self.slots < 1 or self.tokens < 1:
                break
            n = w.num_prompt_tokens
            aged = self.step - w.last_progress_step >= self.sched.wait_age_limit
            # Whole, or in chunks of at least a block (or the whole budget, if smaller): a prompt
            # longer than what is left of the budget starts now and goes on in later iterations.
            fits = self.tokens >= min(n, bs, self.limits.max_tokens_in_batch)
            if n < shortest_misfit and fits:
                need = blocks_for(n, bs)
                if chunks_in and need + watermark <= self.gpu_free:
                    self.gpu_free -= need  # all of it: later chunks find their room
                    self._prefill(w, min(n, self.tokens), n, on_gpu=True)
                    continue
                reserve = min(cpu_reserve, max(0, cache.num_cpu_blocks - need))
                # The quota keeps prompts off a CPU that cannot keep up; one that only the CPU
                # can ever hold goes there anyway once it has waited its turn.
                quota = self.cpu_quota > 0 or (aged and need > cache.num_gpu_blocks)
                # Whole, or in chunks when no iteration could ever take it whole.
                if (
                    (self.tokens >= n or n > self.limits.max_tokens_in_batch)
                    and chunks_in
                    and quota
                    and need + reserve <= self.cpu_free
                    and self._may_offload(need)
                ):
                    self.cpu_quota = max(0, self.cpu_quota - 1)
                    self.cpu_free -= need  # all of it: later chunks find their room
                    self._prefill(w, min(n, self.tokens), n, on_gpu=False)
                    continue
                shortest_misfit = n
            if aged:
                break  # it has waited long enough: nothing younger overtakes it

    def _gpu_load(self, prefills: Sequence[tuple[SeqView, int]] = ()) -> BatchLoad:
        # A chunk of n tokens after a prefix of c attends over an area of n * c + n^2 / 2: that of
        # a whole prompt of sqrt(n^2 + 2 n c) tokens.
        lens = [
            math.isqrt(n * n + 2 * n * s.num_computed_tokens) for s, n in prefills
        ]
        prefill_s = self.sched.cost.prefill_attn_s(lens) if lens else 0.0
        # A chunk of a prompt the host pool holds reads the earlier chunks' KV over the bus before
        # its attention, on the compute stream: priced as swapped blocks, but not hidden.
        host_prefix = sum(
            s.held_blocks(self.bs) for s, _ in prefills if s.residence == Residence.CPU
        )
        if host_prefix:
            prefill_s += self.sched.cost.swap_s(host_prefix)
        num_tokens = sum(n for _, n in prefills)
        base = BatchLoad(num_tokens=num_tokens, prefill_attn_s=prefill_s, num_seqs=len(lens))
        return base.plus_gpu_decodes(
            len(self.decoders), sum(s.decode_ctx_tokens for s in self.decoders)
        )

    def _best_split(
        self,
        base: BatchLoad,
        forced: list[CpuCandidate],
        optional: list[CpuCandidate],
        swap_blocks: int,
        max_optional: int | None = None,
    ) -> DecodeSplit:
        if max_optional is None:
            max_optional = min(self.slots, self.tokens)
        sched = self.sched
        return split_cpu_decodes(
            sched.cost,
            sched.num_layers,
            base,
            forced,
            optional,
            max(0, max_optional),
            swap_blocks,
            sched.split_rule,
        )

    def _split(self) -> None:
        plan = self.plan
        forced = [s for s in self.cpu_cands if s.seq_id in self.slotted]
        optional = sorted(
            (s for s in self.cpu_cands if s.seq_id not in self.slotted),
            key=lambda s: (s.last_progress_step, s.arrival),
        )
        base = self._gpu_load(self.prefills)
        split = self._best_split(base, candidates(forced), candidates(optional), self.swap_blocks)
        order = {s.seq_id: s.arrival for s in self.cpu_cands}
        plan.decode_gpu = [s.seq_id for s in sorted(self.decoders, key=lambda s: s.arrival)]
        plan.decode_cpu_b0 = sorted(split.b0_ids, key=order.__getitem__)
        plan.decode_cpu_b1 = sorted(split.b1_ids, key=order.__getitem__)
        plan.pipelined = split.pipelined
        plan.predicted_iter_s = split.iter_s
        plan.predicted_gpu_alone_s = sequential_s(
            self.sched.cost, self.sched.num_layers, base, self.swap_blocks
        )
        ctx = {s.seq_id: s.decode_ctx_tokens for s in self.cpu_cands}
        plan.cpu_batches = [
            (len(ids), sum(ctx[i] for i in ids)) for ids in (split.b0_ids, split.b1_ids) if ids
        ]
        plan.predicted_cpu_s = self.sched.num_layers * sum(
            self.sched.cost.cpu_decode_attn_s(n, tokens) for n, tokens in plan.cpu_batches
        )
