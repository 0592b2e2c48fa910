"""The engine: owns the model, both KV pools and the request states; one `step()` is one
iteration.

Threading contract: `add_request` and `abort_request` may be called from any thread; they only
post to an inbox. Everything else, `step()` above all, runs on the single engine
thread, which is the only one that touches sequences, allocators and tensors. Every request that
was added ends in exactly one finished `RequestOutput`, whatever happens (stop, length, abort,
error).
"""

from __future__ import annotations

import functools
import logging
import math
import queue
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch

from neod.cache.allocator import BlockAllocator
from neod.engine.batch import SubBatch, build_sub_batch
from neod.engine.corrections import CorrectionsKeeper
from neod.engine.guard import OffloadGuard
from neod.engine.request import EngineError, FinishReason, RequestOutput, SamplingParams
from neod.engine.runtime import EngineRuntime, build_runtime
from neod.engine.sampler import sample
from neod.engine.sequence import Sequence
from neod.engine.stats import EngineStats
from neod.sched import (
    POLICIES,
    CacheView,
    CalibratedCostModel,
    Limits,
    Plan,
    Residence,
    SeqView,
    SplitRule,
)

logger = logging.getLogger(__name__)

# An item another thread posts to the engine: (safe to apply while a step is under way, apply).
_Posted = tuple[bool, Callable[[list[RequestOutput]], None]]


class Engine:
    def __init__(self, cfg: Any, runtime: EngineRuntime | None = None) -> None:
        self.rt = runtime if runtime is not None else build_runtime(cfg)
        rt = self.rt
        self.block_size = rt.layout.block_size
        self.gpu_blocks = BlockAllocator(rt.num_gpu_blocks)
        self.cpu_blocks = BlockAllocator(rt.num_cpu_blocks)
        self.limits = Limits(
            max_batch_size=cfg.scheduler.max_batch_size,
            max_tokens_in_batch=cfg.scheduler.max_tokens_in_batch,
            policy=cfg.scheduler.policy if rt.cpu_pool is not None else "gpu-only",
        )
        # What other threads post, in order: (safe while a step is under way, apply).
        self._inbox: queue.SimpleQueue[_Posted] = queue.SimpleQueue()
        self._held: list[_Posted] = []  # taken from the inbox mid-step, applied at the next start
        self._next_seq_id = 0
        self._outbox: list[RequestOutput] = []  # this step's outputs, until returned
        self._by_request: dict[str, Sequence] = {}
        self.waiting: list[Sequence] = []  # ordered by arrival
        self.running: dict[int, Sequence] = {}
        self.step_index = 0
        self.iteration_stats = EngineStats()
        self.guard = OffloadGuard()
        self.corrections = CorrectionsKeeper(rt)
        self.corrections.restore()
        self._default_generator = torch.Generator(device=rt.device)
        self._default_generator.manual_seed(cfg.model.seed)
        # Plan each step while the GPU computes the previous one (`_plan_ahead`); on a CPU the
        # forward pass returns only once computed, so there is nothing to overlap.
        self.plan_ahead = cfg.scheduler.plan_ahead and rt.device.type == "cuda"
        # (the pass's arguments, its plan) made for the next step; None: none made
        self._ahead: tuple[tuple[Any, ...], Plan] | None = None
        self._ahead_s = 0.0  # what planning ahead took in this step

    # ---- any thread ------------------------------------------------------------------------------
    def add_request(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> None:
        prompt = list(prompt_token_ids)
        self._inbox.put((True, lambda out: self._admit(request_id, prompt, params, out)))

    def abort_request(self, request_id: str) -> None:
        self._inbox.put((False, lambda out: self._abort(request_id, FinishReason.ABORT, None, out)))

    def has_unfinished(self) -> bool:
        return bool(self._by_request or self._held) or not self._inbox.empty()

    # ---- engine thread ---------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        # Outputs collect on the engine, not in a local: if the step fails half-way, fail_all()
        # still delivers the ends of requests it had already finished.
        outputs = self._outbox
        self._apply_posted(outputs)
        ahead, self._ahead = self._ahead, None
        if not self._by_request:
            return self._take_outbox()
        self.step_index += 1
        step_start = time.perf_counter()
        inputs = self._pass_inputs(
            [s.view() for s in self.waiting],
            [s.view() for s in self.running.values()],
            self._cache_view(),
            self.step_index,
        )
        planned_ahead = ahead is not None and ahead[0] == inputs
        plan = ahead[1] if planned_ahead else self.rt.scheduler.schedule(*inputs)
        batches, order = self._apply(plan, outputs)
        if order:
            start = time.perf_counter()
            cpu_busy_before = self.rt.executor.cpu_busy_s
            cpu_worker_before = self.rt.executor.cpu_worker_s
            issue_before = self.rt.executor.issue_s
            self._ahead_s = 0.0
            logits = self.rt.forward(
                batches, functools.partial(self._plan_ahead, order) if self.plan_ahead else None
            )
            sampling = [s for s in order if s.samples]
            tokens = sample(
                torch.cat(logits) if len(logits) > 1 else logits[0],
                [s.params for s in sampling],
                [s.generator for s in sampling],
                self._default_generator,
            ) if sampling else []  # fmt: skip
            elapsed = time.perf_counter() - start
            cpu_busy = self.rt.executor.cpu_busy_s - cpu_busy_before
            self.iteration_stats.record_iteration(
                plan, elapsed, len(sampling), cpu_busy, self.rt.executor.issue_s - issue_before,
                self._cpu_work_s(self.rt.executor.cpu_worker_s - cpu_worker_before),
                self._cpu_correction(),
            )
            self._learn(plan, elapsed, cpu_busy, len(sampling))
            self.corrections.tick()
            for seq in order:
                if not seq.samples:
                    self._advance_chunk(seq)
            for seq, token in zip(sampling, tokens, strict=True):
                self._advance(seq, token, outputs)
            self.iteration_stats.record_host(
                time.perf_counter() - step_start - elapsed, planned_ahead, self._ahead_s
            )
        return self._take_outbox()

    def _apply_posted(self, outputs: list[RequestOutput], mid_step: bool = False) -> None:
        """Apply what other threads posted, in order. While a step is under way only new requests
        may be admitted (the step's own sequences must stay as they are): from the first other
        item on, the rest waits for the next step's start."""
        while self._held and not mid_step:
            _, apply = self._held.pop(0)
            apply(outputs)
        while not self._held and not self._inbox.empty():
            safe, apply = self._inbox.get_nowait()
            if mid_step and not safe:
                self._held.append((safe, apply))
                continue
            try:
                apply(outputs)
            except Exception:
                if not mid_step:
                    raise
                # An admission changes nothing until it succeeds: it is applied again at the next
                # step's start, where a failure belongs to that step.
                self._held.append((safe, apply))
                logger.debug("admitting a request while a step computes failed", exc_info=True)

    def _pass_inputs(
        self, waiting: list[SeqView], running: list[SeqView], cache: CacheView, step: int
    ) -> tuple[list[SeqView], list[SeqView], CacheView, Limits, int]:
        """A scheduling pass's arguments, all of them: equal arguments give an equal plan."""
        return waiting, running, cache, self._effective_limits(), step

    def _plan_ahead(self, order: list[Sequence]) -> None:
        """Plan the next step while the device computes this one (`order`), on the state this
        step leaves if none of its tokens is a stop token, requests posted meanwhile admitted
        first. The next step uses the plan only if its own arguments turn out the same (no stop
        token, nothing else posted, no change of the guard's verdict), so the plan is the one it
        would have made, but for the cost corrections, which learn from this step only once it
        ends."""
        start = time.perf_counter()
        try:
            # Requests that arrived meanwhile join the queue now, so that they do not cost the plan.
            self._apply_posted(self._outbox, mid_step=True)
            inputs = self._next_pass_inputs(order)
            self._ahead = (inputs, self.rt.scheduler.schedule(*inputs))
        except Exception:  # the next step's own pass meets it where a failure belongs
            logger.debug("planning the next step ahead failed", exc_info=True)
        self._ahead_s = time.perf_counter() - start

    def _next_pass_inputs(self, order: list[Sequence]) -> tuple[Any, ...]:
        after = {s.seq_id: s.view_after_step(self.step_index) for s in order}
        running, freed = [], {Residence.GPU: 0, Residence.CPU: 0}
        for seq in self.running.values():
            view = after[seq.seq_id] if seq.seq_id in after else seq.view()
            if view is None:  # ends on length
                freed[seq.residence] += len(seq.block_ids)
            else:
                running.append(view)
        cache = replace(
            self._cache_view(),
            num_free_gpu_blocks=self.gpu_blocks.num_free + freed[Residence.GPU],
            num_free_cpu_blocks=self.cpu_blocks.num_free + freed[Residence.CPU],
        )
        waiting = [s.view() for s in self.waiting]
        return self._pass_inputs(waiting, running, cache, self.step_index + 1)

    def _cpu_work_s(self, worker_s: float) -> float:
        """The pool's computing time over its size: what the CPU program would take with every
        step's inputs waiting (as the profile times it), whatever the GPU's pacing."""
        attention = self.rt.executor.cpu_attention
        return worker_s / attention.num_threads if attention is not None else 0.0

    def _cpu_correction(self) -> tuple[float, float]:
        """The (scale, fixed seconds) the scheduler's CPU costs carry now: those of this
        iteration's plan, since the corrections learn only after it ran."""
        cost = getattr(self.rt.scheduler, "cost", None)  # a scripted scheduler has none
        if isinstance(cost, CalibratedCostModel):
            return cost.cpu_scale, cost.cpu_fixed_s
        return 1.0, 0.0

    def _learn(self, plan: Plan, elapsed_s: float, cpu_busy_s: float, num_tokens: int) -> None:
        """Feed one iteration's measurements to the scheduler's cost corrections and the guard."""
        pure_decode = not (plan.prefill_gpu or plan.prefill_cpu or plan.swap_out or plan.swap_in)
        cost = getattr(self.rt.scheduler, "cost", None)  # a scripted scheduler has none
        if isinstance(cost, CalibratedCostModel):
            if not plan.prefill_cpu:  # KV stores of prompts aside
                cost.record_cpu(cpu_busy_s, plan.cpu_batches, self.rt.scheduler.num_layers)
            if pure_decode:
                cost.record_iteration(
                    plan.pipelined,
                    elapsed_s,
                    plan.predicted_iter_s,
                    self.rt.scheduler.num_layers,
                    cpu_busy_s,
                )
        if pure_decode and self.limits.policy == "auto":  # the only policy it acts on
            self.guard.record(
                self.step_index,
                num_tokens,
                elapsed_s,
                plan.predicted_iter_s,
                len(plan.decode_gpu),
                plan.predicted_gpu_alone_s,
                chosen=not plan.sends_home,
            )

    def _effective_limits(self) -> Limits:
        """Policy auto pauses offloading while the guard measures it losing: nothing goes to the
        CPU that the GPU pool can hold, and such requests there come home (or are recomputed).
        Requests larger than the GPU pool keep the CPU, their only home."""
        if self.limits.policy != "auto" or self.guard.allows_offload(self.step_index):
            return self.limits
        return replace(self.limits, offload_paused=True)

    def close(self) -> None:
        """Releases the engine's threads and stops the other tensor-parallel ranks; call once no
        step will run again."""
        self.corrections.save()
        self.rt.close()

    def _take_outbox(self) -> list[RequestOutput]:
        outputs, self._outbox = self._outbox, []
        return outputs

    def fail_all(self, message: str) -> list[RequestOutput]:
        """End every request with an error, freeing its blocks: the last resort after a failed
        step."""
        outputs = self._outbox
        self._apply_posted(outputs)
        for request_id in list(self._by_request):
            self._abort(request_id, FinishReason.ERROR, message, outputs)
        return self._take_outbox()

    def tune(self, **knobs: Any) -> dict[str, Any]:
        """Apply knobs between steps; validated first so a bad value changes nothing."""
        policy = knobs.pop("policy", self.limits.policy)
        max_batch = knobs.pop("max_batch_size", self.limits.max_batch_size)
        max_tokens = knobs.pop("max_tokens_in_batch", self.limits.max_tokens_in_batch)
        threads = knobs.pop("cpu_threads", None)
        rule = self.rt.scheduler.split_rule
        min_gain = knobs.pop("cpu_min_gain", rule.min_gain)
        stretch = knobs.pop("cpu_stretch", rule.stretch)
        round_robin = knobs.pop("cpu_round_robin", rule.round_robin)
        if knobs:
            raise ValueError(
                f"unknown tuning knob(s): {', '.join(sorted(knobs))}; allowed: policy, "
                "max_batch_size, max_tokens_in_batch, cpu_threads, cpu_min_gain, cpu_stretch, "
                "cpu_round_robin"
            )
        if not all(
            isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
            for v in (min_gain, stretch)
        ):
            raise ValueError(
                f"cpu_min_gain and cpu_stretch must be numbers, got {min_gain!r}, {stretch!r}"
            )
        # ValueError out of range
        rule = SplitRule(float(min_gain), float(stretch), round_robin)
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {policy!r}")
        if policy != "gpu-only" and self.rt.cpu_pool is None:
            raise ValueError(
                f"policy {policy!r} needs the host KV pool, which this engine was started without "
                "(it started with policy gpu-only or cache.cpu_kv_gib too small); restart it"
            )
        if not (isinstance(max_batch, int) and 1 <= max_batch <= self.rt.max_rows):
            raise ValueError(
                f"max_batch_size must be an integer in [1, {self.rt.max_rows}], got {max_batch!r}"
            )
        if not (isinstance(max_tokens, int) and 1 <= max_tokens <= self.rt.max_tokens):
            raise ValueError(
                f"max_tokens_in_batch must be an integer in [1, {self.rt.max_tokens}] (the staging "
                f"buffers were sized at start), got {max_tokens!r}"
            )
        if threads is not None:
            before = self.rt.cpu_threads
            self.corrections.save()  # the old pool's, beside its profile
            self.rt.set_cpu_threads(threads)
            if self.rt.cpu_threads != before:
                self.guard = OffloadGuard()  # its verdicts were on the old pool
                self.corrections.restore()  # the new pool's, if it served before
        self.limits = Limits(
            max_batch_size=max_batch, max_tokens_in_batch=max_tokens, policy=policy
        )
        self.rt.scheduler.split_rule = rule
        self._ahead = None  # planned with the knobs before
        return {
            "policy": policy,
            "max_batch_size": max_batch,
            "max_tokens_in_batch": max_tokens,
            "max_prefill_tokens": self.max_prefill_tokens,
            "cpu_threads": self.rt.cpu_threads,
            "cpu_min_gain": rule.min_gain,
            "cpu_stretch": rule.stretch,
            "cpu_round_robin": rule.round_robin,
        }

    def stats(self) -> dict[str, Any]:
        on_cpu = sum(1 for s in self.running.values() if s.residence == Residence.CPU)
        return {
            "model": self.rt.model_name,
            "device": str(self.rt.device),
            "dtype": str(self.rt.layout.dtype).removeprefix("torch."),
            "tp_size": self.rt.tp_size,
            "policy": self.limits.policy,
            "max_batch_size": self.limits.max_batch_size,
            "max_tokens_in_batch": self.limits.max_tokens_in_batch,
            "max_prefill_tokens": self.max_prefill_tokens,
            "cpu_min_gain": self.rt.scheduler.split_rule.min_gain,
            "cpu_stretch": self.rt.scheduler.split_rule.stretch,
            "cpu_round_robin": self.rt.scheduler.split_rule.round_robin,
            "max_model_len": self.rt.max_model_len,
            "vocab_size": self.rt.vocab_size,
            "waiting": len(self.waiting),
            "decoding_gpu": len(self.running) - on_cpu,
            "decoding_cpu": on_cpu,
            "kv_gpu": {
                "blocks_total": self.gpu_blocks.num_blocks,
                "blocks_used": self.gpu_blocks.num_used,
                "block_size": self.block_size,
            },
            "kv_cpu": {
                "blocks_total": self.cpu_blocks.num_blocks,
                "blocks_used": self.cpu_blocks.num_used,
                "block_size": self.block_size,
            },
            "cpu_pool": {
                "threads": self.rt.cpu_threads,
                "cores": self._pool_cores(),
                "numa_node": self.rt.cpu_node,
                "computing_share": self._pool_computing_share(),
                "waits": self._pool_waits(),
                "read_bandwidth_gbps": self.rt.cpu_bandwidth_gbps,
                "amx": self.rt.cpu_tile_path,
            },
            "iterations": self.iteration_stats.snapshot(),
            "offload_guard": self.guard.snapshot(),
            "cpu_cost_scale": self._cpu_cost_scale(),
            "pipeline_handoff": self._pipeline_handoff(),
            "profile": self._profile_stats(),
        }

    def _cpu_cost_scale(self) -> dict[str, float | int] | None:
        """How far the CPU pool measures off its profile now (see neod.sched.calibration)."""
        cost = getattr(self.rt.scheduler, "cost", None)  # a scripted scheduler has none
        if not isinstance(cost, CalibratedCostModel):
            return None
        return {
            "measured_over_profiled": round(cost.cpu_scale, 4),
            "fixed_us": round(cost.cpu_fixed_s * 1e6, 1),
            "samples": cost.cpu_samples,
        }

    def _pipeline_handoff(self) -> dict[str, float | int] | None:
        """The hand-off of a pipelined sub-batch with CPU work, per layer, as profiled and as
        measured (see neod.sched.calibration)."""
        cost = getattr(self.rt.scheduler, "cost", None)
        if not isinstance(cost, CalibratedCostModel):
            return None
        return {
            "per_layer_us": round(cost.handoff_s * 1e6, 1),
            "profiled_us": round(cost.profiled_handoff_s * 1e6, 1),
            "samples": cost.handoff_samples,
        }

    def _pool_computing_share(self) -> float | None:
        """Share of the pool's thread time, while it served iterations, that its workers computed
        (None before the first iteration with CPU work)."""
        executor = self.rt.executor
        capacity = executor.cpu_capacity_s
        return round(executor.cpu_worker_s / capacity, 4) if capacity > 0 else None

    def _pool_waits(self) -> dict[str, Any] | None:
        """How long the pool's workers sat runnable without a core since the pool started, and
        where this process's other threads are kept (None: anywhere)."""
        attention = self.rt.cpu_attention
        if attention is None:
            return None
        times = attention.thread_times()
        share = times.wait_share
        others = self.rt.other_cpus
        return {
            "wait_share": None if share is None else round(share, 4),
            "preempted": times.preempted,
            "other_threads_on": None if others is None else sorted(others),
        }

    def _pool_cores(self) -> list[int]:
        attention = self.rt.cpu_attention
        return [] if attention is None else list(attention.cores)

    def _profile_stats(self) -> dict[str, Any] | None:
        """Which stored profile the scheduler decides from (its file is profile-<id>.json)."""
        profile = self.rt.profile
        if profile is None:
            return None
        return {
            "id": profile.key.short_id(),
            "pool_threads": profile.key.pool_threads,
            "measured_at": profile.meta.get("measured_at"),
            "cpu_measured_at": profile.meta.get("cpu_measured_at"),
            # The CPU program as pipelined iterations pace it, over the table: the cost the
            # running corrections (cpu_cost_scale) correct.
            "cpu_paced": None if profile.cpu_paced is None else {
                "scale": round(profile.cpu_paced[0], 4),
                "fixed_us": round(profile.cpu_paced[1] * 1e6, 1),
            },
            "corrections_restored": self.corrections.restored,
        }

    # ---- internals -------------------------------------------------------------------------------
    def _cache_view(self) -> CacheView:
        return CacheView(
            block_size=self.block_size,
            num_gpu_blocks=self.gpu_blocks.num_blocks,
            num_free_gpu_blocks=self.gpu_blocks.num_free,
            num_cpu_blocks=self.cpu_blocks.num_blocks,
            num_free_cpu_blocks=self.cpu_blocks.num_free,
        )

    def _reject(
        self,
        request_id: str,
        message: str,
        out: list[RequestOutput],
        kind: EngineError = EngineError.INVALID,
    ) -> None:
        out.append(
            RequestOutput(
                request_id,
                finished=True,
                finish_reason=FinishReason.ERROR,
                error=message,
                error_kind=kind,
            )
        )

    def _admit(
        self, request_id: str, prompt: list[int], params: SamplingParams, out: list[RequestOutput]
    ) -> None:
        rt = self.rt
        if request_id in self._by_request:
            return self._reject(request_id, f"request id {request_id!r} is already in use", out)
        if not prompt:
            return self._reject(request_id, "the prompt is empty", out)
        if any(not isinstance(t, int) or not 0 <= t < rt.vocab_size for t in prompt):
            return self._reject(
                request_id, f"prompt token ids must be integers in [0, {rt.vocab_size})", out
            )
        limit = min(rt.max_model_len - 1, self.max_prefill_tokens)
        if len(prompt) > limit:
            return self._reject(
                request_id,
                f"the prompt has {len(prompt)} tokens, at most {limit} allowed",
                out,
                EngineError.PROMPT_TOO_LONG,
            )
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=rt.device)
            generator.manual_seed(params.seed)
        seq = Sequence(self._next_seq_id, request_id, prompt, params, rt.max_model_len, generator)
        seq.last_progress_step = self.step_index  # waiting time counts from admission (aging)
        self._next_seq_id += 1
        self._by_request[request_id] = seq
        self.waiting.append(seq)

    def _abort(
        self, request_id: str, reason: FinishReason, message: str | None, out: list[RequestOutput]
    ) -> None:
        seq = self._by_request.get(request_id)
        if seq is None:
            return  # already finished: its final output was sent
        if seq.residence == Residence.WAITING:
            self.waiting.remove(seq)
        self._finish(seq, reason, out, error=message)

    @property
    def max_prefill_tokens(self) -> int:
        """Longest prefill: one iteration's token budget, or in chunks what a pool the policy may
        use holds."""
        blocks = self.gpu_blocks.num_blocks
        if self.limits.policy != "gpu-only":
            blocks = max(blocks, self.cpu_blocks.num_blocks)
        return max(self.limits.max_tokens_in_batch, blocks * self.block_size)

    def _allocator(self, residence: Residence) -> BlockAllocator:
        return self.gpu_blocks if residence == Residence.GPU else self.cpu_blocks

    def _release(self, seq: Sequence) -> None:
        if seq.block_ids:
            self._allocator(seq.residence).free(seq.block_ids)
            seq.block_ids = []

    def _finish(
        self,
        seq: Sequence,
        reason: FinishReason,
        out: list[RequestOutput],
        new_tokens: list[int] = (),
        error: str | None = None,
        error_kind: EngineError | None = None,
        detail: str | None = None,
    ) -> None:
        self._release(seq)
        self.running.pop(seq.seq_id, None)
        del self._by_request[seq.request_id]
        seq.finish_reason = reason
        out.append(
            RequestOutput(
                seq.request_id,
                list(new_tokens),
                True,
                reason,
                error,
                seq.num_prompt_tokens,
                seq.num_output_tokens,
                (error_kind or EngineError.INTERNAL) if reason == FinishReason.ERROR else None,
                detail,
            )
        )

    def _move(self, seq: Sequence, to: Residence) -> list[tuple[int, int]]:
        """Re-home a sequence's blocks; returns the (source, destination) block pairs to copy."""
        src_alloc, dst_alloc = self._allocator(seq.residence), self._allocator(to)
        new_ids = dst_alloc.allocate(len(seq.block_ids))
        pairs = list(zip(seq.block_ids, new_ids, strict=True))
        src_alloc.free(seq.block_ids)
        seq.block_ids, seq.residence = new_ids, to
        return pairs

    def _apply(self, plan: Plan, out: list[RequestOutput]) -> tuple[list[SubBatch], list[Sequence]]:
        """Carry out the plan's block moves and allocations (order: preempt, swap out, swap in,
        allocate)."""
        rt = self.rt
        for sid, why in plan.unservable.items():
            seq = self.running.get(sid) or next(s for s in self.waiting if s.seq_id == sid)
            waiting = seq.residence == Residence.WAITING
            if waiting:
                self.waiting.remove(seq)
            if waiting or seq.num_output_tokens == 0:  # a prompt, maybe part-way in on the CPU
                self._finish(
                    seq,
                    FinishReason.ERROR,
                    out,
                    error=f"cannot be served under the current limits: {why}",
                    error_kind=EngineError.PROMPT_TOO_LONG,
                )
            else:
                self._finish(seq, FinishReason.LENGTH, out,
                             detail=f"the KV cache cannot hold more of this request: {why}")
        for sid in plan.preempt:
            seq = self.running.pop(sid)
            self._release(seq)
            seq.residence, seq.num_computed_tokens = Residence.WAITING, 0
            seq.chunk_tokens = None
            self.waiting.append(seq)
        if plan.preempt:
            self.waiting.sort(key=lambda s: s.seq_id)
        out_pairs = [
            p for sid in plan.swap_out for p in self._move(self.running[sid], Residence.CPU)
        ]
        in_pairs = [
            p for sid in plan.swap_in for p in self._move(self.running[sid], Residence.GPU)
        ]
        rt.swap(out_pairs, in_pairs)
        waiting = {s.seq_id: s for s in self.waiting}

        def take(ids: list[int], residence: Residence) -> list[Sequence]:
            seqs = []
            for sid in ids:
                seq = waiting.pop(sid, None)
                if seq is not None:
                    seq.residence = residence
                    self.running[sid] = seq
                else:
                    seq = self.running[sid]
                seq.chunk_tokens = plan.chunked.get(sid)
                need = seq.blocks_needed(self.block_size) - len(seq.block_ids)
                if need > 0:
                    seq.block_ids += self._allocator(residence).allocate(need)
                seqs.append(seq)
            return seqs

        groups = [
            take(plan.prefill_gpu, Residence.GPU),
            take(plan.prefill_cpu, Residence.CPU),
            take(plan.decode_gpu, Residence.GPU),
            take(plan.decode_cpu_b0, Residence.CPU),
        ]
        b1_decodes = take(plan.decode_cpu_b1, Residence.CPU)
        self.waiting = [s for s in self.waiting if s.seq_id in waiting]
        if not plan.pipelined:
            groups[3] += b1_decodes
            b1_decodes = []
        batches = []
        if any(groups):
            batches.append(build_sub_batch(*groups, block_size=self.block_size, device=rt.device))
        if b1_decodes:
            batches.append(
                build_sub_batch(
                    [], [], [], b1_decodes, block_size=self.block_size, device=rt.device
                )
            )
        order = [s for b in batches for s in b.seqs]
        return batches, order

    def _advance_chunk(self, seq: Sequence) -> None:
        """A chunk of a prompt is in: the rest follows in later steps, nothing to sample yet."""
        seq.num_computed_tokens += seq.step_tokens
        seq.chunk_tokens = None
        seq.last_progress_step = self.step_index

    def _advance(self, seq: Sequence, token: int, out: list[RequestOutput]) -> None:
        seq.num_computed_tokens = len(seq.token_ids)
        seq.token_ids.append(token)
        seq.last_progress_step = self.step_index
        params = seq.params
        stop = token in params.stop_token_ids or (
            not params.ignore_eos and token in self.rt.eos_token_ids
        )
        if stop:
            self._finish(seq, FinishReason.STOP, out, [token])
        elif len(seq.token_ids) >= seq.max_total_tokens:
            self._finish(seq, FinishReason.LENGTH, out, [token])
        else:
            out.append(
                RequestOutput(
                    seq.request_id,
                    [token],
                    num_prompt_tokens=seq.num_prompt_tokens,
                    num_output_tokens=seq.num_output_tokens,
                )
            )
